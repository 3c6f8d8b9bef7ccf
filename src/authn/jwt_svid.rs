//! JWT-SVID validation by the SPIFFE JWT-SVID specification.

use std::time::{Duration, SystemTime};

use serde::Deserialize;
use spiffe::SpiffeId;

use super::{workload_id, AuthMethod, AuthnError, TrustSource};
use crate::clock::unix_seconds;
use crate::jose::{self, Alg, Audience, Jwk, StrictHeader as Header};

#[derive(Deserialize)]
struct Claims {
    sub: String,
    aud: Audience,
    exp: i64,
    nbf: Option<i64>,
    iat: Option<i64>,
}

/// The validated claims of a JWT-SVID (all of them, as JSON).
pub type JwtSvidClaims = serde_json::Map<String, serde_json::Value>;

/// Validates a compact JWT-SVID for `audience` and returns its SPIFFE ID and claims.
///
/// Checks: size; header has only `alg`, `kid`, `typ`; `alg` in the RS/ES/PS allow-list;
/// `typ` absent, `JWT` or `JOSE`; `kid` names a key of the JWT bundle of the `sub`'s own
/// trust domain and the key type matches `alg`; signature; `aud` contains `audience`;
/// `exp` (required) and `nbf` with `skew` tolerance.
pub fn validate_jwt_svid(
    token: &str,
    trust: &dyn TrustSource,
    audience: &str,
    now: SystemTime,
    skew: Duration,
) -> Result<(SpiffeId, JwtSvidClaims), AuthnError> {
    validate(token, trust, audience, now, skew).map(|(id, claims, _)| (id, claims))
}

/// What a successful validation rested on: the key that verified the signature (under
/// its `kid`) and the token's time claims. Enough to tell later, without re-verifying,
/// whether the same token would still pass.
#[derive(Debug, Clone)]
pub(crate) struct Verification {
    pub kid: String,
    pub key: Jwk,
    pub exp: i64,
    pub nbf: Option<i64>,
    pub iat: Option<i64>,
}

impl Verification {
    /// The time checks of [`validate_jwt_svid`], at `t` with `skew` seconds.
    pub fn in_time(&self, t: i64, skew: i64) -> Result<(), &'static str> {
        if self.exp <= t - skew {
            return Err("JWT-SVID has expired");
        }
        if self.nbf.is_some_and(|nbf| nbf > t + skew) {
            return Err("JWT-SVID is not yet valid");
        }
        if self.iat.is_some_and(|iat| iat > t + skew) {
            return Err("JWT-SVID was issued in the future");
        }
        Ok(())
    }
}

/// [`validate_jwt_svid`], also returning what the validation rested on.
pub(crate) fn validate(
    token: &str,
    trust: &dyn TrustSource,
    audience: &str,
    now: SystemTime,
    skew: Duration,
) -> Result<(SpiffeId, JwtSvidClaims, Verification), AuthnError> {
    let fail = |r: String| AuthnError::new(r).via(AuthMethod::JwtSvid);
    let parts = jose::split(token).map_err(|e| fail(format!("malformed JWT-SVID: {e}")))?;
    let header: Header = serde_json::from_slice(&parts.header)
        .map_err(|e| fail(format!("JWT-SVID header refused: {e}")))?;
    let alg = Alg::parse(&header.alg).map_err(|e| fail(e.0))?;
    if let Some(typ) = header.typ.as_deref() {
        if typ != "JWT" && typ != "JOSE" {
            return Err(fail("JWT-SVID typ must be JWT or JOSE".into()));
        }
    }
    let kid = header
        .kid
        .ok_or_else(|| fail("JWT-SVID header has no kid".into()))?;
    let claims: Claims = serde_json::from_slice(&parts.payload)
        .map_err(|e| fail(format!("JWT-SVID claims refused: {e}")))?;
    let id = workload_id(&claims.sub).map_err(|e| e.via(AuthMethod::JwtSvid))?;
    let fail = |r: String| fail(r).claimed(id.to_string());

    let key = trust
        .jwt_authority(id.trust_domain_name(), &kid)
        .ok_or_else(|| fail("kid is not in the JWT bundle of the SVID's trust domain".into()))?;
    jose::verify(alg, &key, parts.signing_input, &parts.signature)
        .map_err(|e| fail(format!("JWT-SVID signature refused: {e}")))?;

    let auds = claims.aud.as_slice();
    if !auds.iter().any(|a| a == audience) {
        return Err(fail(
            "JWT-SVID audience does not include this broker".into(),
        ));
    }
    let verification = Verification {
        kid,
        key,
        exp: claims.exp,
        nbf: claims.nbf,
        iat: claims.iat,
    };
    verification
        .in_time(unix_seconds(now), skew.as_secs() as i64)
        .map_err(|e| fail(e.into()))?;
    let all: JwtSvidClaims = serde_json::from_slice(&parts.payload)
        .map_err(|e| fail(format!("JWT-SVID claims refused: {e}")))?;
    Ok((id, all, verification))
}
