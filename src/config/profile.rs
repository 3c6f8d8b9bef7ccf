//! Credential profiles: what can be asked for, the ceiling, and the per-profile quotas.

use std::collections::BTreeSet;
use std::time::Duration;

use serde::Deserialize;

use super::{backend, duration, err, BackendProfile, Config, ConfigError};
use crate::domain::{ProfileName, Scope};

/// Which backend mints a profile's credentials.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CredentialKind {
    /// An ES256 JWT signed by the broker (verifiable with its JWKS).
    Jwt,
    /// A Docker/OCI distribution registry bearer token (`access` claim).
    OciRegistry,
    /// An OIDC token for a Kubernetes API server's JWT authenticator.
    KubernetesOidc,
    /// An RS256 token for slurmrestd (`sun` claim).
    Slurm,
    /// AWS temporary credentials from `AssumeRoleWithWebIdentity`.
    AwsSts,
    /// A Vault dynamic secret, revoked in Vault when the lease ends.
    Vault,
    /// A short-lived X.509 client certificate signed from the caller's CSR.
    X509,
}
impl CredentialKind {
    /// The name used in the config file.
    pub fn as_str(self) -> &'static str {
        match self {
            CredentialKind::Jwt => "jwt",
            CredentialKind::OciRegistry => "oci_registry",
            CredentialKind::KubernetesOidc => "kubernetes_oidc",
            CredentialKind::Slurm => "slurm",
            CredentialKind::AwsSts => "aws_sts",
            CredentialKind::Vault => "vault",
            CredentialKind::X509 => "x509",
        }
    }

    /// Whether the backend holds state that must be revoked there when a lease ends.
    pub fn revocable_in_backend(self) -> bool {
        self == CredentialKind::Vault
    }

    /// Whether issuing calls another service (and so runs under the profile's deadline).
    pub fn remote(self) -> bool {
        matches!(self, CredentialKind::Vault | CredentialKind::AwsSts)
    }

    /// Whether the credential is a token that can carry a delegation chain (`act`).
    pub fn carries_claims(self) -> bool {
        matches!(
            self,
            CredentialKind::Jwt
                | CredentialKind::OciRegistry
                | CredentialKind::KubernetesOidc
                | CredentialKind::Slurm
        )
    }
}
/// A credential profile: what can be asked for, by whom, and the ceiling.
#[derive(Debug, Clone)]
pub struct Profile {
    /// Name callers ask for.
    pub name: ProfileName,
    /// Which backend.
    pub kind: CredentialKind,
    /// The backend's own settings for this profile.
    pub backend: BackendProfile,
    /// How long a backend call (Vault, STS) may take before the request fails UNAVAILABLE.
    pub deadline: Duration,
    /// `aud` of the credential.
    pub audience: String,
    /// The scope ceiling.
    pub scopes: BTreeSet<Scope>,
    /// Scopes granted when the request names none (empty: the request must name some).
    pub default_scopes: BTreeSet<Scope>,
    /// TTL ceiling; also the bound on renewals counted from first issuance.
    pub max_ttl: Duration,
    /// TTL when the request names none.
    pub default_ttl: Duration,
    /// Whether a stated intent is mandatory.
    pub require_intent: bool,
    /// Optional intent fields every request must state (`ticket`, `artifact_digest`,
    /// `justification`), break-glass included: no policy can waive them.
    pub require_intent_fields: Vec<String>,
    /// When set, each granted scope is rendered through this template, with `{scope}` and
    /// `{target}` (the intent target) filled in, e.g. `repository:{target}:{scope}`.
    pub scope_template: Option<String>,
    /// How long an access request waits for its approvals.
    pub approval_ttl: Duration,
    /// Whether one deny ends an access request (otherwise it only counts against).
    pub deny_ends: bool,
    /// A person's review needs a sign-in at most this old (`auth_time`; the console asks
    /// the provider to authenticate them again, OpenID Connect `max_age`). Workloads are
    /// not affected.
    pub approval_max_auth_age: Option<Duration>,
    /// Break-glass TTL cap; `None` means the profile has no break-glass.
    pub break_glass_max_ttl: Option<Duration>,
    /// Most active leases one identity may hold on this profile (0: no limit).
    pub max_active_leases: u32,
    /// Most requests per minute one identity may make for this profile (0: no limit).
    pub requests_per_minute: u32,
    /// Whether token exchange (`ExchangeToken`) may issue this profile for an actor on
    /// a subject's behalf. Off by default; only for token kinds (the chain rides in `act`).
    pub delegable: bool,
}
/// The optional intent fields a profile can require.
const INTENT_FIELDS: [&str; 3] = ["ticket", "artifact_digest", "justification"];
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawQuotas {
    pub(super) max_active_leases: Option<u32>,
    pub(super) requests_per_minute: Option<u32>,
}
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProfile {
    name: String,
    kind: CredentialKind,
    audience: String,
    scopes: Vec<String>,
    #[serde(default)]
    default_scopes: Vec<String>,
    max_ttl: String,
    default_ttl: Option<String>,
    #[serde(default)]
    require_intent: bool,
    #[serde(default)]
    require_intent_fields: Vec<String>,
    scope_template: Option<String>,
    approval_ttl: Option<String>,
    deny_ends: Option<bool>,
    approval_max_auth_age: Option<String>,
    break_glass_max_ttl: Option<String>,
    max_active_leases: Option<u32>,
    requests_per_minute: Option<u32>,
    #[serde(default)]
    delegable: bool,
    deadline: Option<String>,
    kubernetes: Option<backend::RawKubernetes>,
    slurm: Option<backend::RawSlurm>,
    aws_sts: Option<backend::RawAwsStsProfile>,
    vault: Option<backend::RawVaultProfile>,
    x509: Option<backend::RawX509Profile>,
}
/// Default quota: active leases per identity and profile.
pub const DEFAULT_MAX_ACTIVE_LEASES: u32 = 100;
/// Default quota: requests per minute per identity and profile.
pub const DEFAULT_REQUESTS_PER_MINUTE: u32 = 600;
impl Config {
    pub(super) fn profile(p: RawProfile, quotas: (u32, u32)) -> Result<Profile, ConfigError> {
        let name =
            ProfileName::parse(&p.name).map_err(|e| ConfigError(format!("profiles: {e}")))?;
        let ctx = |e: crate::domain::DomainError| ConfigError(format!("profile {}: {e}", p.name));
        if let Some(f) = p
            .require_intent_fields
            .iter()
            .find(|f| !INTENT_FIELDS.contains(&f.as_str()))
        {
            return err(format!(
                "profile {}: require_intent_fields: unknown field {f:?} (one of {})",
                p.name,
                INTENT_FIELDS.join(", ")
            ));
        }
        let scopes = p
            .scopes
            .iter()
            .map(|s| Scope::parse(s).map_err(ctx))
            .collect::<Result<BTreeSet<_>, _>>()?;
        let default_scopes = p
            .default_scopes
            .iter()
            .map(|s| Scope::parse(s).map_err(ctx))
            .collect::<Result<BTreeSet<_>, _>>()?;
        if scopes.is_empty() {
            return err(format!("profile {}: scopes must not be empty", p.name));
        }
        if !default_scopes.is_subset(&scopes) {
            return err(format!(
                "profile {}: default_scopes must be within scopes",
                p.name
            ));
        }
        let max_ttl = duration(
            &format!("profile {}: max_ttl", p.name),
            Some(&p.max_ttl),
            Duration::ZERO,
        )?;
        if max_ttl.is_zero() || max_ttl > crate::domain::MAX_REQUESTABLE_TTL {
            return err(format!(
                "profile {}: max_ttl must be between 1s and 7d",
                p.name
            ));
        }
        let default_ttl = duration(
            &format!("profile {}: default_ttl", p.name),
            p.default_ttl.as_deref(),
            max_ttl,
        )?;
        if default_ttl.is_zero() || default_ttl > max_ttl {
            return err(format!(
                "profile {}: default_ttl must be between 1s and max_ttl",
                p.name
            ));
        }
        if p.audience.is_empty() || p.audience.len() > 256 {
            return err(format!(
                "profile {}: audience must be 1..=256 characters",
                p.name
            ));
        }
        if let Some(t) = &p.scope_template {
            if !t.contains("{scope}") {
                return err(format!(
                    "profile {}: scope_template must contain {{scope}}",
                    p.name
                ));
            }
        }
        let approval_ttl = duration(
            &format!("profile {}: approval_ttl", p.name),
            p.approval_ttl.as_deref(),
            Duration::from_secs(3600),
        )?;
        let approval_max_auth_age = p
            .approval_max_auth_age
            .as_deref()
            .map(|v| {
                duration(
                    &format!("profile {}: approval_max_auth_age", p.name),
                    Some(v),
                    Duration::ZERO,
                )
            })
            .transpose()?;
        let break_glass_max_ttl = p
            .break_glass_max_ttl
            .as_deref()
            .map(|v| {
                duration(
                    &format!("profile {}: break_glass_max_ttl", p.name),
                    Some(v),
                    Duration::ZERO,
                )
            })
            .transpose()?;
        if let Some(bg) = break_glass_max_ttl {
            if bg.is_zero() || bg > max_ttl {
                return err(format!(
                    "profile {}: break_glass_max_ttl must be between 1s and max_ttl",
                    p.name
                ));
            }
        }
        if p.delegable && !p.kind.carries_claims() {
            return err(format!(
                "profile {}: delegable needs a token kind (jwt, oci_registry, kubernetes_oidc, slurm): a {} credential cannot carry the delegation chain",
                p.name,
                p.kind.as_str()
            ));
        }
        let sections = backend::RawSections {
            kubernetes: p.kubernetes,
            slurm: p.slurm,
            aws_sts: p.aws_sts,
            vault: p.vault,
            x509: p.x509,
        };
        Ok(Profile {
            backend: sections.resolve(&p.name, p.kind)?,
            deadline: backend::deadline(&p.name, p.deadline.as_deref())?,
            name,
            kind: p.kind,
            audience: p.audience,
            scopes,
            default_scopes,
            max_ttl,
            default_ttl,
            require_intent: p.require_intent || !p.require_intent_fields.is_empty(),
            require_intent_fields: p.require_intent_fields,
            scope_template: p.scope_template,
            approval_ttl,
            deny_ends: p.deny_ends.unwrap_or(true),
            approval_max_auth_age,
            break_glass_max_ttl,
            max_active_leases: p.max_active_leases.unwrap_or(quotas.0),
            requests_per_minute: p.requests_per_minute.unwrap_or(quotas.1),
            delegable: p.delegable,
        })
    }
}
