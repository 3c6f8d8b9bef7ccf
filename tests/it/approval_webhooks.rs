//! Approval webhooks (`[[audit_sinks]] type = "webhook"`): a real approval flow over mTLS,
//! posted over https to a receiver with its own CA, signed per Standard Webhooks with two
//! secrets (rotation); a receiver down for a while gets every message once it is back, in
//! order, and a restarted broker neither loses nor repeats one. Slack messages escape what
//! requesters wrote. (`tests/crosscheck/webhooks_check.py` verifies the signatures with the
//! reference `standardwebhooks` library.)

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use common::*;
use spiffe_broker::config::{SinkKind, WebhookFormat};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::sinks::Pass;

/// What the receiver accepted: (headers, body), in arrival order.
type Got = Arc<Mutex<Vec<(HeaderMap, String)>>>;

struct Receiver {
    url: String,
    ca_file: std::path::PathBuf,
    got: Got,
    down: Arc<Mutex<bool>>,
}

/// An https receiver on a certificate of its own CA; answers 503 while down.
async fn receiver(dir: &std::path::Path) -> Receiver {
    let pki = pki::pki(&["127.0.0.1"]);
    let cert = pki::write(dir, "recv.pem", &pki.cert_pem);
    let key = pki::write(dir, "recv.key", &pki.key_pem);
    let ca_file = pki::write(dir, "recv-ca.pem", &pki.ca_pem);
    let got: Got = Arc::default();
    let down = Arc::new(Mutex::new(false));
    let router = axum::Router::new().route(
        "/hook",
        post({
            let (got, down) = (got.clone(), down.clone());
            move |headers: HeaderMap, body: String| async move {
                if *down.lock().expect("lock") {
                    return StatusCode::SERVICE_UNAVAILABLE;
                }
                got.lock().expect("lock").push((headers, body));
                StatusCode::NO_CONTENT
            }
        }),
    );
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = tcp.local_addr().expect("addr");
    let config = spiffe_broker::server::https::server_config(&cert, &key).expect("tls");
    let listener =
        spiffe_broker::server::https::HttpsListener::new(tcp, config, 64, Duration::from_secs(10))
            .expect("listener");
    tokio::spawn(async move { axum::serve(listener, router).await });
    Receiver {
        url: format!("https://{addr}/hook"),
        ca_file,
        got,
        down,
    }
}

/// `whsec_` secrets (two: the new one and the one being retired), mode 0600.
fn secrets(dir: &std::path::Path) -> (std::path::PathBuf, Vec<Vec<u8>>) {
    let keys = vec![vec![7u8; 32], vec![9u8; 32]];
    let text: String = keys
        .iter()
        .map(|k| format!("whsec_{}\n", STANDARD.encode(k)))
        .collect();
    let path = dir.join("webhook.secret");
    spiffe_broker::files::write_private(&path, text.as_bytes()).expect("secret file");
    (path, keys)
}

/// The Standard Webhooks check, written from the spec: each `v1,` signature is
/// base64(HMAC-SHA256(secret, "{id}.{timestamp}.{body}")).
fn signed_by(headers: &HeaderMap, body: &str, key: &[u8]) -> bool {
    let h = |n: &str| headers[n].to_str().expect("ascii").to_owned();
    let msg = format!("{}.{}.{body}", h("webhook-id"), h("webhook-timestamp"));
    let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    let want = STANDARD.encode(ring::hmac::sign(&k, msg.as_bytes()));
    h("webhook-signature")
        .split(' ')
        .any(|s| s.strip_prefix("v1,") == Some(want.as_str()))
}

async fn drain(s: &mut spiffe_broker::sinks::Shipper) -> Result<(), String> {
    loop {
        match s.pass().await.map_err(|e| e.to_string())? {
            Pass::More => continue,
            Pass::Idle => return Ok(()),
        }
    }
}

fn push_request(target: &str) -> pb::IssueCredentialRequest {
    pb::IssueCredentialRequest {
        profile: "model-registry-push".into(),
        intent: Some(pb::Intent {
            action: "push-model".into(),
            target: target.into(),
            artifact_digest:
                "sha256:9372c470eeadd5ecd9c3c74c2b3cb633f8e2f2fad799250a0f70d652b6b825e4".into(),
            ticket: "CHG-1234".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Opens a request as the deploy agent and has alice approve it; returns its id.
async fn approved_request(h: &Harness, target: &str) -> String {
    let ar = h
        .broker_as(DEPLOY_AGENT)
        .await
        .issue_credential(push_request(target))
        .await
        .expect("pending")
        .into_inner()
        .access_request
        .expect("an access request");
    let id = h.identity(ALICE).await;
    pb::approvals_client::ApprovalsClient::new(h.channel_as(&id).await)
        .review_access_request(pb::ReviewAccessRequestRequest {
            id: ar.id.clone(),
            approve: true,
            reason: "digest matches the release notes".into(),
        })
        .await
        .expect("approved");
    ar.id
}

fn types(got: &Got) -> Vec<(String, String)> {
    got.lock()
        .expect("lock")
        .iter()
        .map(|(_, b)| {
            let v: serde_json::Value = serde_json::from_str(b).expect("json");
            (
                v["type"].as_str().expect("type").to_owned(),
                v["data"]["access_request_id"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approvals_reach_a_webhook_in_order_across_outages_and_restarts() {
    let h = start().await;
    let r = receiver(h.dir.path()).await;
    let (secret_file, keys) = secrets(h.dir.path());
    let kind = SinkKind::Webhook {
        url: r.url.clone(),
        format: WebhookFormat::StandardWebhooks,
        secret_file: Some(secret_file.clone()),
        console_url: Some("https://broker.example/requests".into()),
        ca_file: Some(r.ca_file.clone()),
    };
    let mut s = crate::audit_sinks::shipper(&h, "approvers", kind.clone(), "a");

    let first = approved_request(&h, "models/llama").await;
    drain(&mut s).await.expect("delivered");
    assert_eq!(
        types(&r.got),
        [
            ("access_request.pending".to_owned(), first.clone()),
            ("access_request.reviewed".to_owned(), first.clone()),
        ]
    );
    {
        let got = r.got.lock().expect("lock");
        let (headers, body) = &got[0];
        for k in &keys {
            assert!(
                signed_by(headers, body, k),
                "each secret signs: {headers:?}"
            );
        }
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        assert_eq!(v["data"]["requester"], DEPLOY_AGENT);
        assert_eq!(v["data"]["intent"]["target"], "models/llama");
        assert_eq!(
            v["data"]["url"],
            format!("https://broker.example/requests/{first}")
        );
        let review: serde_json::Value = serde_json::from_str(&got[1].1).expect("json");
        assert_eq!(
            (&review["data"]["reviewer"], &review["data"]["verdict"]),
            (&serde_json::json!(ALICE), &serde_json::json!("approve"))
        );
        // The request itself, from the ledger: who asked, for what, how many approved.
        let d = &review["data"];
        assert_eq!(d["requester"], DEPLOY_AGENT);
        assert_eq!(d["intent"]["target"], "models/llama");
        assert_eq!(
            (&d["approvals"], &d["threshold"]),
            (&serde_json::json!(1), &serde_json::json!(1))
        );
        assert!(d["scopes"].as_array().is_some_and(|s| !s.is_empty()), "{d}");
        assert!(d["ttl_secs"].as_u64().is_some(), "{d}");
        assert_ne!(
            headers["webhook-id"], got[1].0["webhook-id"],
            "one id per message"
        );
    }

    // The receiver goes down: nothing is lost, nothing skipped, the sink's position waits.
    *r.down.lock().expect("lock") = true;
    let second = approved_request(&h, "models/mistral").await;
    assert!(drain(&mut s).await.is_err(), "a 503 is a failed delivery");
    assert_eq!(types(&r.got).len(), 2);
    *r.down.lock().expect("lock") = false;

    // The broker restarts (a new shipper, as a new process would be): it resumes from
    // the stored position and delivers each message once.
    drop(s);
    h.clock.advance(Duration::from_secs(61)); // the old holder's hold lapses
    let mut s = crate::audit_sinks::shipper(&h, "approvers", kind, "b");
    drain(&mut s).await.expect("delivered after the outage");
    let all = types(&r.got);
    assert_eq!(
        all[2..],
        [
            ("access_request.pending".to_owned(), second.clone()),
            ("access_request.reviewed".to_owned(), second.clone()),
        ],
        "{all:?}"
    );
    let third = approved_request(&h, "models/phi").await;
    drain(&mut s).await.expect("delivered");
    assert_eq!(types(&r.got).len(), 6, "nothing repeated");
    assert_eq!(types(&r.got)[5].1, third);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slack_messages_link_to_the_request_and_escape_what_requesters_wrote() {
    let h = start().await;
    let r = receiver(h.dir.path()).await;
    let mut s = crate::audit_sinks::shipper(
        &h,
        "slack",
        SinkKind::Webhook {
            url: r.url.clone(),
            format: WebhookFormat::Slack,
            secret_file: None,
            console_url: Some("https://broker.example/requests".into()),
            ca_file: Some(r.ca_file.clone()),
        },
        "a",
    );
    let id = approved_request(&h, "models/<!channel>").await;
    drain(&mut s).await.expect("delivered");
    let got = r.got.lock().expect("lock");
    let msg: serde_json::Value = serde_json::from_str(&got[0].1).expect("json");
    let text = msg.to_string();
    assert!(
        !text.contains("<!channel>"),
        "no broadcast from a requester's text: {text}"
    );
    assert!(text.contains("&lt;!channel&gt;"), "{text}");
    let blocks = msg["blocks"].as_array().expect("blocks");
    assert_eq!(blocks[0]["type"], "section");
    let button = blocks
        .iter()
        .find(|b| b["type"] == "actions")
        .expect("a button");
    assert_eq!(
        button["elements"][0]["url"],
        format!("https://broker.example/requests/{id}")
    );
    assert!(msg["text"]
        .as_str()
        .is_some_and(|t| t.contains("Approval needed")));
}
