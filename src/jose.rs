//! The small part of JOSE the broker needs: compact JWS encoding, JWKs, and signature
//! verification with ring. Shared by the JWT issuer, the JWT-SVID authenticator and the
//! dev Workload API.

use std::collections::BTreeMap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ring::signature::{self, UnparsedPublicKey};
use serde::{Deserialize, Serialize};

use crate::domain::delegation::{Actor, MayAct};
use crate::domain::Intent;

/// Largest compact JWS the broker will parse (bytes).
pub const MAX_JWT_LEN: usize = 16 * 1024;

/// base64url without padding.
pub fn b64(data: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(data)
}

/// Decodes base64url without padding (padding or other alphabets are refused).
pub fn unb64(s: &str) -> Result<Vec<u8>, JoseError> {
    URL_SAFE_NO_PAD
        .decode(s)
        .map_err(|_| JoseError("malformed base64url".into()))
}

/// Why a JOSE object was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct JoseError(pub String);

/// A public JSON Web Key (RFC 7517) for EC P-256/P-384 or RSA.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// `EC` or `RSA`.
    pub kty: String,
    /// Key id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Intended use (`sig`).
    #[serde(rename = "use", skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
    /// Algorithm the key is for.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// EC curve.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// EC x coordinate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// EC y coordinate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub y: Option<String>,
    /// RSA modulus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub n: Option<String>,
    /// RSA exponent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub e: Option<String>,
}

/// A JWK Set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// Signature algorithms accepted on input. Everything else (`none`, `HS*`, `EdDSA`,
/// `ES512`) is refused before any key is looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alg {
    /// ECDSA P-256 SHA-256.
    Es256,
    /// ECDSA P-384 SHA-384.
    Es384,
    /// RSASSA-PKCS1-v1_5 SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 SHA-512.
    Rs512,
    /// RSASSA-PSS SHA-256.
    Ps256,
    /// RSASSA-PSS SHA-384.
    Ps384,
    /// RSASSA-PSS SHA-512.
    Ps512,
}

impl Alg {
    /// Parses an `alg` header value from the allow-list.
    pub fn parse(s: &str) -> Result<Self, JoseError> {
        Ok(match s {
            "ES256" => Alg::Es256,
            "ES384" => Alg::Es384,
            "RS256" => Alg::Rs256,
            "RS384" => Alg::Rs384,
            "RS512" => Alg::Rs512,
            "PS256" => Alg::Ps256,
            "PS384" => Alg::Ps384,
            "PS512" => Alg::Ps512,
            other => {
                return Err(JoseError(format!(
                    "alg {:?} is not allowed (RS*, ES256/384, PS* only)",
                    crate::domain::truncate(other)
                )))
            }
        })
    }
}

fn field(jwk: &Jwk, v: &Option<String>, name: &str) -> Result<Vec<u8>, JoseError> {
    let s = v
        .as_deref()
        .ok_or_else(|| JoseError(format!("JWK {:?} lacks {name}", jwk.kid)))?;
    unb64(s)
}

/// Verifies `signature` over `message` with `jwk` for `alg`; the key type and curve
/// must match the algorithm.
pub fn verify(alg: Alg, jwk: &Jwk, message: &[u8], sig: &[u8]) -> Result<(), JoseError> {
    let ec = |crv: &str, algo: &'static signature::EcdsaVerificationAlgorithm, len: usize| {
        if jwk.kty != "EC" || jwk.crv.as_deref() != Some(crv) {
            return Err(JoseError("key type does not match alg".into()));
        }
        let (x, y) = (field(jwk, &jwk.x, "x")?, field(jwk, &jwk.y, "y")?);
        if x.len() != len || y.len() != len {
            return Err(JoseError("malformed EC key".into()));
        }
        let mut point = Vec::with_capacity(1 + 2 * len);
        point.push(4);
        point.extend_from_slice(&x);
        point.extend_from_slice(&y);
        UnparsedPublicKey::new(algo, point)
            .verify(message, sig)
            .map_err(|_| JoseError("bad signature".into()))
    };
    let rsa = |params: &'static signature::RsaParameters| {
        if jwk.kty != "RSA" {
            return Err(JoseError("key type does not match alg".into()));
        }
        let n = field(jwk, &jwk.n, "n")?;
        let e = field(jwk, &jwk.e, "e")?;
        signature::RsaPublicKeyComponents { n: &n, e: &e }
            .verify(params, message, sig)
            .map_err(|_| JoseError("bad signature".into()))
    };
    match alg {
        Alg::Es256 => ec("P-256", &signature::ECDSA_P256_SHA256_FIXED, 32),
        Alg::Es384 => ec("P-384", &signature::ECDSA_P384_SHA384_FIXED, 48),
        Alg::Rs256 => rsa(&signature::RSA_PKCS1_2048_8192_SHA256),
        Alg::Rs384 => rsa(&signature::RSA_PKCS1_2048_8192_SHA384),
        Alg::Rs512 => rsa(&signature::RSA_PKCS1_2048_8192_SHA512),
        Alg::Ps256 => rsa(&signature::RSA_PSS_2048_8192_SHA256),
        Alg::Ps384 => rsa(&signature::RSA_PSS_2048_8192_SHA384),
        Alg::Ps512 => rsa(&signature::RSA_PSS_2048_8192_SHA512),
    }
}

/// The three parts of a compact JWS, decoded but not yet trusted.
#[derive(Debug)]
pub struct Compact<'a> {
    /// `header.payload`, the signed bytes.
    pub signing_input: &'a [u8],
    /// Decoded header JSON.
    pub header: Vec<u8>,
    /// Decoded payload JSON.
    pub payload: Vec<u8>,
    /// Decoded signature.
    pub signature: Vec<u8>,
}

/// Splits and decodes a compact JWS; refuses oversized or malformed input.
pub fn split(token: &str) -> Result<Compact<'_>, JoseError> {
    if token.len() > MAX_JWT_LEN {
        return Err(JoseError(format!("token longer than {MAX_JWT_LEN} bytes")));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JoseError(
            "not a compact JWS (three dot-separated parts)".into(),
        ));
    };
    Ok(Compact {
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        header: unb64(h)?,
        payload: unb64(p)?,
        signature: unb64(s)?,
    })
}

impl JwtClaims {
    /// Who acts for the subject, the current actor (the presenter) first; empty for a
    /// token the subject holds itself.
    pub fn actors(&self) -> Vec<&str> {
        self.act.as_ref().map(|a| a.chain()).unwrap_or_default()
    }
}

/// The header of a JWT from outside (a JWT-SVID, an ID token): only these parameters may
/// appear; `jku`, `x5u`, `jwk`, `crit` and anything else is refused (no key or processing
/// instructions from the sender).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StrictHeader {
    /// The algorithm (checked against [`Alg::parse`]'s allow-list).
    pub alg: String,
    /// The key id.
    pub kid: Option<String>,
    /// The type, if stated.
    pub typ: Option<String>,
}

/// An `aud` claim: one audience or several.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    /// A single string.
    One(String),
    /// An array.
    Many(Vec<String>),
}

impl Audience {
    /// Every audience named.
    pub fn as_slice(&self) -> &[String] {
        match self {
            Audience::One(a) => std::slice::from_ref(a),
            Audience::Many(v) => v.as_slice(),
        }
    }
}

/// Why a broker token did not verify.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenRefusal {
    /// Not a well-formed broker token.
    Malformed(String),
    /// Signed under a `kid` the key set does not have.
    UnknownKey(String),
    /// Bad signature, issuer, audience or times.
    Invalid(String),
}

/// What a broker token must be: issued by `issuer` for `audience`, valid at `now` with
/// `leeway` seconds either side.
pub struct Expected<'a> {
    /// The broker's issuer URL.
    pub issuer: &'a str,
    /// The audience the token must name.
    pub audience: &'a str,
    /// Unix seconds.
    pub now: i64,
    /// Clock tolerance in seconds.
    pub leeway: i64,
}

/// Verifies a broker-minted ES256 token: its header, the signature by the key its `kid`
/// names (`key_of`), issuer, audience and times. Revocation and the `cnf` binding are
/// for the caller, who knows what they mean to it.
pub fn verify_broker_token(
    token: &str,
    key_of: impl FnOnce(&str) -> Option<Jwk>,
    expected: &Expected<'_>,
) -> Result<JwtClaims, TokenRefusal> {
    #[derive(Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Header {
        alg: String,
        kid: String,
        #[allow(dead_code)]
        typ: Option<String>,
    }
    let parts = split(token).map_err(|e| TokenRefusal::Malformed(e.0))?;
    let header: Header = serde_json::from_slice(&parts.header)
        .map_err(|e| TokenRefusal::Malformed(format!("header: {e}")))?;
    if header.alg != "ES256" {
        return Err(TokenRefusal::Invalid(format!(
            "unexpected alg {}",
            header.alg
        )));
    }
    let key = key_of(&header.kid).ok_or_else(|| TokenRefusal::UnknownKey(header.kid.clone()))?;
    verify(Alg::Es256, &key, parts.signing_input, &parts.signature)
        .map_err(|_| TokenRefusal::Invalid("bad signature".into()))?;
    let claims: JwtClaims = serde_json::from_slice(&parts.payload)
        .map_err(|e| TokenRefusal::Malformed(format!("claims: {e}")))?;
    if claims.iss != expected.issuer {
        return Err(TokenRefusal::Invalid("wrong issuer".into()));
    }
    if claims.aud != expected.audience {
        return Err(TokenRefusal::Invalid("wrong audience".into()));
    }
    if claims.exp + expected.leeway <= expected.now {
        return Err(TokenRefusal::Invalid("expired".into()));
    }
    if claims.nbf - expected.leeway > expected.now {
        return Err(TokenRefusal::Invalid("not yet valid".into()));
    }
    Ok(claims)
}

/// Encodes `header.payload` ready for signing.
pub fn signing_input(
    header: &impl Serialize,
    payload: &impl Serialize,
) -> Result<String, JoseError> {
    let h = serde_json::to_vec(header).map_err(|e| JoseError(e.to_string()))?;
    let p = serde_json::to_vec(payload).map_err(|e| JoseError(e.to_string()))?;
    Ok(format!("{}.{}", b64(&h), b64(&p)))
}

/// Claims of a broker-minted JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwtClaims {
    /// The broker's issuer URL.
    pub iss: String,
    /// The holder's SPIFFE ID.
    pub sub: String,
    /// The profile's audience.
    pub aud: String,
    /// Granted scopes, space-separated (RFC 8693 style).
    pub scope: String,
    /// Issued at.
    pub iat: i64,
    /// Not before.
    pub nbf: i64,
    /// Expiry.
    pub exp: i64,
    /// Lease id.
    pub jti: String,
    /// Profile name.
    pub profile: String,
    /// Confirmation: `x5t#S256` of the holder's mTLS certificate (RFC 8705).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cnf: Option<BTreeMap<String, String>>,
    /// The stated intent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub intent: Option<Intent>,
    /// Who acts for the subject, the current actor outermost (RFC 8693 §4.1); set only
    /// on credentials issued by token exchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// Who may exchange this token to act for its subject (RFC 8693 §4.4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub may_act: Option<MayAct>,
}
