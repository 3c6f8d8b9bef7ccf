//! `[[witnesses]]`: the witnesses each new checkpoint of the audit log is submitted to
//! (`c2sp.org/tlog-witness`), each with its pinned key.
//!
//! ```toml
//! [[witnesses]]
//! url = "https://witness.example/"          # its submission prefix
//! vkey = "witness.example/w1+1a2b3c4d+BASE64" # its verifier key, pinned here
//! ca_file = "witness-ca.pem"                # optional: the CAs for an https url
//! ```

use std::path::PathBuf;

use serde::Deserialize;

use super::{err, ConfigError};
use crate::cosignature::CosignerKey;

/// One witness.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WitnessConfig {
    /// Its submission prefix (`http://` or `https://`).
    pub url: String,
    /// Its pinned verifier key (the witness's name is the key's).
    pub key: CosignerKey,
    /// CAs for an `https` url (default: the platform's trust store).
    pub ca_file: Option<PathBuf>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawWitness {
    url: String,
    vkey: String,
    ca_file: Option<PathBuf>,
}

impl RawWitness {
    fn resolve(self) -> Result<WitnessConfig, ConfigError> {
        if !(self.url.starts_with("http://") || self.url.starts_with("https://")) {
            return err(format!("witnesses: url {:?} is not http(s)://", self.url));
        }
        let key = CosignerKey::parse(&self.vkey)
            .map_err(|e| ConfigError(format!("witnesses: {}: {e}", self.url)))?;
        Ok(WitnessConfig {
            url: self.url,
            key,
            ca_file: self.ca_file,
        })
    }
}

/// Every witness; two with one name are refused.
pub(super) fn witnesses(raw: Vec<RawWitness>) -> Result<Vec<WitnessConfig>, ConfigError> {
    let all = raw
        .into_iter()
        .map(RawWitness::resolve)
        .collect::<Result<Vec<_>, _>>()?;
    let mut names: Vec<_> = all.iter().map(|w| w.key.name()).collect();
    names.sort_unstable();
    if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
        return err(format!("witnesses: two witnesses named {:?}", w[0]));
    }
    Ok(all)
}
