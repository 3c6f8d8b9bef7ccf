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

pub fn keys_rotate(state_dir: PathBuf) -> Result<(), CliError> {
    let ring = spiffe_broker::crypto::KeyRing::rotate(&state_dir.join("keys")).map_err(fail)?;
    out!("{}", serde_json::to_string(&ring.jwks()).map_err(fail)?);
    Ok(())
}
