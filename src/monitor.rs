//! A monitor of the audit log (`spiffe-broker monitor`), like a Certificate Transparency
//! monitor for credentials: it follows the broker's signed (and witnessed) checkpoints,
//! reads the new entries from the public `/log/entries` pages, checks that they are
//! exactly the tree the checkpoint signs, and reports the entries that concern what it
//! watches: an identity pattern, a profile, an entry kind, break-glass.
//!
//! The monitor keeps the right edge of the tree it has verified (a [`Frontier`]: one hash
//! per set bit of the size) in its state file. Appending the new entries to it must
//! reproduce the new checkpoint's root, which proves at once that the entries are the
//! ones signed and that the new tree extends the one verified before (no consistency
//! proof needed: the monitor recomputed it). A page that does not (a forged or altered
//! entry, a rewritten history, a smaller tree) stops the monitor with an error; nothing of
//! that batch is reported and its state does not move.
//!
//! Reports are JSON lines; the state is saved after a batch is reported, so a restart
//! reports nothing twice (a crash between the two can repeat one batch: consumers may
//! dedupe on `seq`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use crate::checkpoint::{Checkpoint, VerifierKey};
use crate::cosignature::WitnessPolicy;
use crate::http_client::HttpClient;
use crate::merkle::{leaf_hash, Frontier, Hash};

/// Why a poll failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MonitorError {
    /// The log could not be read (down, no checkpoint yet, a network error): try again.
    #[error("log unreachable: {0}")]
    Unreachable(String),
    /// What the log served does not verify, or the state is unusable: stop.
    #[error("{0}")]
    Invalid(String),
}

fn fail<T>(m: impl Into<String>) -> Result<T, MonitorError> {
    Err(MonitorError::Invalid(m.into()))
}

/// What a monitor watches; an entry matching any watch is reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    /// A SPIFFE ID, or a prefix ending in `*` (`spiffe://example.org/ci/*`): entries that
    /// name it anywhere (caller, subject, actors, approvers), and later entries on the
    /// leases issued to it (renewals, revocations, expiry).
    Identity(String),
    /// `profile=NAME`: requests for this profile.
    Profile(String),
    /// `kind=KIND`: entries of this kind (`issue`, `revoke`, `review`, …), or
    /// `kind=break-glass`: break-glass issuances.
    Kind(String),
}

impl Watch {
    /// Parses `spiffe://…[*]`, `profile=NAME` or `kind=KIND`.
    pub fn parse(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("profile=") {
            return Ok(Watch::Profile(p.to_owned()));
        }
        if let Some(k) = s.strip_prefix("kind=") {
            return Ok(Watch::Kind(k.to_owned()));
        }
        if s.starts_with("spiffe://") && !s[..s.len().saturating_sub(1)].contains('*') {
            return Ok(Watch::Identity(s.to_owned()));
        }
        Err(format!(
            "--watch {s:?}: expected spiffe://ID (a trailing * matches a prefix), profile=NAME or kind=KIND"
        ))
    }

    fn names(&self, id: &str) -> bool {
        match self {
            Watch::Identity(p) => match p.strip_suffix('*') {
                Some(prefix) => id.starts_with(prefix),
                None => id == p,
            },
            _ => false,
        }
    }

    fn matches(&self, entry: &serde_json::Value) -> bool {
        match self {
            Watch::Identity(_) => spiffe_ids(entry).iter().any(|id| self.names(id)),
            Watch::Profile(p) => entry["request"]["profile"].as_str() == Some(p),
            Watch::Kind(k) if k == "break-glass" => entry["break_glass"] == true,
            Watch::Kind(k) => entry["kind"].as_str() == Some(k),
        }
    }
}

/// Every SPIFFE ID an entry names, wherever it sits.
fn spiffe_ids(v: &serde_json::Value) -> Vec<&str> {
    match v {
        serde_json::Value::String(s) if s.starts_with("spiffe://") => vec![s.as_str()],
        serde_json::Value::Array(a) => a.iter().flat_map(spiffe_ids).collect(),
        serde_json::Value::Object(o) => o.values().flat_map(spiffe_ids).collect(),
        _ => Vec::new(),
    }
}

/// The monitor's saved position.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct MonitorState {
    /// Entries verified.
    size: u64,
    /// The verified tree's right edge (hex), largest subtree first.
    frontier: Vec<String>,
    /// The last checkpoint verified.
    checkpoint: Option<String>,
    /// Leases issued to watched identities, with their expiry (Unix s), so their later
    /// entries (renew, revoke, expire) are reported too.
    leases: BTreeMap<String, i64>,
}

/// One reported entry.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Report {
    /// The entry's sequence number (1-based; its leaf index + 1).
    pub seq: u64,
    /// The checkpoint size that covers it.
    pub checkpoint_size: u64,
    /// The entry (the log's canonical JSON, parsed).
    pub entry: serde_json::Value,
}

/// A verified batch, not yet committed to the state file.
#[derive(Debug)]
pub struct Batch {
    /// The matching entries, in log order.
    pub reports: Vec<Report>,
    /// The checkpoint verified.
    pub checkpoint: Checkpoint,
    next: MonitorState,
}

/// How a monitor runs.
#[derive(Debug, Clone)]
pub struct MonitorOptions {
    /// The broker's HTTP base URL (`http://broker:8080`).
    pub log_url: String,
    /// The log's pinned verifier key.
    pub log_key: VerifierKey,
    /// Witnesses whose cosignatures a checkpoint needs (recommended).
    pub witnesses: Option<WitnessPolicy>,
    /// What to report.
    pub watches: Vec<Watch>,
    /// The state file.
    pub state: PathBuf,
}

/// A monitor.
#[derive(Debug)]
pub struct Monitor {
    options: MonitorOptions,
    client: HttpClient,
    state: MonitorState,
}

/// Most entries asked for per page.
const PAGE: u64 = 1000;

impl Monitor {
    /// A monitor resuming from its state file (a new one starts at entry 1).
    pub fn open(options: MonitorOptions, client: HttpClient) -> Result<Self, MonitorError> {
        let state = match std::fs::read(&options.state) {
            Ok(b) => serde_json::from_slice(&b).map_err(|e| {
                MonitorError::Invalid(format!(
                    "{}: not a monitor state: {e}",
                    options.state.display()
                ))
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => MonitorState::default(),
            Err(e) => return fail(format!("{}: {e}", options.state.display())),
        };
        Ok(Self {
            options,
            client,
            state,
        })
    }

    /// Entries verified so far.
    pub fn size(&self) -> u64 {
        self.state.size
    }

    /// Fetches and verifies the latest checkpoint and every entry up to it; returns the
    /// matches. Nothing is saved until [`commit`](Self::commit).
    pub async fn poll(&self) -> Result<Batch, MonitorError> {
        let note = self.get(&format!("{}/log/checkpoint", self.base())).await?;
        let note = String::from_utf8(note)
            .map_err(|_| MonitorError::Invalid("checkpoint is not UTF-8".into()))?;
        let cp = self
            .options
            .log_key
            .verify(&note)
            .map_err(|e| MonitorError::Invalid(format!("checkpoint: {e}")))?;
        if let Some(policy) = &self.options.witnesses {
            policy.check(&note).map_err(|e| {
                MonitorError::Invalid(format!("checkpoint of size {}: {e}", cp.size))
            })?;
        }
        let mut frontier = self.frontier()?;
        if cp.size < self.state.size {
            return fail(format!(
                "the log's checkpoint has {} entries, fewer than the {} already verified: rolled back",
                cp.size, self.state.size
            ));
        }
        let mut next = self.state.clone();
        let mut reports = Vec::new();
        while frontier.size() < cp.size {
            let start = frontier.size();
            let limit = PAGE.min(cp.size - start);
            let page = self.page(start, limit).await?;
            if page.is_empty() {
                return fail(format!(
                    "the log served no entries from {start} below its checkpoint {}",
                    cp.size
                ));
            }
            for (i, e) in page.iter().enumerate() {
                let seq = start + i as u64 + 1;
                if e.seq != seq {
                    return fail(format!("entry {seq} was served as {}", e.seq));
                }
                if frontier.size() == cp.size {
                    break;
                }
                frontier.append(leaf_hash(e.body.as_bytes()));
                let entry: serde_json::Value = serde_json::from_str(&e.body).map_err(|err| {
                    MonitorError::Invalid(format!("entry {seq} is not JSON: {err}"))
                })?;
                if self.wanted(&entry, &mut next.leases) {
                    reports.push(Report {
                        seq,
                        checkpoint_size: cp.size,
                        entry,
                    });
                }
            }
        }
        if frontier.root() != cp.root {
            return fail(format!(
                "entries {}..={} do not make the checkpoint's root: forged or altered entries, \
                 or a rewritten history",
                self.state.size + 1,
                cp.size
            ));
        }
        let now = reports
            .last()
            .and_then(|r| r.entry["time_ms"].as_i64())
            .map(|ms| ms / 1000);
        if let Some(now) = now {
            next.leases.retain(|_, exp| *exp >= now);
        }
        next.size = cp.size;
        next.frontier = frontier.hashes().iter().map(hex::encode).collect();
        next.checkpoint = Some(note);
        Ok(Batch {
            reports,
            checkpoint: cp,
            next,
        })
    }

    /// Saves the batch's position (after its reports went out).
    pub fn commit(&mut self, batch: Batch) -> Result<(), MonitorError> {
        let bytes = serde_json::to_vec_pretty(&batch.next)
            .map_err(|e| MonitorError::Invalid(format!("state: {e}")))?;
        crate::files::write_atomic(&self.options.state, &bytes, 0o600)
            .map_err(|e| MonitorError::Invalid(format!("state not saved: {e}")))?;
        self.state = batch.next;
        Ok(())
    }

    fn base(&self) -> &str {
        self.options.log_url.trim_end_matches('/')
    }

    fn frontier(&self) -> Result<Frontier, MonitorError> {
        let hashes = self
            .state
            .frontier
            .iter()
            .map(|h| {
                hex::decode(h)
                    .ok()
                    .and_then(|b| Hash::try_from(b).ok())
                    .ok_or_else(|| {
                        MonitorError::Invalid("state: a frontier hash is not hex SHA-256".into())
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Frontier::from_hashes(self.state.size, &hashes).ok_or_else(|| {
            MonitorError::Invalid("state: the frontier does not fit its size".into())
        })
    }

    /// Whether an entry is reported; remembers leases issued to watched identities.
    fn wanted(&self, entry: &serde_json::Value, leases: &mut BTreeMap<String, i64>) -> bool {
        let direct = self.options.watches.iter().any(|w| w.matches(entry));
        let lease = entry["lease_id"].as_str();
        let follows = lease.is_some_and(|l| leases.contains_key(l))
            || entry["affected_leases"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|l| l.as_str().is_some_and(|l| leases.contains_key(l)))
            });
        if direct {
            if let (Some(l), Some(exp)) = (lease, entry["expires_at"].as_i64()) {
                leases.insert(l.to_owned(), exp);
            }
        }
        direct || follows
    }

    async fn get(&self, url: &str) -> Result<Vec<u8>, MonitorError> {
        self.client
            .get_ok(url)
            .await
            .map(|b| b.to_vec())
            .map_err(|e| MonitorError::Unreachable(e.to_string()))
    }

    async fn page(&self, start: u64, limit: u64) -> Result<Vec<PageEntry>, MonitorError> {
        let url = format!("{}/log/entries?start={start}&limit={limit}", self.base());
        let page: EntriesPage = serde_json::from_slice(&self.get(&url).await?)
            .map_err(|e| MonitorError::Invalid(format!("entries page from {start}: {e}")))?;
        Ok(page.entries)
    }
}

#[derive(serde::Deserialize)]
struct EntriesPage {
    entries: Vec<PageEntry>,
}

#[derive(serde::Deserialize)]
struct PageEntry {
    seq: u64,
    body: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn watches_parse_and_match() {
        let entry = serde_json::json!({
            "kind": "issue",
            "caller": "spiffe://example.org/ci/deploy-agent",
            "request": {"profile": "model-registry-push"},
            "break_glass": false,
        });
        let w = |s: &str| Watch::parse(s).expect(s);
        assert!(w("spiffe://example.org/ci/*").matches(&entry));
        assert!(w("spiffe://example.org/ci/deploy-agent").matches(&entry));
        assert!(
            !w("spiffe://example.org/ci/deploy").matches(&entry),
            "exact unless *"
        );
        assert!(!w("spiffe://example.org/ml/*").matches(&entry));
        assert!(w("profile=model-registry-push").matches(&entry));
        assert!(w("kind=issue").matches(&entry));
        assert!(!w("kind=break-glass").matches(&entry));
        assert!(Watch::parse("example.org/ci").is_err());
        assert!(
            Watch::parse("spiffe://example.org/*/x").is_err(),
            "only a trailing *"
        );
    }
}
