//! The alerting rules and the Grafana dashboard in `deploy/` name only metrics the broker
//! exports: a running broker's `/metrics`, after it has issued, refused and failed an
//! authentication, with one working and one unreachable audit sink (labelled families appear
//! once used), is the list every `spiffe_broker_` name in them must be on. (`promtool check rules` and `promtool test rules` run in CI.)

use std::collections::BTreeSet;
use std::path::Path;

use crate::common;
use common::*;
use spiffe_broker::client::ClientIdentity;
use spiffe_broker::proto::v1 as pb;

/// Every `spiffe_broker_…` name in `text`.
fn names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for (i, _) in text.match_indices("spiffe_broker_") {
        if text[..i]
            .chars()
            .last()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            continue;
        }
        let name: String = text[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        out.insert(name);
    }
    out
}

#[tokio::test]
async fn alerts_and_dashboard_name_only_exported_metrics() {
    // An audit sink that works and one that cannot connect, so their metrics exist.
    let sinks_dir = tempfile::tempdir().expect("tempdir");
    let dead = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let dead_addr = dead.local_addr().expect("addr");
    drop(dead);
    let sinks = format!(
        "\n[[audit_sinks]]\nname = \"siem\"\ntype = \"file\"\npath = \"{}\"\n\n[[audit_sinks]]\nname = \"down\"\ntype = \"syslog\"\naddress = \"{dead_addr}\"\n",
        sinks_dir.path().join("audit.jsonl").display()
    );
    // A witness that is down, so its failure counter exists (checkpoints every second).
    let witness = spiffe_broker::cosignature::Cosigner::load_or_create(
        &sinks_dir.path().join("w.p8"),
        "witness.test/down",
    )
    .expect("witness key");
    let witnesses = format!(
        "\n[[witnesses]]\nurl = \"http://{dead_addr}\"\nvkey = \"{}\"\n",
        witness.vkey()
    );
    let h = start_with(Some(Box::new(move |c| {
        format!("checkpoint_interval = \"1s\"\n{c}{sinks}{witnesses}")
    })))
    .await;
    let mut agent = h.broker_as(DEPLOY_AGENT).await;
    agent
        .issue_credential(gpu_request(600))
        .await
        .expect("issued");
    let _ = agent
        .issue_credential(pb::IssueCredentialRequest {
            profile: "no-such-profile".into(),
            ..Default::default()
        })
        .await;
    let anonymous = ClientIdentity::Anonymous {
        bundle: vec![h.env.ca.ca_der().clone()],
    };
    let _ =
        pb::credential_broker_client::CredentialBrokerClient::new(h.channel_as(&anonymous).await)
            .issue_credential(gpu_request(600))
            .await;
    // The sinks' first passes run as the broker starts, the witness is asked at the next
    // checkpoint; wait (bounded) for both failures.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (status, metrics) = loop {
        let (status, metrics) = h.http_get("/metrics").await;
        let failed = ["audit_sink_failures_total", "witness_failures_total"]
            .iter()
            .all(|m| metrics.contains(&format!("spiffe_broker_{m}")));
        if failed || std::time::Instant::now() > deadline {
            break (status, metrics);
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(status, 200);
    let exported: BTreeSet<String> = metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    assert!(exported.contains("spiffe_broker_ready"), "{metrics}");

    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for file in ["prometheus/alerts.yml", "grafana/spiffe-broker.json"] {
        let text = std::fs::read_to_string(root.join(file)).expect(file);
        if file.ends_with(".json") {
            let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
            assert!(dash["panels"].as_array().is_some_and(|p| !p.is_empty()));
        }
        let used = names(&text);
        assert!(used.len() >= 6, "{file} names {used:?}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} names metrics the broker does not export: {unknown:?}"
        );
    }
}
