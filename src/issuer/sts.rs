//! AWS temporary credentials through `AssumeRoleWithWebIdentity`.
//!
//! The broker mints a short OIDC token for the caller (`sub` = its SPIFFE ID, `aud` =
//! the IAM OIDC provider's client id, ES256, verifiable with the broker's JWKS), and
//! calls STS with the profile's role, a session name naming the caller and lease, a
//! duration equal to the granted TTL, and an inline session policy allowing exactly the
//! granted actions on the intent's target — so the credentials are never wider than the
//! grant, whatever the role allows. STS checks the token against the broker's discovery
//! document and JWKS; see docs/aws-iam-oidc.md.

use std::collections::BTreeMap;

use http::{Method, StatusCode};
use serde_json::json;

use super::http::HttpClient;
use super::token::{registered_claims, sign_and_check};
use super::{BoxFuture, Credential, IssueError, Issuer, LeaseTerms, Material, Minted, Secret};
use crate::config::{AwsStsConfig, BackendProfile, CredentialKind, STS_MIN_TTL};
use crate::crypto::KeyRing;
use crate::policy::Grant;

/// Lifetime of the web identity token (STS uses it once, at once).
pub const WEB_IDENTITY_TOKEN_TTL: i64 = 300;

/// Calls STS for `aws_sts` profiles.
pub struct StsIssuer {
    cfg: AwsStsConfig,
    keys: KeyRing,
    issuer_url: String,
    http: HttpClient,
}

/// Text of the first `<tag>…</tag>` in `xml`, entity-decoded. STS answers are small,
/// fixed documents; every field read here occurs once.
fn xml_text(xml: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    let raw = &xml[start..end];
    if raw.contains('<') {
        return None;
    }
    Some(
        raw.replace("&lt;", "<")
            .replace("&gt;", ">")
            .replace("&quot;", "\"")
            .replace("&apos;", "'")
            .replace("&amp;", "&"),
    )
}

/// `RoleSessionName`: `[\w+=,.@-]{2,64}`, naming the caller's last path segment and the lease.
pub fn session_name(subject: &str, lease_id: &str) -> String {
    let who: String = subject
        .rsplit('/')
        .next()
        .unwrap_or_default()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "_+=,.@-".contains(c) {
                c
            } else {
                '-'
            }
        })
        .take(30)
        .collect();
    let lease: String = lease_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(32)
        .collect();
    format!("{who}@{lease}").chars().take(64).collect()
}

/// The inline session policy: exactly the granted actions on the stated target.
pub fn session_policy(grant: &Grant) -> String {
    let actions: Vec<&str> = grant.scopes.iter().map(|s| s.as_str()).collect();
    let resource = grant
        .intent
        .as_ref()
        .map(|i| i.target.clone())
        .unwrap_or_else(|| "*".into());
    json!({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": actions, "Resource": [resource]}],
    })
    .to_string()
}

impl StsIssuer {
    /// An STS backend calling `cfg.endpoint`.
    pub fn new(cfg: AwsStsConfig, keys: KeyRing, issuer_url: String) -> Result<Self, IssueError> {
        let http = HttpClient::new(&cfg.endpoint, cfg.ca_file.as_deref())
            .map_err(|e| IssueError::Internal(format!("aws_sts.endpoint: {e}")))?;
        Ok(Self {
            cfg,
            keys,
            issuer_url,
            http,
        })
    }

    /// The form sent to STS (without the token): a pure function of grant and terms.
    pub fn template(
        &self,
        grant: &Grant,
        terms: &LeaseTerms,
    ) -> Result<Vec<(&'static str, String)>, IssueError> {
        let BackendProfile::AwsSts { role_arn } = &grant.profile.backend else {
            return Err(IssueError::Internal("not an aws_sts profile".into()));
        };
        let ttl = terms.expires_at - terms.issued_at;
        if ttl < STS_MIN_TTL.as_secs() as i64 {
            return Err(IssueError::Refused(format!(
                "AWS STS issues credentials for at least 15 minutes (DurationSeconds >= 900); ask for a ttl of 15m or more (asked {ttl}s)"
            )));
        }
        Ok(vec![
            ("Action", "AssumeRoleWithWebIdentity".into()),
            ("Version", "2011-06-15".into()),
            ("RoleArn", role_arn.clone()),
            (
                "RoleSessionName",
                session_name(&terms.subject, terms.lease_id.as_str()),
            ),
            ("DurationSeconds", ttl.to_string()),
            ("Policy", session_policy(grant)),
        ])
    }
}

impl Issuer for StsIssuer {
    fn kind(&self) -> CredentialKind {
        CredentialKind::AwsSts
    }

    fn remote(&self) -> bool {
        true
    }

    fn issue<'a>(
        &'a self,
        grant: &'a Grant,
        terms: &'a LeaseTerms,
        _material: &'a Material,
    ) -> BoxFuture<'a, Result<Minted, IssueError>> {
        Box::pin(async move {
            let form = self.template(grant, terms)?;
            let token_terms = LeaseTerms {
                expires_at: terms.issued_at + WEB_IDENTITY_TOKEN_TTL,
                ..terms.clone()
            };
            let claims = registered_claims(&self.issuer_url, &self.cfg.audience, &token_terms);
            let signer = self.keys.current();
            let token = sign_and_check(signer.as_ref(), signer.key_id(), &claims)?.token;
            let body = {
                let mut body = form_urlencoded::Serializer::new(String::new());
                for (k, v) in &form {
                    body.append_pair(k, v);
                }
                body.append_pair("WebIdentityToken", token.expose());
                zeroize::Zeroizing::new(body.finish())
            };
            let resp = self
                .http
                .send(
                    Method::POST,
                    "/",
                    &[(
                        "content-type",
                        "application/x-www-form-urlencoded; charset=utf-8",
                    )],
                    body.as_bytes().to_vec(),
                )
                .await
                .map_err(|e| IssueError::Unavailable(format!("sts: {e}")))?;
            let text = String::from_utf8_lossy(&resp.body);
            if resp.status != StatusCode::OK {
                let code = xml_text(&text, "Code").unwrap_or_default();
                let message: String = xml_text(&text, "Message")
                    .unwrap_or_default()
                    .chars()
                    .take(300)
                    .collect();
                let why = format!("HTTP {} {code}: {message}", resp.status.as_u16());
                return Err(
                    if resp.status.is_server_error()
                        || code == "Throttling"
                        || code == "IDPCommunicationError"
                    {
                        IssueError::Unavailable(format!("sts: {why}"))
                    } else {
                        IssueError::Refused(format!("AWS STS refused the role: {why}"))
                    },
                );
            }
            let field = |tag: &str| {
                xml_text(&text, tag)
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| IssueError::Unavailable(format!("sts answer without {tag}")))
            };
            let expiration = field("Expiration")?;
            let expires = time::OffsetDateTime::parse(
                &expiration,
                &time::format_description::well_known::Rfc3339,
            )
            .map_err(|_| IssueError::Unavailable("sts answer: bad Expiration".into()))?
            .unix_timestamp();
            // Validate what was obtained: never longer-lived than the grant (one minute of
            // slack for STS rounding), never already expired.
            if expires > terms.expires_at + 60 || expires <= terms.issued_at {
                return Err(IssueError::Internal(format!(
                    "sts granted credentials until {expiration}, outside the lease"
                )));
            }
            let data = BTreeMap::from([
                (
                    "aws_access_key_id".to_owned(),
                    Secret::new(field("AccessKeyId")?),
                ),
                (
                    "aws_secret_access_key".to_owned(),
                    Secret::new(field("SecretAccessKey")?),
                ),
                (
                    "aws_session_token".to_owned(),
                    Secret::new(field("SessionToken")?),
                ),
            ]);
            Ok(Minted {
                credential: Credential::KeyValue { data },
                expires_at: expires.min(terms.expires_at),
                handle: xml_text(&text, "AssumedRoleId"),
            })
        })
    }

    fn renew<'a>(
        &'a self,
        _grant: &'a Grant,
        _terms: &'a LeaseTerms,
        _handle: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Minted, IssueError>> {
        Box::pin(async {
            Err(IssueError::Refused(
                "AWS temporary credentials cannot be extended: request new ones".into(),
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_names_fit_aws_rules() {
        let n = session_name("spiffe://example.org/ml/model-runtime", "AbC_12-xyz");
        assert_eq!(n, "model-runtime@AbC12xyz");
        assert!(n.len() >= 2 && n.len() <= 64);
        let long = session_name(
            &format!("spiffe://e.org/{}", "x".repeat(100)),
            &"a".repeat(100),
        );
        assert!(long.len() <= 64);
    }

    #[test]
    fn xml_fields_are_read_and_decoded() {
        let x = "<R><Credentials><AccessKeyId>AK</AccessKeyId><SessionToken>a&amp;b</SessionToken></Credentials></R>";
        assert_eq!(xml_text(x, "AccessKeyId").as_deref(), Some("AK"));
        assert_eq!(xml_text(x, "SessionToken").as_deref(), Some("a&b"));
        assert_eq!(xml_text(x, "Credentials"), None);
        assert_eq!(xml_text(x, "Missing"), None);
    }
}
