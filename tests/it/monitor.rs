//! The log monitor against a running broker's public HTTP pages: watched issuances (and
//! the later revocation of their leases) reported exactly once across restarts; a forged
//! entry page or a missing witness quorum stops it with an error, and nothing is skipped.

use crate::common;

use std::sync::Arc;

use axum::extract::{Query, State};
use axum::routing::get;
use common::*;
use spiffe_broker::checkpoint::VerifierKey;
use spiffe_broker::cosignature::{Cosigner, CosignerKey, WitnessPolicy};
use spiffe_broker::http_client::{HttpClient, Options, Trust};
use spiffe_broker::monitor::{Monitor, MonitorOptions, Watch};
use spiffe_broker::proto::v1 as pb;

/// Checkpoints only when the test signs one.
fn quiet() -> spiffe_broker::dev::ConfigEdit {
    Box::new(|s: String| format!("checkpoint_interval = \"1h\"\n{s}"))
}

fn client() -> HttpClient {
    HttpClient::new(&Options::new(Trust::System)).expect("client")
}

fn options(h: &Harness, log_url: String, state: &std::path::Path) -> MonitorOptions {
    let vkey = std::fs::read_to_string(h.env.state_dir.join("keys/log.vkey")).expect("vkey");
    MonitorOptions {
        log_url,
        log_key: VerifierKey::parse(&vkey).expect("log key"),
        witnesses: None,
        watches: vec![Watch::parse("spiffe://example.org/ci/*").expect("watch")],
        state: state.to_owned(),
    }
}

async fn issue_as(h: &Harness, id: &str) -> String {
    let mut c = h.broker_as(id).await;
    c.issue_credential(gpu_request(600))
        .await
        .expect("issued")
        .into_inner()
        .lease
        .expect("lease")
        .id
}

/// What a poll reports: (seq, kind, caller) per entry.
async fn reported(m: &mut Monitor) -> Vec<(u64, String, String)> {
    let batch = m.poll().await.expect("verified");
    let seen = batch
        .reports
        .iter()
        .map(|r| {
            (
                r.seq,
                r.entry["kind"].as_str().unwrap_or_default().to_owned(),
                r.entry["caller"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    m.commit(batch).expect("saved");
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_entries_are_reported_once_across_restarts() {
    let h = start_with(Some(quiet())).await;
    let url = format!("http://{}", h.env.http_addr);
    let state = h.dir.path().join("monitor.json");
    let first = issue_as(&h, DEPLOY_AGENT).await;
    issue_as(&h, DEPLOY_AGENT).await;
    let _ = h
        .broker_as(MODEL_RUNTIME)
        .await
        .issue_credential(gpu_request(600))
        .await; // not watched, whatever the answer
    h.env.broker.checkpoint().await.expect("checkpoint");

    let mut m = Monitor::open(options(&h, url.clone(), &state), client()).expect("monitor");
    let one = reported(&mut m).await;
    assert_eq!(one.len(), 2, "{one:?}");
    assert!(one
        .iter()
        .all(|(_, k, c)| k == "issue" && c == DEPLOY_AGENT));
    assert!(
        reported(&mut m).await.is_empty(),
        "nothing new, nothing reported"
    );

    // Restart; the operator revokes a watched lease (the entry names the operator, not the
    // holder: the monitor follows the lease), and the agent asks again.
    drop(m);
    let mut root = h.admin_as(ROOT).await;
    root.revoke(pb::RevokeRequest {
        selector: Some(pb::revoke_request::Selector::LeaseId(first)),
        reason: "rotated out".into(),
        ..Default::default()
    })
    .await
    .expect("revoked");
    issue_as(&h, DEPLOY_AGENT).await;
    h.env.broker.checkpoint().await.expect("checkpoint");
    let mut m = Monitor::open(options(&h, url, &state), client()).expect("resumes");
    let two = reported(&mut m).await;
    let kinds: Vec<&str> = two.iter().map(|(_, k, _)| k.as_str()).collect();
    assert_eq!(kinds, ["revoke", "issue"], "{two:?}");
    assert!(two[0].0 > one[1].0, "only entries after the saved position");
}

/// A proxy of the broker's log that alters one entry of every page it serves.
async fn forging_proxy(upstream: String) -> String {
    #[derive(serde::Deserialize)]
    struct Q {
        start: u64,
        limit: u64,
    }
    async fn checkpoint(State(up): State<Arc<String>>) -> String {
        let body = client()
            .get_ok(&format!("{up}/log/checkpoint"))
            .await
            .expect("up");
        String::from_utf8(body.to_vec()).expect("utf-8")
    }
    async fn entries(State(up): State<Arc<String>>, Query(q): Query<Q>) -> String {
        let url = format!("{up}/log/entries?start={}&limit={}", q.start, q.limit);
        let body = client().get_ok(&url).await.expect("up");
        let mut page: serde_json::Value = serde_json::from_slice(&body).expect("json");
        if let Some(e) = page["entries"].get_mut(1) {
            let forged = e["body"]
                .as_str()
                .expect("body")
                .replace("queue/a100", "queue/h100");
            e["body"] = forged.into();
        }
        page.to_string()
    }
    let router = axum::Router::new()
        .route("/log/checkpoint", get(checkpoint))
        .route("/log/entries", get(entries))
        .with_state(Arc::new(upstream));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, router).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_page_or_a_missing_quorum_stops_the_monitor() {
    let h = start_with(Some(quiet())).await;
    for _ in 0..3 {
        issue_as(&h, DEPLOY_AGENT).await;
    }
    h.env.broker.checkpoint().await.expect("checkpoint");
    let url = format!("http://{}", h.env.http_addr);

    let state = h.dir.path().join("forged.json");
    let proxy = forging_proxy(url.clone()).await;
    let m = Monitor::open(options(&h, proxy, &state), client()).expect("monitor");
    let err = m.poll().await.expect_err("forged entry");
    assert!(
        err.to_string()
            .contains("do not make the checkpoint's root"),
        "{err}"
    );
    assert!(!state.exists(), "no position saved, nothing reported");

    // A checkpoint no witness cosigned does not satisfy a witness policy.
    let dir = tempfile::tempdir().expect("tempdir");
    let w = Cosigner::load_or_create(&dir.path().join("w.p8"), "witness.test/w").expect("key");
    let mut opts = options(&h, url.clone(), &h.dir.path().join("witnessed.json"));
    opts.witnesses = Some(
        WitnessPolicy::new(vec![CosignerKey::parse(&w.vkey()).expect("vkey")], 1, 0)
            .expect("policy"),
    );
    let err = Monitor::open(opts, client())
        .expect("monitor")
        .poll()
        .await
        .expect_err("not witnessed");
    assert!(err.to_string().contains("cosigned by 0 of the 1"), "{err}");

    // The honest log passes, and the entries it served carry no credential.
    let mut m = Monitor::open(options(&h, url.clone(), &state), client()).expect("monitor");
    assert_eq!(reported(&mut m).await.len(), 3);
    let (status, page) = h.http_get("/log/entries?start=0&limit=1000").await;
    assert_eq!(status, 200);
    for t in h.audit_bodies() {
        assert!(
            t.get("token").is_none() && t.get("credential").is_none(),
            "{t}"
        );
    }
    assert!(!page.contains("eyJ"), "no JWT in a public entry page");
}
