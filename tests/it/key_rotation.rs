//! Rotating the token-signing key without a restart, under load: a relying party that
//! refreshes its JWKS while the new key is published ahead never meets a token it
//! cannot verify; the broker signs with the new key once `publish_ahead` has passed, and
//! keeps the retired key published for tokens still alive.

use crate::common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{gpu_request, token_of, verify_jwt, DEPLOY_AGENT};
use spiffe_broker::clock::Clock as _;
use spiffe_broker::jose::{self, JwkSet};

fn kid_of(token: &str) -> String {
    let parts = jose::split(token).expect("compact JWS");
    let header: serde_json::Value = serde_json::from_slice(&parts.header).expect("header");
    header["kid"].as_str().expect("kid").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relying_party_verifies_every_token_across_a_rotation_under_load() {
    let h = Arc::new(common::start().await);
    let first_kid = h.env.keys.current().key_id().to_owned();
    // The relying party's JWKS cache, refreshed when it chooses (here: once, while the
    // new key is published but not yet signing).
    let cache: Arc<Mutex<JwkSet>> = Arc::new(Mutex::new(h.jwks().await));
    let stop = Arc::new(AtomicBool::new(false));
    let tokens = Arc::new(Mutex::new(Vec::<String>::new()));
    let mut load = Vec::new();
    for _ in 0..3 {
        let (h, cache, stop, tokens) = (h.clone(), cache.clone(), stop.clone(), tokens.clone());
        load.push(tokio::spawn(async move {
            let mut client = h.broker_as(DEPLOY_AGENT).await;
            let mut unverifiable = 0;
            while !stop.load(Ordering::Relaxed) {
                let r = client
                    .issue_credential(gpu_request(600))
                    .await
                    .expect("issued");
                let token = token_of(&r.into_inner().credential);
                let jwks = cache.lock().expect("lock").clone();
                if jwks
                    .keys
                    .iter()
                    .any(|k| k.kid.as_deref() == Some(&kid_of(&token)))
                {
                    verify_jwt(&token, &jwks);
                } else {
                    unverifiable += 1;
                }
                tokens.lock().expect("lock").push(token);
            }
            unverifiable
        }));
    }
    let issued = |n: usize| {
        let tokens = tokens.clone();
        async move {
            let start = tokens.lock().expect("lock").len();
            while tokens.lock().expect("lock").len() < start + n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    };
    issued(20).await;

    // Stage a key, as `spiffe-broker keys rotate` does: published within a second (the
    // broker's watcher; here refreshed at once), not signing.
    let keys_dir = h.env.state_dir.join("keys");
    let now = h.clock.unix_seconds();
    let r = spiffe_broker::crypto::rotate(
        &keys_dir,
        now,
        Duration::from_secs(600),
        Duration::from_secs(3600),
    )
    .expect("rotate");
    h.env.keys.refresh(now).expect("refresh");
    issued(20).await;
    let published = h.jwks().await;
    assert!(published
        .keys
        .iter()
        .any(|k| k.kid.as_deref() == Some(&r.staged_kid)));
    assert_eq!(h.env.keys.current().key_id(), first_kid, "not signing yet");
    *cache.lock().expect("lock") = published;

    // publish_ahead passes: the new key signs; the old one is still published.
    h.clock.advance(Duration::from_secs(600));
    h.env.keys.refresh(h.clock.unix_seconds()).expect("refresh");
    assert_eq!(h.env.keys.current().key_id(), r.staged_kid);
    issued(40).await;
    stop.store(true, Ordering::Relaxed);
    let mut unverifiable = 0;
    for l in load {
        unverifiable += l.await.expect("load task");
    }
    assert_eq!(
        unverifiable, 0,
        "every token verified with the relying party's JWKS"
    );
    let tokens = tokens.lock().expect("lock").clone();
    let kids: std::collections::BTreeSet<_> = tokens.iter().map(|t| kid_of(t)).collect();
    assert!(
        kids.contains(&first_kid) && kids.contains(&r.staged_kid),
        "{kids:?}"
    );
    let after = h.jwks().await;
    assert!(
        after
            .keys
            .iter()
            .any(|k| k.kid.as_deref() == Some(&first_kid)),
        "the retired key stays published"
    );
    for t in &tokens {
        verify_jwt(t, &after);
    }
    // Once its tokens can no longer be alive (retain = 1 h after it retired), it drops out.
    h.clock.advance(Duration::from_secs(3600));
    h.env.keys.refresh(h.clock.unix_seconds()).expect("refresh");
    // The files settle at the next rotation; the view already follows the clock.
    let r2 = spiffe_broker::crypto::rotate(
        &keys_dir,
        h.clock.unix_seconds(),
        Duration::from_secs(600),
        Duration::from_secs(3600),
    )
    .expect("the next rotation settles the first");
    assert_eq!(r2.retired_kid.as_deref(), Some(first_kid.as_str()));
    h.env.keys.refresh(h.clock.unix_seconds()).expect("refresh");
    let last = h.jwks().await;
    assert!(
        !last
            .keys
            .iter()
            .any(|k| k.kid.as_deref() == Some(&first_kid)),
        "retired key gone"
    );
}
