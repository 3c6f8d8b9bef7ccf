//! `ExchangeToken` (OAuth 2.0 Token Exchange, RFC 8693): the caller — the actor —
//! presents a subject token. The broker verifies it, builds the delegation chain, and
//! issues through the same path as `IssueCredential`: policy sees the chain, the grant
//! only narrows, and the ledger records every link.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::issue::{IssueOptions, IssueOutcome, SubjectBounds};
use super::{request_record, Broker};
use crate::audit::EventKind;
use crate::authn::VerifiedCaller;
use crate::crypto::KeyRing;
use crate::domain::delegation::{extend_chain, MayAct};
use crate::domain::{
    CredentialRequest, Delegation, LeaseId, LeaseState, Party, PartyKind, SubjectTokenType,
};
use crate::error::BrokerError;
use crate::jose::{self, TokenRefusal};
use crate::oidc::{OidcProviders, Person};
use crate::policy::Decision;

/// What the broker needs to verify subject tokens it issued itself.
#[derive(Clone)]
pub struct ExchangeSettings {
    /// The broker's signing keys (the JWKS it publishes).
    pub keys: KeyRing,
    /// The broker's issuer URL (`iss`).
    pub issuer_url: String,
    /// Most actors in a chain.
    pub max_chain_depth: usize,
    /// Clock tolerance on a subject token's `exp`/`nbf`, in seconds.
    pub leeway: i64,
}

/// A verified subject token: who it is for, the chain it already carries, and what it
/// allows.
struct Subject {
    id: String,
    token_type: SubjectTokenType,
    sha256: String,
    parent: Option<LeaseId>,
    /// The actors the subject token already names (current first); only a broker-issued
    /// token's `act` counts: the broker is the only party that asserts one.
    earlier: Vec<String>,
    may_act: Option<MayAct>,
    bounds: SubjectBounds,
    /// A person from an ID token: email and groups.
    person: Option<Person>,
}

impl Broker {
    /// Sets how subject tokens this broker issued are verified (without it,
    /// `ExchangeToken` accepts only JWT-SVIDs).
    pub fn with_exchange(mut self, settings: ExchangeSettings) -> Self {
        self.exchange = Some(settings);
        self
    }

    /// Sets the OpenID Providers whose people's ID tokens are accepted as subject tokens.
    pub fn with_oidc(mut self, providers: OidcProviders) -> Self {
        self.oidc = Some(Arc::new(providers));
        self
    }

    fn max_chain_depth(&self) -> usize {
        self.exchange
            .as_ref()
            .map_or(crate::domain::delegation::DEFAULT_MAX_CHAIN_DEPTH, |s| {
                s.max_chain_depth
            })
    }

    /// A chain member by id: people signed in at an OpenID Provider (`oidc:…`) are
    /// people; others are what the inventory says (workloads by default).
    fn party(&self, id: &str) -> Party {
        let kind = if id.starts_with("oidc:") {
            PartyKind::Person
        } else {
            spiffe::SpiffeId::new(id)
                .ok()
                .and_then(|sid| self.policy().directory().identity(&sid).map(|i| i.kind))
                .unwrap_or(PartyKind::Workload)
        };
        Party {
            id: id.to_owned(),
            kind,
            email: None,
        }
    }

    /// Records a refused exchange (with the request and whatever chain was verified)
    /// and returns the error.
    async fn refuse_exchange(
        &self,
        caller: &VerifiedCaller,
        req: &CredentialRequest,
        err: BrokerError,
    ) -> BrokerError {
        self.metrics.denied("delegation");
        let mut e = self.event(EventKind::Deny, "deny", Some(caller));
        e.request = Some(request_record("ExchangeToken", req));
        e.reason = Some(err.to_string());
        e.rule = Some("delegation".into());
        self.record_best_effort(e).await;
        err
    }

    /// Token exchange: verifies `token` as a `token_type` subject token, builds the chain
    /// with the caller as the current actor, and issues `req` for the subject.
    pub async fn exchange(
        &self,
        caller: &VerifiedCaller,
        token: &str,
        token_type: SubjectTokenType,
        mut req: CredentialRequest,
        mut opts: IssueOptions,
    ) -> Result<IssueOutcome, BrokerError> {
        let refused = |why: String| BrokerError::PermissionDenied(why);
        if opts.break_glass {
            let err = BrokerError::InvalidArgument(
                "break-glass is not available through token exchange".into(),
            );
            return Err(self.refuse_exchange(caller, &req, err).await);
        }
        let subject = match self.verify_subject(token, token_type).await {
            Ok(s) => s,
            Err(why) => {
                let err = refused(format!("subject token refused: {why}"));
                return Err(self.refuse_exchange(caller, &req, err).await);
            }
        };
        let actor = caller.id().to_string();
        if let Some(m) = subject.may_act.as_ref().filter(|m| m.sub != actor) {
            let err = refused(format!(
                "the subject token's may_act names {}, not {actor}",
                m.sub
            ));
            return Err(self.refuse_exchange(caller, &req, err).await);
        }
        let earlier: Vec<&str> = subject.earlier.iter().map(String::as_str).collect();
        if let Err(why) = extend_chain(&subject.id, &earlier, &actor, self.max_chain_depth()) {
            return Err(self.refuse_exchange(caller, &req, refused(why)).await);
        }
        let mut actors = vec![self.party(&actor)];
        actors.extend(earlier.iter().map(|a| self.party(a)));
        let subject_party = match &subject.person {
            Some(p) => Party {
                id: p.id.clone(),
                kind: PartyKind::Person,
                email: p.email.clone(),
            },
            None => self.party(&subject.id),
        };
        let delegation = Delegation {
            subject: subject_party,
            actors,
            subject_token_type: subject.token_type,
            subject_token_sha256: subject.sha256.clone(),
            parent_lease: subject.parent.clone(),
            subject_groups: subject
                .person
                .as_ref()
                .map(|p| p.groups.clone())
                .unwrap_or_default(),
        };
        let mut bounds = subject.bounds;
        if subject.token_type == SubjectTokenType::JwtSvid {
            // A workload's JWT-SVID grants nothing by itself: the subject's own
            // entitlement under policy bounds what may be issued for it.
            match self.subject_entitlement(&subject.id, &req) {
                Ok(scopes) => bounds.scopes = Some(scopes),
                Err(why) => {
                    req.delegation = Some(delegation);
                    return Err(self.refuse_exchange(caller, &req, refused(why)).await);
                }
            }
        }
        req.delegation = Some(delegation.clone());
        opts.bounds = Some(bounds);
        Ok(match self.issue(caller, req, opts).await? {
            IssueOutcome::Issued(mut i) => {
                i.delegation = Some(delegation);
                IssueOutcome::Issued(i)
            }
            pending => pending,
        })
    }

    /// The scopes policy would grant `subject` itself for `req` (with or without
    /// approval), or why it would not.
    fn subject_entitlement(
        &self,
        subject: &str,
        req: &CredentialRequest,
    ) -> Result<BTreeSet<String>, String> {
        let id = spiffe::SpiffeId::new(subject).map_err(|e| format!("subject {subject}: {e}"))?;
        let ctx = crate::policy::RequestContext {
            now: self.clock.unix_seconds(),
            auth_method: crate::authn::AuthMethod::JwtSvid,
            break_glass: false,
            approvals: Vec::new(),
            person_approvals_group: None,
        };
        let own = CredentialRequest {
            delegation: None,
            ..req.clone()
        };
        match self.policy().decide(&id, &own, &ctx) {
            Decision::Allow(g) | Decision::RequireApproval(g, _) => {
                let asked = if own.scopes.is_empty() {
                    g.profile
                        .default_scopes
                        .iter()
                        .map(|s| s.to_string())
                        .collect()
                } else {
                    own.scopes.iter().map(|s| s.to_string()).collect()
                };
                Ok(asked)
            }
            Decision::Deny(d) => Err(format!(
                "the subject {subject} may not be issued this itself: {}",
                d.reason
            )),
        }
    }

    /// Verifies a subject token as the type it is declared to be.
    async fn verify_subject(
        &self,
        token: &str,
        token_type: SubjectTokenType,
    ) -> Result<Subject, String> {
        let sha256 = hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            token.as_bytes(),
        ));
        match token_type {
            SubjectTokenType::JwtSvid => {
                let (id, claims) = self
                    .authn
                    .verify_subject_jwt_svid(token)
                    .map_err(|e| e.reason)?;
                let may_act = match claims.get("may_act") {
                    None => None,
                    Some(v) => Some(
                        serde_json::from_value::<MayAct>(v.clone())
                            .map_err(|e| format!("may_act: {e}"))?,
                    ),
                };
                let exp = claims
                    .get("exp")
                    .and_then(serde_json::Value::as_i64)
                    .ok_or("JWT-SVID without exp")?;
                Ok(Subject {
                    id: id.to_string(),
                    token_type,
                    sha256,
                    parent: None,
                    // A JWT-SVID's `act` is not the broker's assertion: ignored.
                    earlier: Vec::new(),
                    may_act,
                    bounds: SubjectBounds {
                        not_after: exp,
                        scopes: None,
                    },
                    person: None,
                })
            }
            SubjectTokenType::BrokerToken => self.verify_broker_token(token, sha256).await,
            SubjectTokenType::IdToken => {
                let providers = self
                    .oidc
                    .as_ref()
                    .ok_or("no OpenID Provider is configured on this broker")?;
                let person = providers.verify(token).await?;
                Ok(Subject {
                    id: person.id.clone(),
                    token_type,
                    sha256,
                    parent: None,
                    earlier: Vec::new(),
                    may_act: None,
                    // An ID token carries no grant of its own: what may be issued for the
                    // person is what policy permits the actor with the person in
                    // `context.delegation` (their id and groups).
                    bounds: SubjectBounds {
                        not_after: person.expires_at,
                        scopes: None,
                    },
                    person: Some(person),
                })
            }
        }
    }

    /// A credential this broker issued, for this broker's audience, whose lease is still
    /// active and still has exactly this token (a renewal supersedes it).
    async fn verify_broker_token(&self, token: &str, sha256: String) -> Result<Subject, String> {
        let settings = self
            .exchange
            .as_ref()
            .ok_or("this broker is not set up to exchange its own tokens")?;
        let expected = jose::Expected {
            issuer: &settings.issuer_url,
            audience: self.authn.audience(),
            now: self.clock.unix_seconds(),
            leeway: settings.leeway,
        };
        let claims = jose::verify_broker_token(token, |kid| settings.keys.find(kid), &expected)
            .map_err(|r| match r {
                TokenRefusal::Malformed(m) => format!("malformed: {m}"),
                TokenRefusal::UnknownKey(k) => format!("not signed by this broker (kid {k:?})"),
                TokenRefusal::Invalid(m) if m == "wrong audience" => format!(
                    "its audience is {:?}, not this broker ({})",
                    crate::domain::truncate(&claims_aud(token)),
                    self.authn.audience()
                ),
                TokenRefusal::Invalid(m) => m,
            })?;
        let id = LeaseId::parse(&claims.jti).map_err(|e| format!("jti: {e}"))?;
        let lease = self
            .store
            .lease(&id)
            .await
            .map_err(|e| format!("its lease could not be read: {e}"))?
            .ok_or("no lease has this token's jti")?;
        if lease.state != LeaseState::Active {
            return Err(format!(
                "its lease {} is {}",
                lease.id,
                lease.state.as_str()
            ));
        }
        if lease.expires_at <= self.clock.unix_seconds() {
            return Err(format!("its lease {} has expired", lease.id));
        }
        if lease.credential_sha256 != sha256 {
            return Err(format!(
                "it is not the current credential of lease {} (renewed since)",
                lease.id
            ));
        }
        let scopes = claims
            .scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        Ok(Subject {
            earlier: claims
                .act
                .as_ref()
                .map(|a| a.chain().into_iter().map(str::to_owned).collect())
                .unwrap_or_default(),
            id: claims.sub,
            token_type: SubjectTokenType::BrokerToken,
            sha256,
            parent: Some(lease.id),
            may_act: claims.may_act,
            bounds: SubjectBounds {
                not_after: claims.exp.min(lease.expires_at),
                scopes: Some(scopes),
            },
            person: None,
        })
    }
}

/// The `aud` a token claims (unverified: only to name it in a refusal).
fn claims_aud(token: &str) -> String {
    jose::split(token)
        .ok()
        .and_then(|p| serde_json::from_slice::<serde_json::Value>(&p.payload).ok())
        .and_then(|v| v.get("aud").map(|a| a.to_string()))
        .unwrap_or_default()
}
