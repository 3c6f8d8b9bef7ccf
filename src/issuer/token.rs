//! Tokens for relying parties with their own claim rules: OCI registries (`access`),
//! Kubernetes JWT authenticators (`groups`), slurmrestd (`sun`, RS256), and the web
//! identity token the STS backend presents. One signing path for all of them: template
//! (pure) → sign → re-verify with the public key and compare with the template.

use std::sync::Arc;

use serde_json::{json, Map, Value};

use super::{oci, Credential, IssueError, Issuer, LeaseTerms, Minted, Order, Secret};
use crate::config::{BackendProfile, CredentialKind};
use crate::crypto::{libtrust_key_id, KeyRing, Signer};
use crate::jose::{self, b64, Alg};
use crate::policy::Grant;

/// A signed token and the key that signed it.
pub(crate) struct Signed {
    pub token: Secret,
    pub key_id: String,
}

/// Signs `claims` with `signer` under header `kid`, then re-reads the token and checks
/// the signature against the signer's public JWK and the claims against `claims`.
pub(crate) fn sign_and_check(
    signer: &dyn Signer,
    kid: &str,
    claims: &Map<String, Value>,
) -> Result<Signed, IssueError> {
    let alg = match signer.algorithm() {
        "ES256" => Alg::Es256,
        "RS256" => Alg::Rs256,
        other => return Err(IssueError::Internal(format!("unsupported alg {other}"))),
    };
    let header = json!({"alg": signer.algorithm(), "typ": "JWT", "kid": kid});
    let input = jose::signing_input(&header, claims).map_err(|e| IssueError::Internal(e.0))?;
    let sig = signer
        .sign(input.as_bytes())
        .map_err(|e| IssueError::Internal(e.0))?;
    let token = format!("{input}.{}", b64(&sig));
    // Validate what was minted, as a relying party would.
    let parts = jose::split(&token)
        .map_err(|e| IssueError::Internal(format!("minted token unreadable: {e}")))?;
    jose::verify(
        alg,
        &signer.public_jwk(),
        parts.signing_input,
        &parts.signature,
    )
    .map_err(|e| IssueError::Internal(format!("minted signature does not verify: {e}")))?;
    let got_header: Value = serde_json::from_slice(&parts.header)
        .map_err(|e| IssueError::Internal(format!("minted header: {e}")))?;
    let got: Map<String, Value> = serde_json::from_slice(&parts.payload)
        .map_err(|e| IssueError::Internal(format!("minted claims: {e}")))?;
    if got_header != header || &got != claims {
        return Err(IssueError::Internal(
            "minted token differs from the template".into(),
        ));
    }
    let (iat, exp) = (claims.get("iat"), claims.get("exp"));
    if !matches!((iat.and_then(Value::as_i64), exp.and_then(Value::as_i64)), (Some(i), Some(e)) if e > i)
    {
        return Err(IssueError::Internal(
            "minted token expires before it is issued".into(),
        ));
    }
    Ok(Signed {
        token: Secret::new(token),
        key_id: kid.to_owned(),
    })
}

/// The registered claims every token carries.
pub(crate) fn registered_claims(
    issuer_url: &str,
    audience: &str,
    terms: &LeaseTerms,
) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("iss".into(), json!(issuer_url));
    m.insert("sub".into(), json!(terms.subject));
    m.insert("aud".into(), json!(audience));
    m.insert("iat".into(), json!(terms.issued_at));
    m.insert("nbf".into(), json!(terms.issued_at));
    m.insert("exp".into(), json!(terms.expires_at));
    m.insert("jti".into(), json!(terms.lease_id.to_string()));
    if let Some(act) = &terms.act {
        m.insert("act".into(), json!(act));
    }
    if let Some(may) = &terms.may_act {
        m.insert("may_act".into(), json!(may));
    }
    m
}

/// Mints OCI registry, Kubernetes and Slurm tokens.
pub struct TokenIssuer {
    kind: CredentialKind,
    keys: KeyRing,
    issuer_url: String,
}

impl TokenIssuer {
    /// An issuer of `kind` tokens (`oci_registry`, `kubernetes_oidc` or `slurm`).
    pub fn new(kind: CredentialKind, keys: KeyRing, issuer_url: String) -> Self {
        Self {
            kind,
            keys,
            issuer_url,
        }
    }

    fn signer(&self) -> Result<(Arc<dyn Signer>, String), IssueError> {
        match self.kind {
            CredentialKind::Slurm => {
                let s = self.keys.rsa().cloned().ok_or_else(|| {
                    IssueError::Internal("slurm profiles need the RS256 key".into())
                })?;
                let kid = s.key_id().to_owned();
                Ok((s, kid))
            }
            CredentialKind::OciRegistry => {
                // The registry looks the key up in its rootcertbundle by libtrust id.
                let s = self.keys.current().clone();
                let kid = libtrust_key_id(&s.public_spki_der());
                Ok((s, kid))
            }
            _ => {
                let s = self.keys.current().clone();
                let kid = s.key_id().to_owned();
                Ok((s, kid))
            }
        }
    }

    /// The claims: a pure function of the grant and the lease terms.
    pub fn template(
        &self,
        grant: &Grant,
        terms: &LeaseTerms,
    ) -> Result<Map<String, Value>, IssueError> {
        let mut claims = registered_claims(&self.issuer_url, &grant.profile.audience, terms);
        let scopes: Vec<&str> = grant.scopes.iter().map(|s| s.as_str()).collect();
        // The broker's own claims ride along (relying parties ignore what they do not
        // know): what was granted, under which profile, for which stated intent, bound
        // to which client certificate.
        claims.insert("scope".into(), json!(scopes.join(" ")));
        claims.insert("profile".into(), json!(grant.profile.name.as_str()));
        if let Some(i) = &grant.intent {
            claims.insert(
                "intent".into(),
                serde_json::to_value(i).map_err(|e| IssueError::Internal(e.to_string()))?,
            );
        }
        if let Some(h) = terms.cnf_x5t_s256 {
            claims.insert("cnf".into(), json!({"x5t#S256": b64(&h)}));
        }
        match (&self.kind, &grant.profile.backend) {
            (CredentialKind::OciRegistry, _) => {
                claims.insert("access".into(), oci::access_claim(&scopes)?);
            }
            (CredentialKind::KubernetesOidc, BackendProfile::Kubernetes { groups }) => {
                claims.insert("groups".into(), json!(groups));
            }
            (
                CredentialKind::Slurm,
                BackendProfile::Slurm {
                    users,
                    forbidden_users,
                },
            ) => {
                let user = users.get(&terms.subject).ok_or_else(|| {
                    IssueError::Refused(format!(
                        "no Slurm user is mapped to {} on profile {:?}",
                        terms.subject,
                        grant.profile.name.as_str()
                    ))
                })?;
                // Config loading already refuses such a map; this holds even if it did not.
                if forbidden_users.contains(user) {
                    return Err(IssueError::Refused(format!(
                        "no Slurm token for {user:?}: Slurm lets it act as any user"
                    )));
                }
                claims.insert("sun".into(), json!(user));
            }
            (kind, _) => {
                return Err(IssueError::Internal(format!(
                    "profile {:?} is not a {} profile",
                    grant.profile.name.as_str(),
                    kind.as_str()
                )))
            }
        }
        Ok(claims)
    }
}

#[async_trait::async_trait]
impl Issuer for TokenIssuer {
    fn kind(&self) -> CredentialKind {
        self.kind
    }

    async fn issue(&self, Order { grant, terms, .. }: Order<'_>) -> Result<Minted, IssueError> {
        let claims = self.template(grant, terms)?;
        let (signer, kid) = self.signer()?;
        let signed = sign_and_check(signer.as_ref(), &kid, &claims)?;
        Ok(Minted {
            credential: Credential::Jwt {
                token: signed.token,
                key_id: signed.key_id,
            },
            expires_at: terms.expires_at,
            handle: None,
        })
    }
}
