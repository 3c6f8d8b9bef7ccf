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

use http::StatusCode;
use serde::Deserialize;
use serde_json::json;

use super::token::{registered_claims, sign_and_check};
use super::{Credential, IssueError, Issuer, LeaseTerms, Minted, Order, Secret};
use crate::config::{AwsStsConfig, BackendProfile, CredentialKind, STS_MIN_TTL};
use crate::crypto::KeyRing;
use crate::http_client::{HttpClient, Options, Trust};
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

/// A successful answer, as STS documents it (only what is read; other elements are
/// ignored):
///
/// ```xml
/// <AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
///   <AssumeRoleWithWebIdentityResult>
///     <AssumedRoleUser><Arn>…</Arn><AssumedRoleId>AROA…:session</AssumedRoleId></AssumedRoleUser>
///     <Credentials>
///       <AccessKeyId>…</AccessKeyId><SecretAccessKey>…</SecretAccessKey>
///       <SessionToken>…</SessionToken><Expiration>2026-01-01T00:00:00Z</Expiration>
///     </Credentials>
///   </AssumeRoleWithWebIdentityResult>
/// </AssumeRoleWithWebIdentityResponse>
/// ```
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleWithWebIdentityResponse {
    assume_role_with_web_identity_result: AssumeRoleResult,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumeRoleResult {
    #[serde(default)]
    credentials: Option<Credentials>,
    #[serde(default)]
    assumed_role_user: Option<AssumedRoleUser>,
}

/// The keys are moved into [`Secret`]s as soon as they are read.
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Credentials {
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
    #[serde(default)]
    session_token: Option<String>,
    #[serde(default)]
    expiration: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct AssumedRoleUser {
    #[serde(default)]
    assumed_role_id: Option<String>,
}

/// An error answer: `<ErrorResponse><Error><Type/><Code/><Message/></Error>…</ErrorResponse>`
/// as STS documents it; `<Errors><Error>…</Error></Errors>` inside, and a bare `<Error>` as
/// the root, are read too (seen from STS-compatible services).
#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ErrorResponse {
    #[serde(default)]
    error: Option<StsError>,
    #[serde(default)]
    errors: Option<ErrorList>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct ErrorList {
    #[serde(default)]
    error: Option<StsError>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct StsError {
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

impl ErrorResponse {
    /// `(Code, Message)`, empty when absent (or the body is not such a document).
    fn parse(xml: &str) -> (String, String) {
        let doc: ErrorResponse = quick_xml::de::from_str(xml).unwrap_or_default();
        let inner = doc.error.or(doc.errors.and_then(|e| e.error));
        let (code, message) = match inner {
            Some(e) => (e.code, e.message),
            None => (doc.code, doc.message),
        };
        (code.unwrap_or_default(), message.unwrap_or_default())
    }
}

/// What a successful answer yields.
struct Issued {
    access_key_id: Secret,
    secret_access_key: Secret,
    session_token: Secret,
    expiration: String,
    assumed_role_id: Option<String>,
}

impl Issued {
    fn parse(xml: &str) -> Result<Self, IssueError> {
        let doc: AssumeRoleWithWebIdentityResponse = quick_xml::de::from_str(xml)
            .map_err(|e| IssueError::Unavailable(format!("sts answer: {e}")))?;
        let result = doc.assume_role_with_web_identity_result;
        let missing = |tag: &str| IssueError::Unavailable(format!("sts answer without {tag}"));
        let creds = result.credentials.ok_or_else(|| missing("Credentials"))?;
        let field =
            |v: Option<String>, tag: &str| v.filter(|v| !v.is_empty()).ok_or_else(|| missing(tag));
        Ok(Self {
            expiration: field(creds.expiration, "Expiration")?,
            access_key_id: Secret::new(field(creds.access_key_id, "AccessKeyId")?),
            secret_access_key: Secret::new(field(creds.secret_access_key, "SecretAccessKey")?),
            session_token: Secret::new(field(creds.session_token, "SessionToken")?),
            assumed_role_id: result.assumed_role_user.and_then(|u| u.assumed_role_id),
        })
    }
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
        let internal =
            |e: &dyn std::fmt::Display| IssueError::Internal(format!("aws_sts.endpoint: {e}"));
        let http = HttpClient::new(&Options::new(Trust::from_ca_file(cfg.ca_file.as_deref())))
            .map_err(|e| internal(&e))?;
        if cfg.endpoint.starts_with("https://") && http.trust_anchors() == 0 {
            return Err(internal(
                &"https, but the platform's trust store has no CA certificate: set aws_sts.ca_file",
            ));
        }
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

#[async_trait::async_trait]
impl Issuer for StsIssuer {
    fn kind(&self) -> CredentialKind {
        CredentialKind::AwsSts
    }

    async fn issue(&self, Order { grant, terms, .. }: Order<'_>) -> Result<Minted, IssueError> {
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
        let req = http::Request::post(format!("{}/", self.cfg.endpoint))
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded; charset=utf-8",
            )
            .body(body.as_bytes().to_vec())
            .map_err(|e| IssueError::Internal(format!("sts request: {e}")))?;
        let resp = self
            .http
            .send(req)
            .await
            .map_err(|e| IssueError::Unavailable(format!("sts: {e}")))?;
        let text = String::from_utf8_lossy(&resp.body);
        if resp.status != StatusCode::OK {
            let (code, message) = ErrorResponse::parse(&text);
            let message: String = message.chars().take(300).collect();
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
        let issued = Issued::parse(&text)?;
        let expiration = issued.expiration;
        let expires = crate::clock::parse_rfc3339(&expiration)
            .ok_or_else(|| IssueError::Unavailable("sts answer: bad Expiration".into()))?;
        // Validate what was obtained: never longer-lived than the grant (one minute of
        // slack for STS rounding), never already expired.
        if expires > terms.expires_at + 60 || expires <= terms.issued_at {
            return Err(IssueError::Internal(format!(
                "sts granted credentials until {expiration}, outside the lease"
            )));
        }
        let data = BTreeMap::from([
            ("aws_access_key_id".to_owned(), issued.access_key_id),
            ("aws_secret_access_key".to_owned(), issued.secret_access_key),
            ("aws_session_token".to_owned(), issued.session_token),
        ]);
        Ok(Minted {
            credential: Credential::KeyValue { data },
            expires_at: expires.min(terms.expires_at),
            handle: issued.assumed_role_id,
        })
    }

    fn not_renewable(&self) -> Option<&'static str> {
        Some("AWS temporary credentials cannot be extended: request new ones")
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
    fn sts_answers_are_read_and_decoded() {
        let ok = r#"<AssumeRoleWithWebIdentityResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <AssumeRoleWithWebIdentityResult>
    <SubjectFromWebIdentityToken>spiffe://example.org/ml/model-runtime</SubjectFromWebIdentityToken>
    <AssumedRoleUser>
      <Arn>arn:aws:sts::123456789012:assumed-role/datasets/model-runtime@abc</Arn>
      <AssumedRoleId>AROA123EXAMPLE:model-runtime@abc</AssumedRoleId>
    </AssumedRoleUser>
    <Credentials>
      <SessionToken>a&amp;b&lt;c</SessionToken>
      <SecretAccessKey>wJalr/K7MDENG</SecretAccessKey>
      <Expiration>2026-11-18T11:06:40Z</Expiration>
      <AccessKeyId>ASIAEXAMPLE</AccessKeyId>
    </Credentials>
    <Audience>sts.amazonaws.com</Audience>
  </AssumeRoleWithWebIdentityResult>
  <ResponseMetadata><RequestId>ad4156e9-bce1-11e2-82e6-6b6efEXAMPLE</RequestId></ResponseMetadata>
</AssumeRoleWithWebIdentityResponse>"#;
        let i = Issued::parse(ok).unwrap();
        assert_eq!(i.access_key_id.expose(), "ASIAEXAMPLE");
        assert_eq!(i.secret_access_key.expose(), "wJalr/K7MDENG");
        assert_eq!(i.session_token.expose(), "a&b<c");
        assert_eq!(i.expiration, "2026-11-18T11:06:40Z");
        assert_eq!(
            i.assumed_role_id.as_deref(),
            Some("AROA123EXAMPLE:model-runtime@abc")
        );

        // A missing or empty key is an unusable answer, named.
        let no_token = ok.replace(
            "<SessionToken>a&amp;b&lt;c</SessionToken>",
            "<SessionToken></SessionToken>",
        );
        let Err(IssueError::Unavailable(why)) = Issued::parse(&no_token) else {
            panic!("an empty SessionToken must be refused");
        };
        assert!(why.contains("SessionToken"), "{why}");
        assert!(matches!(
            Issued::parse("<html>nope</html>"),
            Err(IssueError::Unavailable(_))
        ));
        assert!(Issued::parse("not xml <").is_err());
    }

    #[test]
    fn sts_errors_are_read_in_every_shape() {
        let documented = r#"<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
  <Error><Type>Sender</Type><Code>InvalidIdentityToken</Code><Message>Couldn&apos;t retrieve verification key</Message></Error>
  <RequestId>c6104cbe-af31-11e0-8154-cbc7ccf896c7</RequestId>
</ErrorResponse>"#;
        assert_eq!(
            ErrorResponse::parse(documented),
            (
                "InvalidIdentityToken".into(),
                "Couldn't retrieve verification key".into()
            )
        );
        let listed = "<ErrorResponse><Errors><Error><Code>Throttling</Code><Message>Rate exceeded</Message></Error></Errors></ErrorResponse>";
        assert_eq!(
            ErrorResponse::parse(listed),
            ("Throttling".into(), "Rate exceeded".into())
        );
        let bare = "<Error><Code>AccessDenied</Code><Message>no</Message></Error>";
        assert_eq!(
            ErrorResponse::parse(bare),
            ("AccessDenied".into(), "no".into())
        );
        assert_eq!(
            ErrorResponse::parse("<html>502</html>"),
            (String::new(), String::new())
        );
        assert_eq!(ErrorResponse::parse(""), (String::new(), String::new()));
    }
}
