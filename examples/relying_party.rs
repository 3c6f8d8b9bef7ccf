//! A relying party (say, a GPU scheduler's admission hook) accepting broker tokens
//! offline: JWKS through OIDC discovery (refreshed when an unknown key id shows up, so
//! key rotation just works), audience and expiry, the `cnf` binding to the client
//! certificate, and the signed revocation feed, synced every few seconds. If the feed
//! cannot be synced for longer than the staleness bound, every token is refused.
//!
//! ```sh
//! spiffe-broker dev --state-dir /tmp/sb &
//! cargo run --example relying_party -- http://127.0.0.1:8081 gpu-scheduler /tmp/sb/keys/revocations.vkey
//! # then paste tokens, one per line. A real relying party takes the client certificate
//! # from its own mTLS handshake; this demo has no TLS, so put the path of the caller's
//! # certificate PEM after the token to check the `cnf` binding against it.
//! ```

use std::io::BufRead;
use std::sync::Arc;
use std::time::Duration;

use spiffe_broker::relying_party::{RelyingParty, RpConfig, RpError};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, issuer, audience, feed_key_file] = args.as_slice() else {
        return Err("usage: relying_party ISSUER_URL AUDIENCE FEED_KEY_FILE".into());
    };
    let feed_key = std::fs::read_to_string(feed_key_file)?;
    let rp = Arc::new(RelyingParty::new(RpConfig::new(
        issuer, audience, &feed_key,
    )?));
    rp.refresh_keys().await?;
    rp.sync_revocations().await?;

    // Follow the feed in the background; a failed sync just leaves it to go stale.
    let follower = rp.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(5));
        loop {
            tick.tick().await;
            match follower.sync_revocations().await {
                Ok(0) => {}
                Ok(n) => eprintln!("revocation feed: {n} new revocations"),
                Err(e) => eprintln!("revocation feed: {e} (tokens will be refused once stale)"),
            }
        }
    });

    let lines = tokio::task::spawn_blocking(|| {
        std::io::stdin()
            .lock()
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    for line in lines.await? {
        let mut words = line.split_whitespace();
        let Some(token) = words.next() else { continue };
        let cert = match words.next() {
            Some(pem) => Some(first_cert_der(pem)?),
            None => None,
        };
        let mut verdict = rp.verify(token, cert.as_deref());
        if let Err(RpError::UnknownKey(_)) = verdict {
            // Key rotation: fetch the JWKS again, once.
            rp.refresh_keys().await?;
            verdict = rp.verify(token, cert.as_deref());
        }
        match verdict {
            Ok(c) => println!(
                "ACCEPT sub={} scope={:?} jti={} intent={:?}",
                c.sub, c.scope, c.jti, c.intent
            ),
            Err(e) => println!("REJECT {e}"),
        }
    }
    Ok(())
}

fn first_cert_der(path: &str) -> Result<Vec<u8>, Box<dyn std::error::Error>> {
    use rustls::pki_types::pem::PemObject;
    let pem = std::fs::read(path)?;
    let cert = rustls::pki_types::CertificateDer::pem_slice_iter(&pem)
        .next()
        .ok_or("no certificate in the PEM file")??;
    Ok(cert.as_ref().to_vec())
}
