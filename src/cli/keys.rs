//! `keys init | rotate`.

use std::path::PathBuf;

use super::error::CliError;
use super::output::*;

pub fn keys_init(state_dir: PathBuf, trust_domain: String) -> Result<(), CliError> {
    let dir = state_dir.join("keys");
    let ring = spiffe_broker::crypto::KeyRing::load_or_create(&dir)
        .and_then(|r| r.with_rsa(&dir))
        .map_err(fail)?;
    spiffe_broker::checkpoint::LogSigner::load_or_create(
        &dir,
        &format!("{trust_domain}/spiffe-broker/audit"),
    )
    .map_err(fail)?;
    spiffe_broker::checkpoint::LogSigner::load_or_create_as(
        &dir,
        "revocations",
        &format!("{trust_domain}/spiffe-broker/revocations"),
    )
    .map_err(fail)?;
    out!("{}", serde_json::to_string(&ring.jwks()).map_err(fail)?);
    Ok(())
}

pub fn keys_rotate(
    state_dir: PathBuf,
    publish_ahead: std::time::Duration,
    retain: std::time::Duration,
) -> Result<(), CliError> {
    use spiffe_broker::clock::Clock as _;
    let now = spiffe_broker::clock::SystemClock.unix_seconds();
    let r = spiffe_broker::crypto::rotate(&state_dir.join("keys"), now, publish_ahead, retain)
        .map_err(fail)?;
    out!("{}", serde_json::to_string(&r).map_err(fail)?);
    Ok(())
}
