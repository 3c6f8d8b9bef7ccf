//! The revocation feed, served so that a signed head is evidence of exactly one thing:
//! "the feed ended here, at this time". Heads are signed only over the real tail (read
//! before the events it covers, which are append-only, so both come from one consistent
//! view); a position past the tail is refused; and one shared poller per replica watches
//! the tail and signs a fresh head each tick for every watcher, instead of each stream
//! polling the database and signing on its own.

use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit};

use super::streams::StreamSlot;
use super::Broker;
use crate::authn::VerifiedCaller;
use crate::checkpoint::LogSigner;
use crate::clock::Clock;
use crate::domain::RevocationEvent;
use crate::error::BrokerError;
use crate::store::Store;

/// Most events read from the store at once for one watcher.
const FEED_BATCH: u64 = 1000;

/// The role an identity needs (in the inventory) to watch the feed over gRPC.
pub const RELYING_PARTY_ROLE: &str = "relying-party";

/// One page of the feed (the HTTP path).
#[derive(Debug, Clone)]
pub struct FeedPage {
    /// Events after the requested position, none beyond `tail`.
    pub events: Vec<RevocationEvent>,
    /// The feed's last sequence when the page was read.
    pub tail: u64,
    /// Events remain between the page's last event and `tail`.
    pub more: bool,
    /// A signed, timed head over `tail` (never over anything else).
    pub signed_head: Option<String>,
}

/// What a watcher receives.
#[derive(Debug, Clone)]
pub enum FeedItem {
    /// The next event.
    Event(RevocationEvent),
    /// A signed head: sent only when the watcher has received every event up to it.
    Head(String),
}

/// The feed's end as the shared poller last read it.
#[derive(Debug, Clone, PartialEq)]
struct Tail {
    seq: u64,
    hash: [u8; 32],
    head: Option<String>,
    /// The store could not be read: watchers end with UNAVAILABLE.
    failed: Option<String>,
}

/// A head signed over (sequence, chain hash) at a second, and its note.
type SignedHead = (u64, [u8; 32], i64, String);

/// Signs heads over the tail, at most once per tail and second.
pub(super) struct HeadSigner {
    signer: Option<Arc<LogSigner>>,
    clock: Arc<dyn Clock>,
    last: Mutex<Option<SignedHead>>,
}

impl HeadSigner {
    pub(super) fn new(signer: Option<Arc<LogSigner>>, clock: Arc<dyn Clock>) -> Self {
        Self {
            signer,
            clock,
            last: Mutex::new(None),
        }
    }

    pub(super) fn vkey(&self) -> Option<String> {
        self.signer.as_ref().map(|s| s.vkey())
    }

    /// A signed note over (tail sequence, tail chain hash) with a `time` line: a relying
    /// party's freshness comes from that time, so a replayed head goes stale.
    fn sign(&self, seq: u64, hash: &[u8; 32]) -> Option<String> {
        let signer = self.signer.as_ref()?;
        let now = self.clock.unix_seconds();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((s, h, t, note)) = last.as_ref() {
            if (*s, h, *t) == (seq, hash, now) {
                return Some(note.clone());
            }
        }
        let note = signer.sign_with(seq, hash, vec![format!("time {now}")]);
        *last = Some((seq, *hash, now, note.clone()));
        Some(note)
    }
}

/// The shared poller's channel, started by the first watcher, ended after the last.
#[derive(Default)]
pub(super) struct TailHub {
    rx: Arc<Mutex<Option<watch::Receiver<Tail>>>>,
}

async fn read_tail(store: &dyn Store, heads: &HeadSigner) -> Tail {
    match store.revocation_tail().await {
        Ok(t) => {
            let (seq, hash) = t.unwrap_or((0, [0; 32]));
            Tail {
                seq,
                hash,
                head: heads.sign(seq, &hash),
                failed: None,
            }
        }
        Err(e) => Tail {
            seq: 0,
            hash: [0; 32],
            head: None,
            failed: Some(e.to_string()),
        },
    }
}

impl Broker {
    /// The revocation feed's verifier key.
    pub fn feed_vkey(&self) -> Option<String> {
        self.heads.vkey()
    }

    /// Wakes up revocation feed watchers on this replica.
    pub(super) fn revocations_changed(&self) {
        let _ = self.revocations.send(());
    }

    /// The feed after `since`: at most `limit` events, and a head signed over the tail.
    /// A position past the tail is OUT_OF_RANGE: a consumer there is on another feed, or
    /// was fed events that never existed.
    pub async fn revocation_page(&self, since: u64, limit: u32) -> Result<FeedPage, BrokerError> {
        let (tail, hash) = self.store.revocation_tail().await?.unwrap_or((0, [0; 32]));
        if since > tail {
            return Err(past_tail(since, tail));
        }
        let mut events = self.store.revocations(since, limit.max(1)).await?;
        events.retain(|e| e.seq <= tail);
        let more = events.last().map_or(since, |e| e.seq) < tail;
        Ok(FeedPage {
            events,
            tail,
            more,
            signed_head: self.heads.sign(tail, &hash),
        })
    }

    /// Whether `caller` may watch the feed: a registered identity with the relying-party
    /// role. Refusals are recorded.
    async fn authorize_watch(&self, caller: &VerifiedCaller) -> Result<(), BrokerError> {
        let id = super::workload_of(caller)?;
        let policy = self.policy();
        let reason = match policy.directory().identity(id) {
            None => format!("{id} is not a registered identity"),
            Some(i) if !i.roles.iter().any(|r| r == RELYING_PARTY_ROLE) => format!(
                "{id} does not hold the {RELYING_PARTY_ROLE:?} role needed to watch the revocation feed"
            ),
            Some(_) => return Ok(()),
        };
        let err = BrokerError::PermissionDenied(reason);
        Err(self.reject(caller, "WatchRevocations", err).await)
    }

    /// Streams the feed from `since` (holding `admitted`, the in-flight slot the call came in
    /// with, or a new one): every event in order, and a signed head each time
    /// the watcher has reached the tail (at least once per poll interval, as evidence that
    /// the feed is current). The stream holds an in-flight slot and one of the caller's
    /// stream slots while it is open.
    pub async fn watch_revocations(
        self: &Arc<Self>,
        caller: &VerifiedCaller,
        since: u64,
        admitted: Option<OwnedSemaphorePermit>,
    ) -> Result<mpsc::Receiver<Result<FeedItem, BrokerError>>, BrokerError> {
        self.authorize_watch(caller).await?;
        let slot = self
            .stream_slot(caller, "WatchRevocations", admitted)
            .await?;
        let (tail, _) = self.store.revocation_tail().await?.unwrap_or((0, [0; 32]));
        if since > tail {
            return Err(self
                .reject(caller, "WatchRevocations", past_tail(since, tail))
                .await);
        }
        let tails = self.tails().await;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(follow(self.store.clone(), tails, since, tx, slot));
        Ok(rx)
    }

    /// A receiver of the shared poller's view of the tail, starting the poller if none runs.
    async fn tails(&self) -> watch::Receiver<Tail> {
        if let Some(rx) = self
            .tail_hub
            .rx
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
        {
            return rx.clone();
        }
        let first = read_tail(self.store.as_ref(), &self.heads).await;
        let mut hub = self.tail_hub.rx.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(rx) = hub.as_ref() {
            return rx.clone();
        }
        let (tx, rx) = watch::channel(first);
        *hub = Some(rx.clone());
        tokio::spawn(poll_tail(
            self.store.clone(),
            self.heads.clone(),
            self.revocations.subscribe(),
            tx,
            self.tail_hub.rx.clone(),
        ));
        rx
    }
}

fn past_tail(since: u64, tail: u64) -> BrokerError {
    BrokerError::OutOfRange(format!(
        "since {since} is past the revocation feed's tail ({tail})"
    ))
}

/// The shared poller: reads the tail when this replica revokes and every poll interval
/// (other replicas), signs a fresh head over it, and stops once nobody watches.
async fn poll_tail(
    store: Arc<dyn Store>,
    heads: Arc<HeadSigner>,
    mut wake: broadcast::Receiver<()>,
    tx: watch::Sender<Tail>,
    hub: Arc<Mutex<Option<watch::Receiver<Tail>>>>,
) {
    loop {
        tokio::select! {
            _ = wake.recv() => {}
            _ = tokio::time::sleep(super::WATCH_POLL) => {}
        }
        {
            // Only the hub's own receiver left: stop, under the lock a new watcher takes.
            let mut hub = hub.lock().unwrap_or_else(|p| p.into_inner());
            if tx.receiver_count() <= 1 {
                *hub = None;
                return;
            }
        }
        let tail = read_tail(store.as_ref(), &heads).await;
        tx.send_if_modified(|old| {
            let changed = *old != tail;
            *old = tail;
            changed
        });
    }
}

/// One watcher: catches up from `since` to the tail the poller announces, then sends
/// the poller's head over that tail; never a head over a position short of it.
async fn follow(
    store: Arc<dyn Store>,
    mut tails: watch::Receiver<Tail>,
    mut since: u64,
    tx: mpsc::Sender<Result<FeedItem, BrokerError>>,
    _slot: StreamSlot,
) {
    loop {
        let tail = tails.borrow_and_update().clone();
        if let Some(e) = tail.failed {
            let _ = tx.send(Err(BrokerError::Unavailable(e))).await;
            return;
        }
        while since < tail.seq {
            let want = (tail.seq - since).min(FEED_BATCH) as u32;
            let events = match store.revocations(since, want).await {
                Ok(e) => e,
                Err(e) => {
                    let _ = tx.send(Err(e.into())).await;
                    return;
                }
            };
            let before = since;
            for e in events.into_iter().take_while(|e| e.seq <= tail.seq) {
                since = e.seq;
                if tx.send(Ok(FeedItem::Event(e))).await.is_err() {
                    return;
                }
            }
            if since == before {
                let _ = tx
                    .send(Err(BrokerError::Internal(format!(
                        "revocation feed tail {} announced but no event after {since}",
                        tail.seq
                    ))))
                    .await;
                return;
            }
        }
        // The poller may lag a watcher that opened at a newer tail: wait for it.
        if since == tail.seq {
            if let Some(head) = tail.head {
                if tx.send(Ok(FeedItem::Head(head))).await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            r = tails.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
        }
    }
}
