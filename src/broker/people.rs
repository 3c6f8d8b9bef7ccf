//! People at the console: their sign-ins and sign-outs on the ledger. A refused sign-in is
//! recorded like a failed authentication (throttled per peer); a person's reviews and
//! operator actions go through the same use cases as a workload's, with the person as
//! the caller.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use super::{record, Broker};
use crate::audit::EventKind;
use crate::authn::{AuthMethod, VerifiedCaller};
use crate::clock::unix_millis;
use crate::error::BrokerError;

impl Broker {
    /// Records a person's sign-in (`allow`) or sign-out (`sign_out`, with why).
    pub async fn record_session(&self, person: &VerifiedCaller, decision: &str, reason: &str) {
        let mut e = self.event(EventKind::SignIn, decision, Some(person));
        e.request = Some(record("ConsoleSignIn"));
        e.reason = Some(reason.to_owned());
        self.record_best_effort(e).await;
    }

    /// Records a refused sign-in: what failed, who it claimed to be (untrusted) and from
    /// where. At most a few entries per peer a minute, like failed authentications.
    pub async fn record_sign_in_refused(
        &self,
        method: AuthMethod,
        claimed: Option<&str>,
        reason: &str,
        peer: Option<IpAddr>,
    ) {
        self.metrics.authn_failures.inc();
        let peer = peer.map_or_else(|| "unknown".to_owned(), |ip| ip.to_string());
        let Some(unrecorded) = self
            .failure_records
            .admit(&peer, unix_millis(self.clock.now()))
        else {
            self.metrics.authn_failures_unrecorded.inc();
            return;
        };
        let mut e = self.event(EventKind::AuthnFailure, "deny", None);
        e.claimed_id = claimed.map(crate::domain::truncate);
        e.auth_method = Some(method.as_str().to_owned());
        e.request = Some(record("ConsoleSignIn"));
        e.reason = Some(if unrecorded == 0 {
            reason.to_owned()
        } else {
            format!("{reason} (and {unrecorded} earlier failures from {peer} not recorded)")
        });
        self.record_best_effort(e).await;
    }

    /// How fresh a person's sign-in must be to review requests for `profile`, when theirs
    /// is older (the profile's `approval_max_auth_age`); `None` for workloads and for
    /// sign-ins fresh enough.
    pub fn fresh_sign_in_needed(&self, caller: &VerifiedCaller, profile: &str) -> Option<Duration> {
        let person = caller.principal().person()?;
        let max = self
            .policy()
            .directory()
            .profile(profile)?
            .approval_max_auth_age?;
        let age = self.clock.unix_seconds() - person.auth_time;
        (age > max.as_secs() as i64).then_some(max)
    }

    /// Keeps people's sessions (console and CLI sign-ins) with these settings.
    pub fn with_sessions(mut self, cfg: crate::config::ConsoleConfig) -> Self {
        self.sessions = Some(Arc::new(super::Sessions::new(cfg, self.clock.clone())));
        self
    }

    /// People's sessions, if the console is configured.
    pub fn sessions(&self) -> Option<&Arc<super::Sessions>> {
        self.sessions.as_ref()
    }

    /// A person calling over gRPC with a session token (`authorization: Session <token>`,
    /// from `spiffe-broker login`): the session's person, or a refusal recorded like a
    /// failed authentication.
    pub(super) async fn authenticate_person(
        &self,
        token: &str,
        peer: Option<IpAddr>,
    ) -> Result<VerifiedCaller, BrokerError> {
        match self.sessions.as_ref().and_then(|s| s.get(token)) {
            Some(s) => Ok(VerifiedCaller::signed_in(s.person, s.dev)),
            None => {
                let reason = "unknown or ended session";
                self.record_sign_in_refused(AuthMethod::OidcSession, None, reason, peer)
                    .await;
                Err(BrokerError::Unauthenticated(crate::authn::AuthnError::new(
                    reason,
                )))
            }
        }
    }

    /// The OpenID Providers, if any are configured.
    pub fn oidc(&self) -> Option<&Arc<crate::oidc::OidcProviders>> {
        self.oidc.as_ref()
    }

    /// The broker's clock.
    pub fn clock(&self) -> &Arc<dyn crate::clock::Clock> {
        &self.clock
    }
}
