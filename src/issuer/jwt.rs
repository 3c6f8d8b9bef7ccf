//! ES256 JWTs signed by the broker's key ring, verifiable offline with its JWKS.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Credential, IssueError, Issuer, LeaseTerms, Minted, Order, Secret};
use crate::config::CredentialKind;
use crate::crypto::KeyRing;
use crate::jose::{self, b64, Alg};
use crate::policy::Grant;

use crate::jose::JwtClaims;

#[derive(Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Header {
    alg: String,
    kid: String,
    typ: String,
}

/// Mints JWTs with the current key of a [`KeyRing`].
pub struct JwtIssuer {
    keys: KeyRing,
    issuer_url: String,
}

impl JwtIssuer {
    /// An issuer signing as `issuer_url`.
    pub fn new(keys: KeyRing, issuer_url: String) -> Self {
        Self { keys, issuer_url }
    }

    /// The template: a pure function of the grant and the lease terms.
    pub fn template(&self, grant: &Grant, terms: &LeaseTerms) -> JwtClaims {
        JwtClaims {
            iss: self.issuer_url.clone(),
            sub: terms.subject.clone(),
            aud: grant.profile.audience.clone(),
            scope: grant
                .scopes
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(" "),
            iat: terms.issued_at,
            nbf: terms.issued_at,
            exp: terms.expires_at,
            jti: terms.lease_id.to_string(),
            profile: grant.profile.name.to_string(),
            cnf: terms
                .cnf_x5t_s256
                .map(|h| BTreeMap::from([("x5t#S256".to_owned(), b64(&h))])),
            intent: grant.intent.clone(),
            act: terms.act.clone(),
            may_act: terms.may_act.clone(),
        }
    }

    /// Re-reads a minted token and checks it against the template and the public key.
    fn validate(&self, token: &str, expected: &JwtClaims, kid: &str) -> Result<(), IssueError> {
        let parts = jose::split(token)
            .map_err(|e| IssueError::Internal(format!("minted token unreadable: {e}")))?;
        let header: Header = serde_json::from_slice(&parts.header)
            .map_err(|e| IssueError::Internal(format!("minted header: {e}")))?;
        if header.alg != "ES256" || header.kid != kid {
            return Err(IssueError::Internal(
                "minted header does not match the signing key".into(),
            ));
        }
        let jwk = self.keys.find(kid).ok_or_else(|| {
            IssueError::Internal("signing key is not in the published JWKS".into())
        })?;
        jose::verify(Alg::Es256, &jwk, parts.signing_input, &parts.signature)
            .map_err(|e| IssueError::Internal(format!("minted signature does not verify: {e}")))?;
        let claims: JwtClaims = serde_json::from_slice(&parts.payload)
            .map_err(|e| IssueError::Internal(format!("minted claims: {e}")))?;
        if &claims != expected {
            return Err(IssueError::Internal(
                "minted claims differ from the template".into(),
            ));
        }
        if claims.exp <= claims.iat {
            return Err(IssueError::Internal(
                "minted token expires before it is issued".into(),
            ));
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl Issuer for JwtIssuer {
    fn kind(&self) -> CredentialKind {
        CredentialKind::Jwt
    }

    async fn issue(&self, Order { grant, terms, .. }: Order<'_>) -> Result<Minted, IssueError> {
        self.mint(grant, terms).map(|credential| Minted {
            credential,
            expires_at: terms.expires_at,
            handle: None,
        })
    }
}

impl JwtIssuer {
    /// Signs a token for `grant` under `terms` (synchronous: no I/O).
    pub fn mint(&self, grant: &Grant, terms: &LeaseTerms) -> Result<Credential, IssueError> {
        let claims = self.template(grant, terms);
        let signer = self.keys.current();
        let header = Header {
            alg: signer.algorithm().to_owned(),
            kid: signer.key_id().to_owned(),
            typ: "JWT".to_owned(),
        };
        let input = jose::signing_input(&header, &claims).map_err(|e| IssueError::Internal(e.0))?;
        let sig = signer
            .sign(input.as_bytes())
            .map_err(|e| IssueError::Internal(e.0))?;
        let token = format!("{input}.{}", b64(&sig));
        self.validate(&token, &claims, signer.key_id())?;
        Ok(Credential::Jwt {
            token: Secret::new(token),
            key_id: signer.key_id().to_owned(),
        })
    }
}
