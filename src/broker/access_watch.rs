//! `WatchAccessRequest` through one shared poller per replica: watchers of the same
//! request share one channel, changes made on this replica arrive at once, and the
//! periodic re-read that covers other replicas is one store read per watched request,
//! not one per stream.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc, watch, OwnedSemaphorePermit};

use super::streams::StreamSlot;
use super::Broker;
use crate::authn::VerifiedCaller;
use crate::domain::AccessRequest;
use crate::error::BrokerError;
use crate::store::Store;

/// The latest read of one request, or why it could not be read.
type Seen = Result<AccessRequest, String>;

#[derive(Default)]
struct Watched {
    senders: HashMap<String, watch::Sender<Seen>>,
    polling: bool,
}

/// The requests watched on this replica.
#[derive(Default)]
pub(super) struct AccessHub(Arc<Mutex<Watched>>);

impl Broker {
    /// Streams an access request: its current state, then every change until it is final.
    pub async fn watch_access_request(
        self: &Arc<Self>,
        caller: &VerifiedCaller,
        id: &str,
        admitted: Option<OwnedSemaphorePermit>,
    ) -> Result<mpsc::Receiver<Result<AccessRequest, BrokerError>>, BrokerError> {
        let slot = self
            .stream_slot(caller, "WatchAccessRequest", admitted)
            .await?;
        let first = self.access_request(caller, id).await?;
        let changes = {
            let mut w = self.access_hub.0.lock().unwrap_or_else(|p| p.into_inner());
            let rx = match w.senders.get(id) {
                Some(tx) => tx.subscribe(),
                None => {
                    let (tx, rx) = watch::channel(Ok(first.clone()));
                    w.senders.insert(id.to_owned(), tx);
                    rx
                }
            };
            if !w.polling {
                w.polling = true;
                tokio::spawn(poll(
                    self.store.clone(),
                    self.changes.subscribe(),
                    self.access_hub.0.clone(),
                ));
            }
            rx
        };
        let (tx, rx) = mpsc::channel(8);
        tokio::spawn(follow(first, changes, tx, slot));
        Ok(rx)
    }
}

async fn follow(
    mut last: AccessRequest,
    mut changes: watch::Receiver<Seen>,
    tx: mpsc::Sender<Result<AccessRequest, BrokerError>>,
    _slot: StreamSlot,
) {
    if tx.send(Ok(last.clone())).await.is_err() {
        return;
    }
    while !last.state.is_final() {
        tokio::select! {
            r = changes.changed() => if r.is_err() { return },
            _ = tx.closed() => return,
        }
        let seen = changes.borrow_and_update().clone();
        match seen {
            Ok(now) if now != last => {
                last = now;
                if tx.send(Ok(last.clone())).await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(e) => {
                let _ = tx.send(Err(BrokerError::Unavailable(e))).await;
                return;
            }
        }
    }
}

/// The shared poller: re-reads a request when this replica changes it, and every watched
/// request each poll interval; forgets requests nobody watches, and stops with the last.
async fn poll(
    store: Arc<dyn Store>,
    mut changed: broadcast::Receiver<String>,
    hub: Arc<Mutex<Watched>>,
) {
    loop {
        let due: Vec<String> = tokio::select! {
            r = changed.recv() => match r {
                Ok(id) => vec![id],
                Err(broadcast::error::RecvError::Lagged(_)) => all(&hub),
                Err(broadcast::error::RecvError::Closed) => return,
            },
            _ = tokio::time::sleep(super::WATCH_POLL) => all(&hub),
        };
        {
            let mut w = hub.lock().unwrap_or_else(|p| p.into_inner());
            w.senders.retain(|_, tx| tx.receiver_count() > 0);
            if w.senders.is_empty() {
                w.polling = false;
                return;
            }
        }
        for id in due {
            let tx = hub
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .senders
                .get(&id)
                .cloned();
            let Some(tx) = tx else { continue };
            let seen = match store.access_request(&id).await {
                Ok(Some(ar)) => Ok(ar),
                Ok(None) => Err(format!("access request {id} disappeared")),
                Err(e) => Err(e.to_string()),
            };
            tx.send_if_modified(|old| {
                let changed = *old != seen;
                *old = seen;
                changed
            });
        }
    }
}

fn all(hub: &Mutex<Watched>) -> Vec<String> {
    hub.lock()
        .unwrap_or_else(|p| p.into_inner())
        .senders
        .keys()
        .cloned()
        .collect()
}
