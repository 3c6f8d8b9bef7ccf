//! Idempotent `IssueCredential`: a client that retries with the same idempotency key and
//! the same request gets the same credential, never a second one.
//!
//! The broker must not keep credentials, so the one it issued is kept only sealed
//! (ChaCha20-Poly1305) under a key derived with HKDF-SHA256 from the client's idempotency
//! key, which the broker never stores (only its SHA-256). Whoever holds the idempotency
//! key — the client that made the request — can have the credential back; the ledger
//! file alone reveals nothing.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305, NONCE_LEN};
use ring::hkdf;
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::issuer::{Credential, Secret};

/// Shortest accepted idempotency key (it is the only secret protecting the sealed
/// credential, so it must carry real entropy: 22+ random base64 characters ≈ 128 bits).
pub const MIN_KEY_LEN: usize = 22;
/// Longest accepted idempotency key.
pub const MAX_KEY_LEN: usize = 256;

/// Parses an idempotency key from the network.
pub fn validate(key: &str) -> Result<(), BrokerError> {
    if key.len() < MIN_KEY_LEN
        || key.len() > MAX_KEY_LEN
        || !key.bytes().all(|b| (0x21..=0x7e).contains(&b))
    {
        return Err(BrokerError::InvalidArgument(format!(
            "idempotency_key must be {MIN_KEY_LEN}..={MAX_KEY_LEN} printable characters of real randomness"
        )));
    }
    Ok(())
}

/// Hex SHA-256 of the key (what the store indexes).
pub fn key_hash(key: &str) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, key.as_bytes()).as_ref())
}

fn aead_key(key: &str, caller: &str) -> Result<LessSafeKey, BrokerError> {
    let fail = || BrokerError::Internal("idempotency key derivation failed".into());
    let prk =
        hkdf::Salt::new(hkdf::HKDF_SHA256, b"spiffe-broker/idempotency/v1").extract(key.as_bytes());
    let info = [caller.as_bytes()];
    let okm = prk.expand(&info, &CHACHA20_POLY1305).map_err(|_| fail())?;
    let mut bytes = zeroize::Zeroizing::new([0u8; 32]);
    okm.fill(bytes.as_mut()).map_err(|_| fail())?;
    Ok(LessSafeKey::new(
        UnboundKey::new(&CHACHA20_POLY1305, bytes.as_ref()).map_err(|_| fail())?,
    ))
}

#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
enum Plain {
    Jwt {
        token: String,
        key_id: String,
    },
    Certificate {
        chain_pem: String,
        serial: String,
    },
    KeyValue {
        data: std::collections::BTreeMap<String, String>,
    },
}

/// Seals a credential under the client's idempotency key.
pub fn seal(key: &str, caller: &str, credential: &Credential) -> Result<Vec<u8>, BrokerError> {
    let plain = match credential {
        Credential::Jwt { token, key_id } => Plain::Jwt {
            token: token.expose().to_owned(),
            key_id: key_id.clone(),
        },
        Credential::Certificate { chain_pem, serial } => Plain::Certificate {
            chain_pem: chain_pem.clone(),
            serial: serial.clone(),
        },
        Credential::KeyValue { data } => Plain::KeyValue {
            data: data
                .iter()
                .map(|(k, v)| (k.clone(), v.expose().to_owned()))
                .collect(),
        },
    };
    let mut data = zeroize::Zeroizing::new(
        serde_json::to_vec(&plain).map_err(|e| BrokerError::Internal(e.to_string()))?,
    );
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| BrokerError::Internal("random source failed".into()))?;
    let mut out = data.to_vec();
    aead_key(key, caller)?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(caller.as_bytes()),
            &mut out,
        )
        .map_err(|_| BrokerError::Internal("sealing failed".into()))?;
    data.fill(0);
    let mut sealed = nonce.to_vec();
    sealed.extend_from_slice(&out);
    Ok(sealed)
}

/// Opens a sealed credential with the client's idempotency key.
pub fn open(key: &str, caller: &str, sealed: &[u8]) -> Result<Credential, BrokerError> {
    let bad = || {
        BrokerError::FailedPrecondition(
            "the stored credential cannot be opened with this idempotency key".into(),
        )
    };
    if sealed.len() < NONCE_LEN {
        return Err(bad());
    }
    let (nonce, ct) = sealed.split_at(NONCE_LEN);
    let nonce = Nonce::try_assume_unique_for_key(nonce).map_err(|_| bad())?;
    let mut buf = zeroize::Zeroizing::new(ct.to_vec());
    let plain = aead_key(key, caller)?
        .open_in_place(nonce, Aad::from(caller.as_bytes()), &mut buf)
        .map_err(|_| bad())?;
    match serde_json::from_slice::<Plain>(plain).map_err(|_| bad())? {
        Plain::Jwt { token, key_id } => Ok(Credential::Jwt {
            token: Secret::new(token),
            key_id,
        }),
        Plain::Certificate { chain_pem, serial } => {
            Ok(Credential::Certificate { chain_pem, serial })
        }
        Plain::KeyValue { mut data } => Ok(Credential::KeyValue {
            data: std::mem::take(&mut data)
                .into_iter()
                .map(|(k, v)| (k, Secret::new(v)))
                .collect(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sealed_credentials_open_only_with_the_key_and_caller() {
        let c = Credential::Jwt {
            token: Secret::new("header.payload.sig".into()),
            key_id: "k1".into(),
        };
        let key = "0123456789abcdefghijklmnopqrstuv";
        let sealed = seal(key, "spiffe://example.org/a", &c).expect("seal");
        assert!(!String::from_utf8_lossy(&sealed).contains("payload"));
        match open(key, "spiffe://example.org/a", &sealed).expect("open") {
            Credential::Jwt { token, key_id } => {
                assert_eq!(token.expose(), "header.payload.sig");
                assert_eq!(key_id, "k1");
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(open(
            "another-key-of-enough-length!!",
            "spiffe://example.org/a",
            &sealed
        )
        .is_err());
        assert!(open(key, "spiffe://example.org/b", &sealed).is_err());
        assert!(validate("short").is_err());
        assert!(validate(key).is_ok());
    }
}
