//! DER → X.509-SVID validation; text → SPIFFE ID parsing.
//!
//! Input starting with `0x30` (a DER SEQUENCE) is a certificate chain: concatenated DER
//! certificates, leaf first (split at top-level TLV boundaries; anything unparseable is
//! one last element). It goes through `authn::validate_x509_svid` (client and server
//! role) against the dev CA bundle at the fixed time, and through the broker's
//! authenticator (mTLS peer chain, with its verified-chain cache) twice.
//!
//! Any other input is a SPIFFE ID: the broker's private `workload_id` check (canonical
//! form, path required, length bound) is reached through a JWT-SVID whose `sub` it is
//! (that check runs before any key is looked up), and compared with `spiffe::SpiffeId`.
//!
//! Invariants: no panic; an accepted chain has a leaf that x509-parser reads the same
//! way (one URI SAN equal to the returned ID, not a CA, digitalSignature without
//! keyCertSign/cRLSign, valid now) and whose signature x509-parser verifies under a
//! certificate of the chain or the bundle; the authenticator agrees with the validator,
//! the second time (cache hit) too.

use rustls::pki_types::CertificateDer;
use spiffe::SpiffeId;
use spiffe_broker::authn::{
    validate_jwt_svid, validate_x509_svid, AuthMethod, Authenticator as _, SvidRole,
    TransportFacts, MAX_CHAIN_LEN,
};
use spiffe_broker::clock::unix_seconds;
use spiffe_broker::dev::{BROKER_ID, TRUST_DOMAIN};
use spiffe_broker::jose::b64;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer as _, X509Certificate};

use super::fixture::{self, SKEW};

/// Longest chain the splitter builds (one past the limit, to reach that refusal).
const MAX_SPLIT: usize = MAX_CHAIN_LEN + 2;

/// Runs one input.
pub fn run(data: &[u8]) {
    if data.first() == Some(&0x30) {
        chain(data);
    } else {
        spiffe_id(&String::from_utf8_lossy(data));
    }
}

/// Splits concatenated DER at top-level TLV boundaries.
pub fn split_der(mut data: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    while !data.is_empty() && out.len() < MAX_SPLIT - 1 {
        match tlv_len(data) {
            Some(n) if n <= data.len() => {
                out.push(&data[..n]);
                data = &data[n..];
            }
            _ => break,
        }
    }
    if !data.is_empty() {
        out.push(data);
    }
    out
}

/// Length of the first DER TLV (tag, length, value), if its header is well-formed.
fn tlv_len(d: &[u8]) -> Option<usize> {
    let first = *d.get(1)?;
    if first < 0x80 {
        return Some(2 + first as usize);
    }
    let n = (first & 0x7f) as usize;
    if n == 0 || n > 4 {
        return None;
    }
    let mut len = 0usize;
    for i in 0..n {
        len = (len << 8) | *d.get(2 + i)? as usize;
    }
    Some(2 + n + len)
}

fn chain(data: &[u8]) {
    let fx = fixture::get();
    let chain: Vec<CertificateDer<'static>> = split_der(data)
        .into_iter()
        .map(|c| CertificateDer::from(c.to_vec()))
        .collect();
    let client = validate_x509_svid(&chain, fx.trust.as_ref(), fx.now, SvidRole::Client);
    let server = validate_x509_svid(&chain, fx.trust.as_ref(), fx.now, SvidRole::Server);
    for r in [&client, &server] {
        match r {
            Ok(id) => accepted(&chain, id),
            Err(e) => {
                assert_eq!(e.method, Some(AuthMethod::X509Svid));
                assert!(!e.reason.is_empty());
            }
        }
    }

    // The broker's entry point, twice: the second call may come from its cache.
    let facts = TransportFacts {
        peer_certs: Some(&chain),
        ..TransportFacts::default()
    };
    for round in 0..2 {
        match (fx.authn.authenticate(&facts), &client) {
            (Ok(c), Ok(id)) => {
                assert_eq!(c.workload(), Some(id), "round {round}");
                assert_eq!(c.method(), AuthMethod::X509Svid);
            }
            (Err(_), Err(_)) => {}
            (a, v) => panic!(
                "authenticator (round {round}) and validator disagree: {:?} vs {v:?}",
                a.map(|c| c.id().to_owned())
            ),
        }
    }
}

/// What an accepted chain must be, read independently with x509-parser.
fn accepted(chain: &[CertificateDer<'static>], id: &SpiffeId) {
    let fx = fixture::get();
    assert!(!chain.is_empty() && chain.len() <= MAX_CHAIN_LEN);
    let (rest, leaf) = X509Certificate::from_der(chain[0].as_ref()).expect("leaf parses");
    assert!(rest.is_empty());
    let san = leaf
        .subject_alternative_name()
        .expect("SAN well-formed")
        .expect("SAN present");
    let uris: Vec<&str> = san
        .value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        })
        .collect();
    assert_eq!(uris, [id.to_string().as_str()], "URI SANs vs accepted ID");
    assert_eq!(id.trust_domain_name(), TRUST_DOMAIN);
    assert!(!id.path().is_empty());
    assert!(!leaf.is_ca(), "accepted a CA as leaf");
    let ku = leaf.key_usage().expect("KU").expect("KU present");
    assert!(ku.value.digital_signature() && !ku.value.key_cert_sign() && !ku.value.crl_sign());
    let t = unix_seconds(fx.now);
    assert!(
        leaf.validity().not_before.timestamp() <= t && t <= leaf.validity().not_after.timestamp()
    );

    // Some issuer — an intermediate of the chain or the bundle's CA — signed this leaf.
    let ca = fx.ca.ca_der();
    let mut issuers: Vec<&[u8]> = chain[1..].iter().map(|c| c.as_ref()).collect();
    issuers.push(ca.as_ref());
    let signed = issuers.iter().any(|der| {
        X509Certificate::from_der(der)
            .is_ok_and(|(_, ca)| leaf.verify_signature(Some(ca.public_key())).is_ok())
    });
    assert!(signed, "accepted a leaf no certificate at hand signed");
}

/// SPIFFE ID text: `workload_id` (through a JWT-SVID `sub`) against `spiffe::SpiffeId`.
fn spiffe_id(s: &str) {
    let parsed = SpiffeId::new(s);
    if let Ok(id) = &parsed {
        let text = id.to_string();
        let again = SpiffeId::new(&text).expect("a SPIFFE ID's text re-parses");
        assert_eq!(&again, id);
        assert_eq!(again.to_string(), text, "to_string is not stable");
        assert!(!id.trust_domain_name().is_empty());
        assert!(id.path().is_empty() || id.path().starts_with('/'));
    }

    // An unsigned JWT-SVID: `sub` is checked before the key lookup, so the refusal
    // says whether the broker took `s` as a workload ID.
    let fx = fixture::get();
    let claims = serde_json::json!({"sub": s, "aud": BROKER_ID, "exp": i64::MAX});
    let token = format!(
        "{}.{}.{}",
        b64(br#"{"alg":"ES256","kid":"fuzz-no-such-key"}"#),
        b64(claims.to_string().as_bytes()),
        b64(b"sig")
    );
    let e = validate_jwt_svid(&token, fx.trust.as_ref(), BROKER_ID, fx.now, SKEW)
        .expect_err("unsigned token refused");
    let took_it = e.reason.starts_with("kid is not in the JWT bundle");
    if took_it {
        let id = parsed.expect("broker took an ID spiffe::SpiffeId refuses");
        assert_eq!(id.to_string(), s, "broker took a non-canonical ID");
        assert!(!id.path().is_empty(), "broker took an ID without a path");
        assert!(s.len() <= spiffe_broker::authn::MAX_SPIFFE_ID_LEN);
        assert_eq!(e.claimed.as_deref(), Some(s));
    } else {
        let canonical_workload = parsed.is_ok_and(|id| {
            id.to_string() == s
                && !id.path().is_empty()
                && s.len() <= spiffe_broker::authn::MAX_SPIFFE_ID_LEN
        });
        assert!(
            !canonical_workload,
            "broker refused the canonical workload ID {s:?}: {}",
            e.reason
        );
    }
}
