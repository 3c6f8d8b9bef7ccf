//! Token exchange settings: `[delegation]` (how long a chain may be) and
//! `[[oidc_providers]]`: OpenID Providers whose people's ID tokens the broker accepts as
//! subject tokens (`urn:ietf:params:oauth:token-type:id_token`) and through which people
//! sign in to the console (authorization code flow; `client_secret_file`, `scopes` and the
//! `claim_rules` that map a person's groups to roles and approver groups).

use std::path::PathBuf;

use serde::Deserialize;

use super::{err, ConfigError};

/// One OpenID Provider.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OidcProviderConfig {
    /// The issuer exactly as its ID tokens' `iss` says (`https://…`; `http://` only on
    /// loopback); discovery is at `{issuer}/.well-known/openid-configuration`.
    pub issuer: String,
    /// The broker's client id at the provider: ID tokens must name it in `aud`.
    pub client_id: String,
    /// For an `https` issuer: the CA file (default: the platform's trust store).
    pub ca_file: Option<PathBuf>,
    /// The claim that lists the person's groups (Cedar's `subject_groups`).
    pub groups_claim: String,
    /// What the sign-in button says (default: the issuer's host).
    pub display_name: String,
    /// The client secret for the console's code exchange (`client_secret_basic`); read at
    /// each sign-in, so a rotation needs no restart. Without it, no console sign-in.
    pub client_secret_file: Option<PathBuf>,
    /// Scopes asked at sign-in (always with `openid`).
    pub scopes: Vec<String>,
    /// Which groups give a signed-in person which roles and approver groups.
    pub claim_rules: Vec<ClaimRule>,
}

/// `[[oidc_providers.claim_rules]]`: a person whose groups claim contains `group` holds
/// `roles` and is in `approver_groups`. A person no rule matches may sign in and sees
/// nothing they may act on.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimRule {
    /// A value of the provider's groups claim.
    pub group: String,
    /// Roles (Cedar `Role`), e.g. `platform-admin` or `auditor`.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Approver groups (as in `[[approver_groups]]`).
    #[serde(default)]
    pub approver_groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOidcProvider {
    issuer: String,
    client_id: String,
    ca_file: Option<PathBuf>,
    groups_claim: Option<String>,
    display_name: Option<String>,
    client_secret_file: Option<PathBuf>,
    scopes: Option<Vec<String>>,
    #[serde(default)]
    claim_rules: Vec<ClaimRule>,
}

impl RawOidcProvider {
    pub(super) fn resolve(self) -> Result<OidcProviderConfig, ConfigError> {
        let issuer = self.issuer.trim_end_matches('/').to_owned();
        let loopback = ["http://127.0.0.1:", "http://[::1]:", "http://localhost:"]
            .iter()
            .any(|p| issuer.starts_with(p));
        if !(issuer.starts_with("https://") || loopback) || issuer.contains(['?', '#']) {
            return err(format!(
                "oidc_providers: issuer {:?} must be an https:// URL without query or fragment (http:// only on loopback)",
                self.issuer
            ));
        }
        if self.client_id.is_empty() || self.client_id.chars().any(char::is_control) {
            return err(format!("oidc_providers: {issuer}: client_id is required"));
        }
        let token = |s: &str| !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b));
        let mut scopes = self
            .scopes
            .unwrap_or_else(|| vec!["email".into(), "profile".into(), "groups".into()]);
        if let Some(bad) = scopes.iter().find(|s| !token(s) || s.contains('"')) {
            return err(format!(
                "oidc_providers: {issuer}: scope {bad:?} is not a scope token"
            ));
        }
        scopes.retain(|s| s != "openid");
        for r in &self.claim_rules {
            if r.group.is_empty() || r.roles.iter().chain(&r.approver_groups).any(|n| !token(n)) {
                return err(format!(
                    "oidc_providers: {issuer}: a claim rule needs a group, and roles and approver groups without spaces"
                ));
            }
        }
        let host = issuer.split("://").nth(1).unwrap_or(&issuer);
        Ok(OidcProviderConfig {
            display_name: self
                .display_name
                .unwrap_or_else(|| host.split('/').next().unwrap_or(host).to_owned()),
            issuer,
            client_id: self.client_id,
            ca_file: self.ca_file,
            groups_claim: self.groups_claim.unwrap_or_else(|| "groups".into()),
            client_secret_file: self.client_secret_file,
            scopes,
            claim_rules: self.claim_rules,
        })
    }
}

/// Every configured provider, each issuer once.
pub(super) fn providers(raw: Vec<RawOidcProvider>) -> Result<Vec<OidcProviderConfig>, ConfigError> {
    let providers = raw
        .into_iter()
        .map(RawOidcProvider::resolve)
        .collect::<Result<Vec<_>, _>>()?;
    let mut issuers: Vec<_> = providers.iter().map(|p| p.issuer.as_str()).collect();
    issuers.sort_unstable();
    if let Some(w) = issuers.windows(2).find(|w| w[0] == w[1]) {
        return err(format!("oidc_providers: {} is listed twice", w[0]));
    }
    Ok(providers)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawDelegation {
    max_chain_depth: Option<usize>,
}

impl RawDelegation {
    /// `[delegation] max_chain_depth`, within 1..=`MAX_CHAIN_DEPTH`.
    pub(super) fn max_chain_depth(&self) -> Result<usize, ConfigError> {
        use crate::domain::delegation::{DEFAULT_MAX_CHAIN_DEPTH, MAX_CHAIN_DEPTH};
        match self.max_chain_depth {
            None => Ok(DEFAULT_MAX_CHAIN_DEPTH),
            Some(n @ 1..=MAX_CHAIN_DEPTH) => Ok(n),
            Some(n) => err(format!(
                "delegation.max_chain_depth: {n} is not between 1 and {MAX_CHAIN_DEPTH}"
            )),
        }
    }
}
