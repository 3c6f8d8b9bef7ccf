//! Backend settings: the per-profile section each credential kind needs
//! (`[profiles.vault]`, `[profiles.aws_sts]` …) and the broker-wide sections for backends
//! the broker talks to (`[vault]`, `[aws_sts]`, `[x509]`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use spiffe::SpiffeId;

use super::{duration, err, ConfigError, CredentialKind};

/// What a profile of a given kind needs beyond the common fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendProfile {
    /// Broker JWT, OCI registry token: nothing more.
    None,
    /// Kubernetes-style OIDC token.
    Kubernetes {
        /// The `groups` claim, mapped to the scheduler's RBAC (e.g. a Kueue queue namespace).
        groups: Vec<String>,
    },
    /// slurmrestd JWT.
    Slurm {
        /// SPIFFE ID → Slurm user name (`sun`); callers without an entry are refused.
        users: BTreeMap<String, String>,
        /// Users no token may name: Slurm lets a token for root or the SlurmUser act as
        /// any user, so the broker never mints one, whatever `users` says.
        forbidden_users: Vec<String>,
    },
    /// AWS STS `AssumeRoleWithWebIdentity`.
    AwsSts {
        /// The role assumed.
        role_arn: String,
    },
    /// A Vault dynamic secret.
    Vault {
        /// Path read for the secret, e.g. `database/creds/readonly` (no leading slash).
        path: String,
    },
    /// A short-lived X.509 client certificate from a CSR.
    X509 {
        /// Subject CN; `{name}` is the last segment of the caller's SPIFFE ID path.
        common_name: Option<String>,
        /// Subject O values (Kubernetes groups when the certificate is a kube client cert).
        organizations: Vec<String>,
    },
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawKubernetes {
    #[serde(default)]
    groups: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSlurm {
    #[serde(default)]
    users: BTreeMap<String, String>,
    /// The cluster's SlurmUser (`slurm.conf`), refused like root.
    #[serde(default = "default_slurm_user")]
    slurm_user: String,
}

impl Default for RawSlurm {
    fn default() -> Self {
        Self {
            users: BTreeMap::new(),
            slurm_user: default_slurm_user(),
        }
    }
}

fn default_slurm_user() -> String {
    "slurm".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAwsStsProfile {
    role_arn: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVaultProfile {
    path: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawX509Profile {
    common_name: Option<String>,
    #[serde(default)]
    organizations: Vec<String>,
}

/// The per-kind sections a raw profile may carry.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawSections {
    pub(super) kubernetes: Option<RawKubernetes>,
    pub(super) slurm: Option<RawSlurm>,
    pub(super) aws_sts: Option<RawAwsStsProfile>,
    pub(super) vault: Option<RawVaultProfile>,
    pub(super) x509: Option<RawX509Profile>,
}

/// AWS requires `DurationSeconds` ≥ 900 for `AssumeRoleWithWebIdentity`.
pub const STS_MIN_TTL: Duration = Duration::from_secs(900);

fn printable(s: &str, max: usize) -> bool {
    !s.is_empty() && s.len() <= max && s.bytes().all(|b| (0x20..0x7f).contains(&b))
}

impl RawSections {
    /// The section matching `kind`; any other section is an error (a typo must not
    /// silently drop a setting).
    pub(super) fn resolve(
        self,
        profile: &str,
        kind: CredentialKind,
    ) -> Result<BackendProfile, ConfigError> {
        let present: Vec<&str> = [
            ("kubernetes", self.kubernetes.is_some()),
            ("slurm", self.slurm.is_some()),
            ("aws_sts", self.aws_sts.is_some()),
            ("vault", self.vault.is_some()),
            ("x509", self.x509.is_some()),
        ]
        .into_iter()
        .filter(|(_, p)| *p)
        .map(|(n, _)| n)
        .collect();
        let allowed = match kind {
            CredentialKind::KubernetesOidc => Some("kubernetes"),
            CredentialKind::Slurm => Some("slurm"),
            CredentialKind::AwsSts => Some("aws_sts"),
            CredentialKind::Vault => Some("vault"),
            CredentialKind::X509 => Some("x509"),
            CredentialKind::Jwt | CredentialKind::OciRegistry => None,
        };
        if let Some(extra) = present.iter().find(|s| Some(**s) != allowed) {
            return err(format!(
                "profile {profile}: a [profiles.{extra}] section does not fit kind {}",
                kind.as_str()
            ));
        }
        Ok(match kind {
            CredentialKind::Jwt | CredentialKind::OciRegistry => BackendProfile::None,
            CredentialKind::KubernetesOidc => {
                let groups = self.kubernetes.unwrap_or_default().groups;
                if groups.iter().any(|g| !printable(g, 256)) {
                    return err(format!(
                        "profile {profile}: kubernetes.groups must be printable, 1..=256 characters"
                    ));
                }
                BackendProfile::Kubernetes { groups }
            }
            CredentialKind::Slurm => {
                let RawSlurm { users, slurm_user } = self.slurm.unwrap_or_default();
                let forbidden_users = vec!["root".to_owned(), slurm_user];
                for (id, user) in &users {
                    if forbidden_users.contains(user) {
                        return err(format!(
                            "profile {profile}: slurm.users: {id} maps to {user:?}, which Slurm lets act as any user (root or the SlurmUser); the broker never mints such a token"
                        ));
                    }
                    SpiffeId::new(id).map_err(|e| {
                        ConfigError(format!("profile {profile}: slurm.users: {id:?}: {e}"))
                    })?;
                    let ok = !user.is_empty()
                        && user.len() <= 32
                        && user.bytes().all(|b| {
                            b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_'
                        });
                    if !ok {
                        return err(format!(
                            "profile {profile}: slurm.users: {user:?} is not a POSIX user name"
                        ));
                    }
                }
                BackendProfile::Slurm {
                    users,
                    forbidden_users,
                }
            }
            CredentialKind::AwsSts => {
                let Some(s) = self.aws_sts else {
                    return err(format!(
                        "profile {profile}: kind aws_sts needs [profiles.aws_sts] role_arn"
                    ));
                };
                if !s.role_arn.starts_with("arn:aws") || !printable(&s.role_arn, 2048) {
                    return err(format!(
                        "profile {profile}: aws_sts.role_arn must be an IAM role ARN"
                    ));
                }
                BackendProfile::AwsSts {
                    role_arn: s.role_arn,
                }
            }
            CredentialKind::Vault => {
                let Some(v) = self.vault else {
                    return err(format!(
                        "profile {profile}: kind vault needs [profiles.vault] path"
                    ));
                };
                let ok = printable(&v.path, 512)
                    && !v.path.starts_with('/')
                    && v.path.split('/').all(|seg| {
                        !seg.is_empty()
                            && seg != "."
                            && seg != ".."
                            && seg
                                .bytes()
                                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                    });
                if !ok {
                    return err(format!(
                        "profile {profile}: vault.path must be a relative Vault path like database/creds/ROLE"
                    ));
                }
                BackendProfile::Vault { path: v.path }
            }
            CredentialKind::X509 => {
                let x = self.x509.unwrap_or_default();
                if x.common_name.as_deref().is_some_and(|c| !printable(c, 64))
                    || x.organizations.iter().any(|o| !printable(o, 64))
                {
                    return err(format!(
                        "profile {profile}: x509 subject fields must be printable, 1..=64 characters"
                    ));
                }
                BackendProfile::X509 {
                    common_name: x.common_name,
                    organizations: x.organizations,
                }
            }
        })
    }
}

/// How the broker reaches Vault.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VaultConfig {
    /// Vault's address, e.g. `https://vault.internal:8200`.
    pub addr: String,
    /// Mount of the JWT auth method (default `jwt`).
    pub auth_mount: String,
    /// Role of the JWT auth method the broker logs in as.
    pub role: String,
    /// Audience of the broker's own JWT-SVID presented at login (default `vault`).
    pub audience: String,
    /// PEM bundle of CAs trusted for `https` (default: the system bundle).
    pub ca_file: Option<PathBuf>,
}

/// Where the broker calls STS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AwsStsConfig {
    /// STS endpoint, e.g. `https://sts.amazonaws.com` (a regional one in production).
    pub endpoint: String,
    /// `aud` of the web identity token (the IAM OIDC provider's client id).
    pub audience: String,
    /// PEM bundle of CAs trusted for `https` (default: the system bundle).
    pub ca_file: Option<PathBuf>,
}

/// The broker's issuing CA for X.509 profiles.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct X509CaConfig {
    /// The intermediate's certificate chain (PEM, intermediate first).
    pub cert: PathBuf,
    /// Its PKCS#8 private key (PEM, mode 0600).
    pub key: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawVault {
    addr: String,
    auth_mount: Option<String>,
    role: String,
    audience: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAwsSts {
    endpoint: String,
    audience: Option<String>,
    ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawX509Ca {
    cert: PathBuf,
    key: PathBuf,
}

fn http_url(field: &str, v: &str) -> Result<String, ConfigError> {
    let rest = v
        .strip_prefix("https://")
        .or_else(|| v.strip_prefix("http://"));
    match rest {
        Some(r) if !r.is_empty() && !r.contains(['?', '#', ' ']) => {
            Ok(v.trim_end_matches('/').to_owned())
        }
        _ => err(format!("{field}: {v:?} is not an http(s) URL")),
    }
}

impl RawVault {
    pub(super) fn resolve(self) -> Result<VaultConfig, ConfigError> {
        let mount = self.auth_mount.unwrap_or_else(|| "jwt".into());
        if !printable(&mount, 128) || mount.contains(['/', '?', '#']) {
            return err("vault.auth_mount: must be a mount name like jwt");
        }
        if !printable(&self.role, 128) {
            return err("vault.role: must be 1..=128 printable characters");
        }
        Ok(VaultConfig {
            addr: http_url("vault.addr", &self.addr)?,
            auth_mount: mount,
            role: self.role,
            audience: self.audience.unwrap_or_else(|| "vault".into()),
            ca_file: self.ca_file,
        })
    }
}

impl RawAwsSts {
    pub(super) fn resolve(self) -> Result<AwsStsConfig, ConfigError> {
        Ok(AwsStsConfig {
            endpoint: http_url("aws_sts.endpoint", &self.endpoint)?,
            audience: self.audience.unwrap_or_else(|| "sts.amazonaws.com".into()),
            ca_file: self.ca_file,
        })
    }
}

impl RawX509Ca {
    pub(super) fn resolve(self) -> X509CaConfig {
        X509CaConfig {
            cert: self.cert,
            key: self.key,
        }
    }
}

/// Checks what a profile of `kind` needs from the broker-wide sections and its TTLs.
pub(super) fn check_profile(
    name: &str,
    kind: CredentialKind,
    default_ttl: Duration,
    has_vault: bool,
    has_sts: bool,
) -> Result<(), ConfigError> {
    match kind {
        CredentialKind::Vault if !has_vault => {
            err(format!("profile {name}: kind vault needs a [vault] section"))
        }
        CredentialKind::AwsSts if !has_sts => {
            err(format!("profile {name}: kind aws_sts needs an [aws_sts] section"))
        }
        CredentialKind::AwsSts if default_ttl < STS_MIN_TTL => err(format!(
            "profile {name}: AWS STS issues for at least 15 minutes (DurationSeconds >= 900): default_ttl must be >= 15m"
        )),
        _ => Ok(()),
    }
}

/// The deadline a backend call gets when the profile names none.
pub const DEFAULT_BACKEND_DEADLINE: Duration = Duration::from_secs(5);

pub(super) fn deadline(profile: &str, v: Option<&str>) -> Result<Duration, ConfigError> {
    let d = duration(
        &format!("profile {profile}: deadline"),
        v,
        DEFAULT_BACKEND_DEADLINE,
    )?;
    if d.is_zero() || d > Duration::from_secs(60) {
        return err(format!(
            "profile {profile}: deadline must be between 1ms and 60s"
        ));
    }
    Ok(d)
}
