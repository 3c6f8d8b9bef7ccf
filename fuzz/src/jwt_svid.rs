//! Compact JWS text → `jose::split`, `authn::validate_jwt_svid` and the broker's
//! authenticator (`authorization: Bearer …`), against the dev CA's JWT bundle at the
//! fixed time, for audience `spiffe://example.org/spiffe-broker`.
//!
//! Invariants: no panic; `split` accepts only the canonical encoding (re-encoding gives
//! the input back, so one signature has one token); an accepted JWT-SVID is signed by a
//! bundle key, names a workload of its own trust domain in `sub`, this broker in `aud`,
//! and is within `exp`/`nbf`/`iat` (with skew); the authenticator agrees with the
//! validator.

use serde_json::Value;
use spiffe_broker::authn::{validate_jwt_svid, AuthMethod, Authenticator as _, TransportFacts};
use spiffe_broker::clock::unix_seconds;
use spiffe_broker::dev::{BROKER_ID, TRUST_DOMAIN};
use spiffe_broker::jose::{self, b64, MAX_JWT_LEN};

use super::fixture::{self, SKEW};

/// Runs one input (non-UTF-8 is lossily converted: metadata is text by then).
pub fn run(data: &[u8]) {
    let token = String::from_utf8_lossy(data);
    check(&token);
}

fn check(token: &str) {
    if let Ok(parts) = jose::split(token) {
        assert!(token.len() <= MAX_JWT_LEN);
        let again = format!(
            "{}.{}.{}",
            b64(&parts.header),
            b64(&parts.payload),
            b64(&parts.signature)
        );
        assert_eq!(again, token, "split accepted a non-canonical encoding");
        let input = std::str::from_utf8(parts.signing_input).expect("signing input is text");
        assert_eq!(
            format!("{input}.{}", b64(&parts.signature)),
            token,
            "signing input is not header.payload"
        );
    }

    let fx = fixture::get();
    let direct = validate_jwt_svid(token, fx.trust.as_ref(), BROKER_ID, fx.now, SKEW);
    match &direct {
        Ok((id, claims)) => {
            let parts = jose::split(token).expect("accepted token splits");
            let header: Value = serde_json::from_slice(&parts.header).expect("header JSON");
            let header = header.as_object().expect("header object");
            assert!(
                header
                    .keys()
                    .all(|k| matches!(k.as_str(), "alg" | "kid" | "typ")),
                "accepted header parameters beyond alg/kid/typ: {header:?}"
            );
            let kid = header["kid"].as_str().expect("kid");
            assert!(
                fx.ca
                    .jwt_bundle()
                    .keys
                    .iter()
                    .any(|k| k.kid.as_deref() == Some(kid)),
                "accepted a kid outside the bundle"
            );
            let payload: Value = serde_json::from_slice(&parts.payload).expect("claims JSON");
            assert_eq!(Value::Object(claims.clone()), payload);
            assert_eq!(payload["sub"].as_str(), Some(id.to_string().as_str()));
            assert_eq!(id.trust_domain_name(), TRUST_DOMAIN);
            assert!(!id.path().is_empty(), "accepted a sub without a path");
            let aud_ok = match &payload["aud"] {
                Value::String(a) => a == BROKER_ID,
                Value::Array(v) => v.iter().any(|a| a.as_str() == Some(BROKER_ID)),
                _ => false,
            };
            assert!(aud_ok, "accepted without this broker in aud");
            let t = unix_seconds(fx.now);
            let skew = SKEW.as_secs() as i64;
            assert!(payload["exp"].as_i64().expect("exp") > t - skew, "expired");
            if let Some(nbf) = payload.get("nbf") {
                assert!(nbf.as_i64().expect("nbf") <= t + skew, "not yet valid");
            }
            if let Some(iat) = payload.get("iat") {
                assert!(
                    iat.as_i64().expect("iat") <= t + skew,
                    "issued in the future"
                );
            }
        }
        Err(e) => {
            assert_eq!(e.method, Some(AuthMethod::JwtSvid));
            assert!(!e.reason.is_empty());
        }
    }

    // The broker's own entry: the bearer token in the metadata.
    let header = format!("Bearer {token}");
    let facts = TransportFacts {
        authorization: Some(&header),
        ..TransportFacts::default()
    };
    match (fx.authn.authenticate(&facts), &direct) {
        (Ok(c), Ok((id, _))) => {
            assert_eq!(c.workload(), Some(id));
            assert_eq!(c.method(), AuthMethod::JwtSvid);
        }
        (Err(_), Err(_)) => {}
        // The authenticator trims the token; only then may the two differ.
        (Ok(_), Err(_)) => assert_ne!(
            token.trim(),
            token,
            "authenticator accepted a token the validator refused"
        ),
        (Err(_), Ok(_)) => panic!("authenticator refused a token the validator accepted"),
    }
}
