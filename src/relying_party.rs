//! What a relying party (a GPU scheduler, a registry, a data service) needs to accept
//! broker tokens safely, offline: verify the token against the broker's JWKS (following
//! key rotation), check issuer, audience, expiry and the `cnf` binding to the presented
//! client certificate, and follow the signed revocation feed — failing closed when it has
//! not heard from the broker for longer than a staleness bound.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use spiffe_broker::relying_party::{RelyingParty, RpConfig};
//! let rp = RelyingParty::new(RpConfig::new("http://127.0.0.1:8081", "gpu-scheduler", "feed-key…")?);
//! rp.refresh_keys().await?;
//! rp.sync_revocations().await?;
//! let claims = rp.verify(&token_from_request(), None)?;
//! # Ok(()) }
//! # fn token_from_request() -> String { String::new() }
//! ```
//!
//! A token issued by token exchange (RFC 8693) is for its subject (`sub`) and names who
//! acts for it in `act`, the current actor outermost; [`JwtClaims::actors`] reads the
//! verified chain and [`RpConfig::delegation`] can require "no more than N actors" or
//! "the actor must be X". Revoking the token a chain was derived from revokes every
//! derived token through the same feed.
//!
//! A relying party that wants more than the broker's word can also require a token's
//! issuance to be in the broker's log, witnessed: [`verify_logged`] checks an inclusion
//! proof the holder presents with the token (what `spiffe-broker audit proof --lease JTI`
//! prints; like a stapled Certificate Transparency proof) against the pinned log key and a
//! [`WitnessPolicy`]. A broker that mints off the log, or on a log it later rewrites or
//! shows only to this party, fails it.
//!
//! Discovery, the JWKS and the feed are fetched with the broker's outbound client
//! (`crate::http_client`): `http://` or `https://` issuers (the broker's HTTP listener with
//! `[http_tls]`), trusting the platform's store or [`RpConfig::ca_file`], honouring
//! `HTTPS_PROXY` / `NO_PROXY`, with a 10 s bound per fetch and 16 MiB per document. To
//! fetch them some other way, call [`RelyingParty::set_keys`] and
//! [`RelyingParty::apply_feed`] with what you fetched.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;

use crate::checkpoint::VerifierKey;
use crate::clock::{Clock, SystemClock};
use crate::cosignature::WitnessPolicy;
use crate::domain::RevocationEvent;
use crate::http_client::{HttpClient, Options, Trust};
use crate::jose::{self, b64, Jwk, JwkSet, JwtClaims, TokenRefusal};

/// Why a token (or the feed) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RpError {
    /// Not a well-formed broker token.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// Signed with a key not (yet) in the JWKS; refresh the keys and retry once.
    #[error("unknown signing key {0}")]
    UnknownKey(String),
    /// Bad signature, issuer, audience or times.
    #[error("token refused: {0}")]
    Invalid(String),
    /// The token's issuance is not proven in the (witnessed) log.
    #[error("issuance not proven in the log: {0}")]
    NotLogged(String),
    /// The token is bound to another client certificate (or needs one).
    #[error("token is bound to a different client certificate")]
    CnfMismatch,
    /// The broker revoked it.
    #[error("token was revoked")]
    Revoked,
    /// The token's delegation chain breaks this relying party's rule.
    #[error("delegation refused: {0}")]
    Delegation(String),
    /// The revocation feed is older than the staleness bound: fail closed.
    #[error("revocation feed is stale (last sync {0}s ago): refusing all tokens")]
    Stale(i64),
    /// Fetching or verifying broker documents failed.
    #[error("broker: {0}")]
    Broker(String),
}

/// Relying-party settings.
pub struct RpConfig {
    /// The broker's issuer URL (tokens' `iss`).
    pub issuer_url: String,
    /// This relying party's audience.
    pub audience: String,
    /// The revocation feed's verifier key, pinned out of band.
    pub feed_key: VerifierKey,
    /// Refuse every token when the feed was not synced for this long.
    pub max_staleness: Duration,
    /// Clock tolerance on `exp`/`nbf`.
    pub leeway: Duration,
    /// Time source (tests use a manual clock).
    pub clock: Arc<dyn Clock>,
    /// PEM bundle of the CAs trusted for an `https` issuer, instead of the platform's
    /// trust store (e.g. the private CA of the broker's `[http_tls]` certificate).
    pub ca_file: Option<PathBuf>,
    /// What this relying party accepts of a token issued by token exchange (`act`).
    pub delegation: DelegationRule,
}

/// A relying party's rule for delegated tokens (those whose `act` claim names who acts for
/// the subject). The default accepts any chain the broker issued.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DelegationRule {
    /// At most this many actors (`Some(0)`: no delegated tokens at all).
    pub max_actors: Option<usize>,
    /// The current actor (the one presenting the token) must be one of these.
    pub actors: Option<Vec<String>>,
}

impl DelegationRule {
    /// Checks a verified token's chain.
    pub fn check(&self, claims: &JwtClaims) -> Result<(), RpError> {
        let chain = claims.actors();
        if let Some(max) = self.max_actors {
            if chain.len() > max {
                return Err(RpError::Delegation(format!(
                    "{} actor(s) in the chain, at most {max} accepted",
                    chain.len()
                )));
            }
        }
        if let (Some(allowed), Some(current)) = (&self.actors, chain.first()) {
            if !allowed.iter().any(|a| a == current) {
                return Err(RpError::Delegation(format!(
                    "actor {current} is not one this relying party accepts"
                )));
            }
        }
        Ok(())
    }
}

impl RpConfig {
    /// Defaults: 60 s staleness bound, 30 s leeway, the system clock, the platform's
    /// trust store.
    pub fn new(issuer_url: &str, audience: &str, feed_key: &str) -> Result<Self, RpError> {
        Ok(Self {
            issuer_url: issuer_url.trim_end_matches('/').to_owned(),
            audience: audience.to_owned(),
            feed_key: VerifierKey::parse(feed_key)
                .map_err(|e| RpError::Broker(format!("feed key: {e}")))?,
            max_staleness: Duration::from_secs(60),
            leeway: Duration::from_secs(30),
            clock: Arc::new(SystemClock),
            ca_file: None,
            delegation: DelegationRule::default(),
        })
    }
}

struct State {
    keys: HashMap<String, Jwk>,
    /// Revoked lease ids (the tokens' `jti`) and when they expire anyway.
    revoked: HashMap<String, i64>,
    /// Feed position: last sequence and chain hash of the events applied.
    seq: u64,
    chain: [u8; 32],
    /// Events of `more` pages, chained but not applied until a head over the tail they
    /// lead to verifies.
    pending: Vec<RevocationEvent>,
    last_sync: Option<i64>,
}

impl State {
    /// Where the next page starts: after the pending events, if any.
    fn tip(&self) -> Result<(u64, [u8; 32]), RpError> {
        match self.pending.last() {
            None => Ok((self.seq, self.chain)),
            Some(e) => Ok((e.seq, chain_hash(e)?)),
        }
    }
}

fn chain_hash(e: &RevocationEvent) -> Result<[u8; 32], RpError> {
    hex::decode(&e.chain_hash)
        .ok()
        .and_then(|h| <[u8; 32]>::try_from(h).ok())
        .ok_or_else(|| RpError::Broker(format!("feed event {} has a malformed chain hash", e.seq)))
}

/// A relying party's view of one broker.
pub struct RelyingParty {
    cfg: RpConfig,
    state: Mutex<State>,
    /// Built once, from `cfg.ca_file`; a CA file that cannot be used fails every fetch.
    http: Result<HttpClient, String>,
}

#[derive(Deserialize)]
struct FeedPage {
    events: Vec<RevocationEvent>,
    signed_head: Option<String>,
    #[serde(default)]
    more: bool,
}

impl RelyingParty {
    /// A relying party with no keys and no feed yet (everything is refused until both).
    pub fn new(cfg: RpConfig) -> Self {
        let options = Options {
            timeout: FETCH_TIMEOUT,
            max_body: MAX_BODY,
            ..Options::new(Trust::from_ca_file(cfg.ca_file.as_deref()))
        };
        let http = HttpClient::new(&options).map_err(|e| e.to_string());
        Self {
            http,
            cfg,
            state: Mutex::new(State {
                keys: HashMap::new(),
                revoked: HashMap::new(),
                seq: 0,
                chain: [0; 32],
                pending: Vec::new(),
                last_sync: None,
            }),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the signing keys (a fresh JWKS).
    pub fn set_keys(&self, jwks: JwkSet) {
        let keys = jwks
            .keys
            .into_iter()
            .filter_map(|k| k.kid.clone().map(|kid| (kid, k)))
            .collect();
        self.state().keys = keys;
    }

    /// Fetches the JWKS through OIDC discovery.
    pub async fn refresh_keys(&self) -> Result<(), RpError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| RpError::Broker(format!("HTTP client: {e}")))?;
        let jwks = http
            .discover_jwks(&self.cfg.issuer_url)
            .await
            .map_err(|e| RpError::Broker(e.to_string()))?;
        self.set_keys(jwks);
        Ok(())
    }

    /// Fetches and applies every new revocation event; returns how many were applied.
    pub async fn sync_revocations(&self) -> Result<usize, RpError> {
        // A sync starts from what is applied: events buffered by an earlier, unfinished
        // run of `more` pages (or pages fed in by hand) are never built upon.
        self.state().pending.clear();
        let mut applied = 0;
        loop {
            let since = self.state().tip()?.0;
            let body = self
                .get(&format!(
                    "{}/revocations?since={since}",
                    self.cfg.issuer_url
                ))
                .await?;
            let page: FeedPage = serde_json::from_slice(&body)
                .map_err(|e| RpError::Broker(format!("revocation feed: {e}")))?;
            applied += self.apply_feed(&page.events, page.signed_head.as_deref(), page.more)?;
            if !page.more {
                return Ok(applied);
            }
        }
    }

    /// Takes one page of the feed: its events must continue our chain exactly (no gap, no
    /// duplicate, no rewrite) and its head must verify under the pinned feed key. The
    /// broker signs heads only over the feed's tail, so a page with `more` (events remain)
    /// is only buffered; the events are applied once a head over exactly the position they
    /// lead to verifies — a forger cannot splice events of its own under a genuine head.
    /// Freshness comes from that head's signed time, never from the local clock at
    /// arrival, and only when the head is at our position: a replayed or old head, or a
    /// head for a position we are not at, keeps nothing fresh. Any refusal discards the
    /// buffered events and changes nothing else. Returns how many events were applied.
    pub fn apply_feed(
        &self,
        events: &[RevocationEvent],
        signed_head: Option<&str>,
        more: bool,
    ) -> Result<usize, RpError> {
        let now = self.cfg.clock.unix_seconds();
        let mut st = self.state();
        let checked = self.check_page(&st, events, signed_head, more);
        let signed_at = match checked {
            Ok(t) => t,
            Err(e) => {
                st.pending.clear();
                return Err(e);
            }
        };
        st.pending.extend_from_slice(events);
        let Some(signed_at) = signed_at else {
            return Ok(0);
        };
        let applied = std::mem::take(&mut st.pending);
        for e in &applied {
            st.revoked.insert(e.lease_id.clone(), e.expires_at);
        }
        // Forget revocations of tokens that have expired anyway.
        st.revoked.retain(|_, exp| *exp + 3600 > now);
        if let Some(last) = applied.last() {
            st.seq = last.seq;
            st.chain = chain_hash(last)?;
        }
        st.last_sync = Some(signed_at);
        Ok(applied.len())
    }

    /// Checks a page against our position; `Some(time)` when its head is over exactly the
    /// position the page ends at (apply, and be fresh as of `time`), `None` for a `more`
    /// page whose head is further on (buffer).
    fn check_page(
        &self,
        st: &State,
        events: &[RevocationEvent],
        signed_head: Option<&str>,
        more: bool,
    ) -> Result<Option<i64>, RpError> {
        if st.pending.len() + events.len() > MAX_PENDING {
            return Err(RpError::Broker(format!(
                "more than {MAX_PENDING} feed events without a head over them"
            )));
        }
        let (mut seq, mut chain) = st.tip()?;
        for e in events {
            if e.seq != seq + 1 {
                return Err(RpError::Broker(format!(
                    "feed gap or duplicate: expected {}, got {}",
                    seq + 1,
                    e.seq
                )));
            }
            let next = e.chain(&chain);
            if hex::encode(next) != e.chain_hash {
                return Err(RpError::Broker(format!(
                    "feed event {} does not chain",
                    e.seq
                )));
            }
            seq = e.seq;
            chain = next;
        }
        let note =
            signed_head.ok_or_else(|| RpError::Broker("feed page without a signed head".into()))?;
        let head = self
            .cfg
            .feed_key
            .verify(note)
            .map_err(|e| RpError::Broker(format!("feed head: {e}")))?;
        let signed_at = head
            .time()
            .ok_or_else(|| RpError::Broker("feed head carries no time".into()))?;
        if st.last_sync.is_some_and(|t| signed_at < t) {
            return Err(RpError::Broker(
                "feed head is older than one already seen (replay)".into(),
            ));
        }
        if more {
            if head.size <= seq {
                return Err(RpError::Broker(
                    "a page with more to come has a head that is not ahead of it".into(),
                ));
            }
            return Ok(None);
        }
        if head.size != seq || head.root != chain {
            return Err(RpError::Broker(format!(
                "signed feed head (size {}) is not over the position the events lead to ({seq})",
                head.size
            )));
        }
        Ok(Some(signed_at))
    }

    /// Verifies a broker token offline; `peer_cert_der` is the client certificate the
    /// token was presented with (required when the token carries a `cnf` binding).
    pub fn verify(&self, token: &str, peer_cert_der: Option<&[u8]>) -> Result<JwtClaims, RpError> {
        let now = self.cfg.clock.unix_seconds();
        let st = self.state();
        match st.last_sync {
            None => return Err(RpError::Stale(i64::MAX)),
            Some(t) if now - t > self.cfg.max_staleness.as_secs() as i64 => {
                return Err(RpError::Stale(now - t))
            }
            _ => {}
        }
        let expected = jose::Expected {
            issuer: &self.cfg.issuer_url,
            audience: &self.cfg.audience,
            now,
            leeway: self.cfg.leeway.as_secs() as i64,
        };
        let claims = jose::verify_broker_token(token, |kid| st.keys.get(kid).cloned(), &expected)
            .map_err(|r| match r {
            TokenRefusal::Malformed(m) => RpError::Malformed(m),
            TokenRefusal::UnknownKey(k) => RpError::UnknownKey(k),
            TokenRefusal::Invalid(m) => RpError::Invalid(m),
        })?;
        if let Some(cnf) = &claims.cnf {
            let expected = cnf.get("x5t#S256").ok_or(RpError::CnfMismatch)?;
            let presented = peer_cert_der
                .map(|der| b64(ring::digest::digest(&ring::digest::SHA256, der).as_ref()))
                .ok_or(RpError::CnfMismatch)?;
            if &presented != expected {
                return Err(RpError::CnfMismatch);
            }
        }
        if st.revoked.contains_key(&claims.jti) {
            return Err(RpError::Revoked);
        }
        self.cfg.delegation.check(&claims)?;
        Ok(claims)
    }
}

/// An inclusion proof of a token's issuance entry: the fields `spiffe-broker audit proof`
/// prints (and `Admin.GetInclusionProof` answers).
#[derive(Debug, Clone, Deserialize)]
pub struct LogProof {
    /// The entry: the log's canonical JSON, as a string or parsed.
    pub entry: serde_json::Value,
    /// Its leaf index.
    pub leaf_index: u64,
    /// The tree size proven against.
    pub tree_size: u64,
    /// The audit path, hex, from the leaf's sibling upward.
    pub proof: Vec<String>,
    /// The signed checkpoint of `tree_size` (with witness cosignatures).
    pub checkpoint: String,
}

/// Checks that `token` (already verified, with the `jti` its claims carry) was issued on
/// the log: the checkpoint is signed by the pinned `log_key` and, with `witnesses`,
/// cosigned by their quorum at a size of at least their `min_size`; the entry is included
/// at `leaf_index`; and it is the issuance of exactly this token (`kind` issue,
/// `lease_id` = `jti`, `credential_sha256` = the token's SHA-256). Returns the tree size.
pub fn verify_logged(
    token: &str,
    jti: &str,
    proof: &LogProof,
    log_key: &VerifierKey,
    witnesses: Option<&WitnessPolicy>,
) -> Result<u64, RpError> {
    let no = |m: String| RpError::NotLogged(m);
    let cp = log_key
        .verify(&proof.checkpoint)
        .map_err(|e| no(format!("checkpoint: {e}")))?;
    if cp.size != proof.tree_size {
        return Err(no("the checkpoint is not of the proof's tree size".into()));
    }
    if let Some(policy) = witnesses {
        policy
            .check(&proof.checkpoint)
            .map_err(|e| no(e.to_string()))?;
    }
    let body = match &proof.entry {
        serde_json::Value::String(s) => s.clone(),
        v => v.to_string(),
    };
    let path = proof
        .proof
        .iter()
        .map(|h| {
            hex::decode(h)
                .ok()
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| no("a proof hash is not hex SHA-256".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let leaf = crate::merkle::leaf_hash(body.as_bytes());
    crate::merkle::verify_inclusion(&leaf, proof.leaf_index, proof.tree_size, &path, &cp.root)
        .map_err(|e| no(format!("inclusion: {}", e.0)))?;
    let entry: serde_json::Value =
        serde_json::from_str(&body).map_err(|e| no(format!("entry: {e}")))?;
    let digest = hex::encode(ring::digest::digest(
        &ring::digest::SHA256,
        token.as_bytes(),
    ));
    let ours = entry["kind"] == "issue"
        && entry["lease_id"].as_str() == Some(jti)
        && entry["credential_sha256"].as_str() == Some(digest.as_str());
    if !ours {
        return Err(no("the proven entry is not this token's issuance".into()));
    }
    Ok(cp.size)
}

/// Most events buffered from `more` pages before a head covers them.
const MAX_PENDING: usize = 1_000_000;

/// Upper bound on a broker document.
const MAX_BODY: usize = 16 * 1024 * 1024;

/// Upper bound on one fetch, from connecting to the last byte.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);

impl RelyingParty {
    /// GETs a broker document: `200` and its body, anything else is an error.
    async fn get(&self, url: &str) -> Result<Vec<u8>, RpError> {
        let http = self
            .http
            .as_ref()
            .map_err(|e| RpError::Broker(format!("HTTP client: {e}")))?;
        Ok(http
            .get_ok(url)
            .await
            .map_err(|e| RpError::Broker(e.to_string()))?
            .to_vec())
    }
}
