//! Admission for long-lived streams (`WatchAccessRequest`, `WatchRevocations`): a stream
//! holds one of the broker's in-flight slots for as long as it is open, and one of its
//! caller's stream slots, so no identity can pin the broker with idle streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::OwnedSemaphorePermit;

use super::Broker;
use crate::authn::VerifiedCaller;
use crate::error::BrokerError;

/// Open streams per identity.
#[derive(Default)]
pub(super) struct StreamCounts(Arc<Mutex<HashMap<String, usize>>>);

/// An open stream's admission: released when the stream ends.
pub struct StreamSlot {
    _permit: OwnedSemaphorePermit,
    counts: Arc<Mutex<HashMap<String, usize>>>,
    who: String,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut c = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = c.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                c.remove(&self.who);
            }
        }
    }
}

impl Broker {
    /// Admits one stream for `caller`: a registered identity under its stream limit,
    /// while the broker has an in-flight slot. Refusals are recorded.
    pub(super) async fn stream_slot(
        &self,
        caller: &VerifiedCaller,
        rpc: &str,
        admitted: Option<OwnedSemaphorePermit>,
    ) -> Result<StreamSlot, BrokerError> {
        let who = caller.id().to_string();
        if !self.is_registered(caller) {
            let err = BrokerError::PermissionDenied(format!(
                "{who} is not a registered identity; only registered identities open streams"
            ));
            return Err(self.reject(caller, rpc, err).await);
        }
        let Some(permit) = admitted.or_else(|| self.admit()) else {
            self.metrics.denied("overloaded");
            return Err(BrokerError::ResourceExhausted(
                "the broker is at its concurrent request limit; retry with back-off".into(),
            ));
        };
        let mut counts = self.streams.0.lock().unwrap_or_else(|p| p.into_inner());
        let open = counts.entry(who.clone()).or_default();
        if *open >= self.limits().max_streams_per_identity {
            self.metrics.denied("stream_limit");
            return Err(BrokerError::ResourceExhausted(format!(
                "{who} already holds {open} open streams (the limit per identity); close one first"
            )));
        }
        *open += 1;
        Ok(StreamSlot {
            _permit: permit,
            counts: self.streams.0.clone(),
            who,
        })
    }
}
