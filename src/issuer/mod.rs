//! The `Issuer` seam: one implementation per backend. Issuance is build → sign →
//! validate: the template is a pure function of the grant and lease terms, and what was
//! minted is checked against it before it leaves.
//!
//! | kind | module | relying party |
//! |---|---|---|
//! | `jwt`, `oci_registry`, `kubernetes_oidc`, `slurm` | [`token`] | anything with our JWKS; a distribution registry; a Kubernetes JWT authenticator; slurmrestd |
//! | `aws_sts` | [`sts`] | AWS STS `AssumeRoleWithWebIdentity` |
//! | `vault` | [`vault`] | Vault (dynamic secrets, JWT auth) |
//! | `x509` | [`x509`] | any TLS server trusting the issuing CA |

mod jwt;
pub mod oci;
pub mod sts;
mod token;
pub mod vault;
pub mod x509;

use std::collections::BTreeMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;

use zeroize::Zeroizing;

use crate::config::CredentialKind;
use crate::domain::LeaseId;
use crate::policy::Grant;

pub use jwt::JwtIssuer;
pub use token::TokenIssuer;

/// Every backend the config needs, each ready to issue.
pub fn from_config(
    config: &crate::config::Config,
    keys: &crate::crypto::KeyRing,
    identity: std::sync::Arc<dyn vault::IdentityToken>,
) -> Result<Vec<std::sync::Arc<dyn Issuer>>, IssueError> {
    use std::sync::Arc;
    let url = config.issuer_url.clone();
    let mut out: Vec<Arc<dyn Issuer>> = vec![Arc::new(JwtIssuer::new(keys.clone(), url.clone()))];
    for kind in [
        CredentialKind::OciRegistry,
        CredentialKind::KubernetesOidc,
        CredentialKind::Slurm,
    ] {
        out.push(Arc::new(TokenIssuer::new(kind, keys.clone(), url.clone())));
    }
    if let Some(v) = &config.vault {
        out.push(Arc::new(vault::VaultIssuer::new(v.clone(), identity)?));
    }
    if let Some(s) = &config.aws_sts {
        out.push(Arc::new(sts::StsIssuer::new(s.clone(), keys.clone(), url)?));
    }
    match &config.x509 {
        Some(x) => out.push(Arc::new(x509::X509Issuer::new(x509::IssuingCa::load(x)?))),
        None if config
            .profiles
            .iter()
            .any(|p| p.kind == CredentialKind::X509) =>
        {
            return Err(IssueError::Internal(
                "x509 profiles need an [x509] section (cert, key of the issuing CA)".into(),
            ))
        }
        None => {}
    }
    Ok(out)
}

/// A boxed future, so the seam stays object-safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Secret text: zeroized on drop, redacted in `Debug`, never `Display`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Zeroizing<String>);

impl Secret {
    /// Wraps a secret.
    pub fn new(s: String) -> Self {
        Self(Zeroizing::new(s))
    }
    /// The secret itself: only for handing it to the requester.
    pub fn expose(&self) -> &str {
        &self.0
    }
    /// Hex SHA-256, the only form the ledger and logs ever see.
    pub fn sha256_hex(&self) -> String {
        hex::encode(ring::digest::digest(&ring::digest::SHA256, self.0.as_bytes()).as_ref())
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// Terms of the lease a credential is minted for.
#[derive(Debug, Clone)]
pub struct LeaseTerms {
    /// Lease id (the token's `jti`).
    pub lease_id: LeaseId,
    /// Holder's SPIFFE ID (the token's `sub`).
    pub subject: String,
    /// Unix seconds.
    pub issued_at: i64,
    /// Unix seconds.
    pub expires_at: i64,
    /// SHA-256 of the holder's mTLS certificate, for sender-constrained tokens.
    pub cnf_x5t_s256: Option<[u8; 32]>,
    /// Token exchange: the actors (the token's `act` claim).
    pub act: Option<crate::domain::delegation::Actor>,
    /// Who may exchange the token to act for its subject (its `may_act` claim).
    pub may_act: Option<crate::domain::delegation::MayAct>,
}

/// A minted credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// A signed JWT (broker, OCI registry, Kubernetes, Slurm tokens).
    Jwt {
        /// The compact JWS.
        token: Secret,
        /// Signing key id.
        key_id: String,
    },
    /// An X.509 certificate chain (leaf first); the private key stays with the caller.
    Certificate {
        /// PEM: the leaf, then the issuing CA chain.
        chain_pem: String,
        /// Hex serial of the leaf.
        serial: String,
    },
    /// Key/value secrets from a backend (Vault dynamic secret, AWS credentials).
    KeyValue {
        /// Names to secret values.
        data: BTreeMap<String, Secret>,
    },
}

impl Credential {
    /// A renewal that extended the holder's credential in place (Vault): nothing new
    /// to hand over.
    pub fn is_extension(&self) -> bool {
        matches!(self, Credential::KeyValue { data } if data.is_empty())
    }

    /// Hex SHA-256 of the credential (what the ledger records).
    pub fn sha256_hex(&self) -> String {
        match self {
            Credential::Jwt { token, .. } => token.sha256_hex(),
            Credential::Certificate { chain_pem, .. } => hex::encode(
                ring::digest::digest(&ring::digest::SHA256, chain_pem.as_bytes()).as_ref(),
            ),
            Credential::KeyValue { data } => {
                // Length-prefixed, so ("ab","c") and ("a","bc") differ.
                let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
                for (k, v) in data {
                    for part in [k.as_bytes(), v.expose().as_bytes()] {
                        ctx.update(&(part.len() as u64).to_be_bytes());
                        ctx.update(part);
                    }
                }
                hex::encode(ctx.finish().as_ref())
            }
        }
    }
}

/// What a backend minted, with the terms it actually granted.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The credential.
    pub credential: Credential,
    /// When it stops working; never later than the lease terms asked.
    pub expires_at: i64,
    /// The backend's own handle (Vault lease id, certificate serial, STS assumed-role id).
    pub handle: Option<String>,
}

/// What the caller brought besides the request.
#[derive(Debug, Clone, Default)]
pub struct Material {
    /// A PKCS#10 certificate signing request (DER), for `x509` profiles.
    pub csr_der: Option<Vec<u8>>,
}

/// What a backend is asked to mint.
#[derive(Clone, Copy)]
pub struct Order<'a> {
    /// What policy granted.
    pub grant: &'a Grant,
    /// The lease's terms (times, id).
    pub terms: &'a LeaseTerms,
    /// What the caller sent along (a CSR).
    pub material: &'a Material,
}

/// Why a backend could not issue.
#[derive(Debug, thiserror::Error)]
pub enum IssueError {
    /// The request cannot be served by this backend as asked (clear reason for the caller).
    #[error("{0}")]
    Refused(String),
    /// The backend is down, slow or answered with an error; retrying later may work.
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    /// A bug, a bad configuration, or a minted credential that failed validation.
    #[error("issuer: {0}")]
    Internal(String),
}

/// A credential backend.
///
/// Contract: `issue` returns a credential that exactly reflects the grant and terms
/// (scopes, audience, subject) and expires no later than `terms.expires_at`; it has
/// been validated after minting; it never widens the grant and never logs the
/// credential. `renew` extends what `issue` returned (same handle) or says it cannot.
/// `revoke` ends the credential in the backend; it is idempotent (revoking what is
/// already gone succeeds) and is retried by the broker until it succeeds.
#[async_trait::async_trait]
pub trait Issuer: Send + Sync + 'static {
    /// The profile kind this backend serves.
    fn kind(&self) -> CredentialKind;
    /// Whether issuing calls another service (and so runs under the profile's deadline).
    fn remote(&self) -> bool {
        self.kind().remote()
    }
    /// Mints a credential.
    async fn issue(&self, order: Order<'_>) -> Result<Minted, IssueError>;
    /// Why credentials of this backend cannot be renewed, if they cannot (a renewal is
    /// then refused with this reason); `None`: a renewal issues a fresh credential.
    fn not_renewable(&self) -> Option<&'static str> {
        None
    }
    /// Renews a credential issued earlier under `handle`: by default, a fresh one (or the
    /// refusal of [`Issuer::not_renewable`]).
    async fn renew(
        &self,
        grant: &Grant,
        terms: &LeaseTerms,
        handle: Option<&str>,
    ) -> Result<Minted, IssueError> {
        let _ = handle;
        if let Some(why) = self.not_renewable() {
            return Err(IssueError::Refused(why.into()));
        }
        static NONE: Material = Material { csr_der: None };
        self.issue(Order {
            grant,
            terms,
            material: &NONE,
        })
        .await
    }
    /// Ends the credential behind `handle` in the backend (stateless backends: nothing).
    async fn revoke(&self, handle: &str) -> Result<(), IssueError> {
        let _ = handle;
        Ok(())
    }
}
