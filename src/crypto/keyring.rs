//! The token-signing key ring, and its rotation without a restart.
//!
//! Files in `STATE_DIR/keys/` (PKCS#8 DER, 0600), shared by every replica:
//!
//! - `current.p8` signs;
//! - `next.p8`, once staged by a rotation, is **published** in the JWKS at once and signs
//!   from `next_signs_at` on (`publish_ahead` later), so relying parties that refresh
//!   their JWKS in that window never meet a token whose key they have not seen;
//! - `previous.p8` stays published until every token it signed has expired
//!   (`previous_retired_at` + the longest token lifetime), then drops out of the JWKS;
//! - `rotation.json` holds those two instants.
//!
//! Which key signs and which are published is a function of the files and the clock, so
//! replicas that read the same directory agree without talking to each other, and a
//! running broker follows a rotation by re-reading the directory ([`KeyRing::refresh`],
//! every second) — no restart. A rotation ([`rotate`]) first settles the last one (the
//! staged key becomes `current.p8`, the old one `previous.p8`), then stages a new key;
//! it refuses while the staged key does not sign yet, or while the previous key may
//! still verify live tokens (dropping it would break them).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{libtrust_key_id, read_key, read_pkcs8, write_private, EcdsaP256Signer, RsaSigner};
use super::{SignError, Signer};
use crate::jose::{Jwk, JwkSet};

/// The longest any token lives (profiles' `max_ttl` is at most 7 days): how long a retired
/// key stays published unless the ring is told the configured maximum.
pub const MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(7 * 24 * 3600);

/// `rotation.json`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Schedule {
    /// When the staged key (`next.p8`) starts signing (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_signs_at: Option<i64>,
    /// When `previous.p8` stopped signing (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_retired_at: Option<i64>,
}

/// The keys on disk.
#[derive(Clone)]
struct Keys {
    current: Arc<dyn Signer>,
    previous: Option<Arc<dyn Signer>>,
    next: Option<Arc<dyn Signer>>,
    schedule: Schedule,
}

/// What is in force at one instant.
#[derive(Clone)]
struct View {
    signing: Arc<dyn Signer>,
    /// Signing key first, then the others still published.
    published: Vec<Arc<dyn Signer>>,
}

impl Keys {
    fn view(&self, now: i64, retain: Duration) -> View {
        let promoted =
            matches!((&self.next, self.schedule.next_signs_at), (Some(_), Some(at)) if now >= at);
        let (signing, other) = match (&self.next, promoted) {
            (Some(next), true) => (next.clone(), Some(self.current.clone())),
            _ => (self.current.clone(), self.next.clone()),
        };
        let previous_live = match self.schedule.previous_retired_at {
            Some(at) => now < at.saturating_add(retain.as_secs() as i64),
            // Retired before schedules were recorded: kept, as before.
            None => true,
        };
        let previous = self.previous.clone().filter(|_| previous_live);
        let published = std::iter::once(signing.clone())
            .chain(other)
            .chain(previous)
            .collect();
        View { signing, published }
    }
}

/// The broker's signing keys: cheap to clone, every clone sees the same keys, and a
/// rotation reaches all of them.
#[derive(Clone)]
pub struct KeyRing {
    dir: Option<PathBuf>,
    retain: Duration,
    keys: Arc<RwLock<(Keys, View)>>,
    rsa: Option<Arc<dyn Signer>>,
}

impl std::fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyRing")
            .field("signing", &self.current().key_id())
            .field("published", &self.signers().len())
            .finish()
    }
}

fn rotation_path(dir: &Path) -> PathBuf {
    dir.join("rotation.json")
}

fn read_schedule(dir: &Path) -> Result<Schedule, SignError> {
    let path = rotation_path(dir);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map_err(|e| SignError(format!("{}: {e}", path.display()))),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Schedule::default()),
        Err(e) => Err(SignError(format!("cannot read {}: {e}", path.display()))),
    }
}

fn read_keys(dir: &Path) -> Result<Keys, SignError> {
    let current = read_key(&dir.join("current.p8"))?
        .ok_or_else(|| SignError(format!("{}: no current.p8", dir.display())))?;
    let arc = |k: EcdsaP256Signer| Arc::new(k) as Arc<dyn Signer>;
    Ok(Keys {
        current: arc(current),
        previous: read_key(&dir.join("previous.p8"))?.map(arc),
        next: read_key(&dir.join("next.p8"))?.map(arc),
        schedule: read_schedule(dir)?,
    })
}

/// Creates `dir` (0700) and its first key if it has none.
fn create(dir: &Path) -> Result<(), SignError> {
    fs::create_dir_all(dir)
        .map_err(|e| SignError(format!("cannot create {}: {e}", dir.display())))?;
    let _ = fs::set_permissions(dir, fs::Permissions::from_mode(0o700));
    let current_path = dir.join("current.p8");
    if read_key(&current_path)?.is_none() {
        let (k, bytes) = EcdsaP256Signer::generate()?;
        write_private(&current_path, &bytes)?;
        tracing::info!(kid = k.key_id(), "generated token signing key");
    }
    Ok(())
}

impl KeyRing {
    /// A ring from explicit signers (tests, KMS-backed signers); it never rotates.
    pub fn new(current: Arc<dyn Signer>, previous: Option<Arc<dyn Signer>>) -> Self {
        let keys = Keys {
            current,
            previous,
            next: None,
            schedule: Schedule::default(),
        };
        let view = keys.view(0, MAX_TOKEN_LIFETIME);
        Self {
            dir: None,
            retain: MAX_TOKEN_LIFETIME,
            keys: Arc::new(RwLock::new((keys, view))),
            rsa: None,
        }
    }

    /// Loads the keys in `dir` as of `now` (Unix seconds), generating the first key on
    /// first start. A retired key stays published for `retain` (the longest token lifetime).
    pub fn load_or_create_at(dir: &Path, now: i64, retain: Duration) -> Result<Self, SignError> {
        create(dir)?;
        let keys = read_keys(dir)?;
        let view = keys.view(now, retain);
        Ok(Self {
            dir: Some(dir.to_owned()),
            retain,
            keys: Arc::new(RwLock::new((keys, view))),
            rsa: None,
        })
    }

    /// [`Self::load_or_create_at`] now, keeping retired keys for [`MAX_TOKEN_LIFETIME`].
    pub fn load_or_create(dir: &Path) -> Result<Self, SignError> {
        use crate::clock::Clock as _;
        Self::load_or_create_at(
            dir,
            crate::clock::SystemClock.unix_seconds(),
            MAX_TOKEN_LIFETIME,
        )
    }

    /// Re-reads the directory and recomputes what signs and what is published at `now`.
    /// Returns whether the signing key changed. A directory that cannot be read keeps the
    /// keys in force (and says why): signing goes on with known keys.
    pub fn refresh(&self, now: i64) -> Result<bool, SignError> {
        let Some(dir) = &self.dir else {
            return Ok(false);
        };
        let keys = read_keys(dir)?;
        let view = keys.view(now, self.retain);
        let mut guard = self.keys.write().unwrap_or_else(|p| p.into_inner());
        let changed = guard.1.signing.key_id() != view.signing.key_id();
        *guard = (keys, view);
        Ok(changed)
    }

    /// Whether a scheduled rotation is due at `now`: no key staged, and the signing key
    /// has signed for `every` (since it took over, or since its file was written).
    pub fn rotation_due(&self, now: i64, every: Duration) -> bool {
        let Some(dir) = &self.dir else {
            return false;
        };
        let guard = self.keys.read().unwrap_or_else(|p| p.into_inner());
        if guard.0.next.is_some() {
            return false;
        }
        let since = guard.0.schedule.previous_retired_at.or_else(|| {
            let modified = fs::metadata(dir.join("current.p8"))
                .and_then(|m| m.modified())
                .ok()?;
            Some(crate::clock::unix_seconds(modified))
        });
        since.is_some_and(|s| now >= s.saturating_add(every.as_secs() as i64))
    }

    /// Adds the RS256 key (`dir/rsa.p8`), generating it on first use. Only configs with
    /// an RS256 profile (slurm) pay for RSA key generation. (It is not rotated by
    /// [`rotate`]: Slurm reads its JWKS file at start.)
    pub fn with_rsa(mut self, dir: &Path) -> Result<Self, SignError> {
        let path = dir.join("rsa.p8");
        let key = match read_pkcs8(&path, RsaSigner::from_pkcs8)? {
            Some(k) => k,
            None => {
                let (k, bytes) = RsaSigner::generate()?;
                write_private(&path, &bytes)?;
                tracing::info!(kid = k.key_id(), "generated RS256 signing key");
                k
            }
        };
        self.rsa = Some(Arc::new(key));
        Ok(self)
    }

    /// The RS256 key, if this ring has one.
    pub fn rsa(&self) -> Option<&Arc<dyn Signer>> {
        self.rsa.as_ref()
    }

    /// Every signer whose public key is published: the signing key, the staged or
    /// retired ones still published, RSA.
    pub fn signers(&self) -> Vec<Arc<dyn Signer>> {
        let guard = self.keys.read().unwrap_or_else(|p| p.into_inner());
        guard
            .1
            .published
            .iter()
            .cloned()
            .chain(self.rsa.clone())
            .collect()
    }

    /// The key that signs new tokens.
    pub fn current(&self) -> Arc<dyn Signer> {
        let guard = self.keys.read().unwrap_or_else(|p| p.into_inner());
        guard.1.signing.clone()
    }

    /// The published key set: the signing key first.
    pub fn jwks(&self) -> JwkSet {
        JwkSet {
            keys: self.signers().iter().map(|s| s.public_jwk()).collect(),
        }
    }

    /// The JWKS served to relying parties: [`Self::jwks`] plus, for each ES256 key, the
    /// same key under its libtrust key id, the `kid` OCI registry tokens carry (a
    /// registry finds its key that way), so any JWKS consumer can verify those too.
    pub fn published_jwks(&self) -> JwkSet {
        let mut set = self.jwks();
        for s in self.signers() {
            if s.algorithm() == "ES256" {
                let mut alias = s.public_jwk();
                alias.kid = Some(libtrust_key_id(&s.public_spki_der()));
                set.keys.push(alias);
            }
        }
        set
    }

    /// The public key for `kid`, if published.
    pub fn find(&self, kid: &str) -> Option<Jwk> {
        self.jwks()
            .keys
            .into_iter()
            .find(|k| k.kid.as_deref() == Some(kid))
    }
}

/// What a rotation did.
#[derive(Debug, Clone, Serialize)]
pub struct Rotation {
    /// The key staged: published now, signing from `signs_at`.
    pub staged_kid: String,
    /// When it starts signing (Unix seconds).
    pub signs_at: i64,
    /// The key that signs until then.
    pub signing_kid: String,
    /// The key retired by settling the last rotation, published until `retired_until`.
    pub retired_kid: Option<String>,
    /// Until when the retired key stays published (Unix seconds).
    pub retired_until: Option<i64>,
}

/// Rotates the keys in `dir` at `now`: settles the last rotation (its staged key becomes
/// `current.p8`, the old current `previous.p8`), then stages a new key that signs from
/// `now + publish_ahead`. Refused, changing nothing, while the staged key does not sign
/// yet or the previous key may still verify a live token (`retain` after it retired).
pub fn rotate(
    dir: &Path,
    now: i64,
    publish_ahead: Duration,
    retain: Duration,
) -> Result<Rotation, SignError> {
    create(dir)?;
    let keys = read_keys(dir)?;
    let mut schedule = keys.schedule;
    let mut retired = None;
    if let Some(next) = &keys.next {
        let signs_at = schedule.next_signs_at.unwrap_or(now);
        if now < signs_at {
            return Err(SignError(format!(
                "a rotation is under way: key {} signs from {} (run again after)",
                next.key_id(),
                crate::clock::rfc3339(signs_at)
            )));
        }
        if let (Some(prev), Some(at)) = (&keys.previous, schedule.previous_retired_at) {
            let until = at.saturating_add(retain.as_secs() as i64);
            if now < until {
                return Err(SignError(format!(
                    "key {} may still verify live tokens until {}; rotating now would drop it",
                    prev.key_id(),
                    crate::clock::rfc3339(until)
                )));
            }
        }
        let at = |n: &str| dir.join(n);
        fs::rename(at("current.p8"), at("previous.p8"))
            .and_then(|()| fs::rename(at("next.p8"), at("current.p8")))
            .map_err(|e| SignError(format!("cannot settle the last rotation: {e}")))?;
        schedule.previous_retired_at = Some(signs_at);
        schedule.next_signs_at = None;
        write_schedule(dir, &schedule)?;
        retired = Some((
            keys.current.key_id().to_owned(),
            signs_at.saturating_add(retain.as_secs() as i64),
        ));
    }
    let (staged, bytes) = EcdsaP256Signer::generate()?;
    write_private(&dir.join("next.p8"), &bytes)?;
    let signs_at = now.saturating_add(publish_ahead.as_secs() as i64);
    schedule.next_signs_at = Some(signs_at);
    write_schedule(dir, &schedule)?;
    let signing = read_key(&dir.join("current.p8"))?
        .map(|k| k.key_id().to_owned())
        .unwrap_or_default();
    tracing::info!(
        kid = staged.key_id(),
        signs_at,
        "staged a new token signing key"
    );
    Ok(Rotation {
        staged_kid: staged.key_id().to_owned(),
        signs_at,
        signing_kid: signing,
        retired_kid: retired.as_ref().map(|r| r.0.clone()),
        retired_until: retired.map(|r| r.1),
    })
}

fn write_schedule(dir: &Path, s: &Schedule) -> Result<(), SignError> {
    let bytes = serde_json::to_vec_pretty(s).map_err(|e| SignError(e.to_string()))?;
    crate::files::write_atomic(&rotation_path(dir), &bytes, 0o600)
        .map_err(|e| SignError(format!("cannot write {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    fn kids(ring: &KeyRing) -> Vec<String> {
        ring.jwks()
            .keys
            .iter()
            .filter_map(|k| k.kid.clone())
            .collect()
    }

    #[test]
    fn a_staged_key_is_published_before_it_signs_and_a_retired_one_until_its_tokens_expire() {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        let ring = KeyRing::load_or_create_at(d, 1_000, 2 * HOUR).expect("create");
        let first = ring.current().key_id().to_owned();
        assert_eq!(kids(&ring), vec![first.clone()]);

        let r = rotate(d, 1_000, HOUR, 2 * HOUR).expect("stage");
        assert_eq!(
            (r.signing_kid.as_str(), r.signs_at),
            (first.as_str(), 4_600)
        );
        // Published at once, not signing yet.
        assert!(!ring.refresh(1_001).expect("refresh"));
        assert_eq!(kids(&ring), [first.clone(), r.staged_kid.clone()]);
        // A second rotation waits for this one.
        assert!(rotate(d, 2_000, HOUR, 2 * HOUR).is_err());
        // Signing switches at signs_at, the old key still published; every clone sees it.
        let clone = ring.clone();
        assert!(ring.refresh(4_600).expect("refresh"));
        assert_eq!(clone.current().key_id(), r.staged_kid);
        assert_eq!(kids(&clone), [r.staged_kid.clone(), first.clone()]);

        // The next rotation settles the files, and the retired key is published until
        // 2 h after it stopped signing, then dropped.
        let r2 = rotate(d, 5_000, HOUR, 2 * HOUR).expect("settle and stage");
        assert_eq!(r2.retired_kid.as_deref(), Some(first.as_str()));
        assert_eq!(r2.retired_until, Some(4_600 + 7_200));
        ring.refresh(5_000).expect("refresh");
        assert_eq!(
            kids(&ring),
            [r.staged_kid.clone(), r2.staged_kid.clone(), first.clone()]
        );
        // Settling again before the retired key's tokens expired would drop it: refused.
        let refused = rotate(d, 8_600, HOUR, 2 * HOUR).expect_err("the first key's tokens live");
        assert!(
            refused.0.contains("may still verify live tokens"),
            "{}",
            refused.0
        );
        // Later: the second staged key signs, the first key is gone.
        ring.refresh(4_600 + 7_200).expect("refresh");
        assert_eq!(kids(&ring), [r2.staged_kid.clone(), r.staged_kid.clone()]);
        let restarted = KeyRing::load_or_create_at(d, 9_000, 2 * HOUR).expect("load");
        assert_eq!(
            restarted.current().key_id(),
            r2.staged_kid,
            "a restart agrees"
        );
    }
}
