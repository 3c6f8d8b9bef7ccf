//! The `spiffe-broker` binary as a user runs it: `dev`, `request`, `leases`, `revoke`,
//! `dev mint-svid`, `audit verify`, and `serve --config` against a Workload API.

use crate::common;

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::process::{start_dev, start_dev_with, BIN};

fn cli(args: &[&str], socket: Option<&Path>) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_remove("SPIFFE_ENDPOINT_SOCKET");
    if let Some(s) = socket {
        cmd.env("SPIFFE_ENDPOINT_SOCKET", format!("unix://{}", s.display()));
    }
    cmd.output().expect("run cli")
}

fn json(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("JSON on stdout")
}

fn one_error_line(o: &Output, needle: &str) {
    assert!(!o.status.success(), "should fail");
    let err = String::from_utf8_lossy(&o.stderr);
    // JSON log lines and clap's "try '--help'" hint aside.
    let lines: Vec<_> = err
        .lines()
        .filter(|l| {
            !l.starts_with('{') && !l.trim().is_empty() && !l.starts_with("For more information")
        })
        .collect();
    assert_eq!(lines.len(), 1, "one clear line: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "{err}"
    );
}

#[test]
fn dev_request_revoke_leases_and_audit_verify() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("sb");
    let dev = start_dev(&state);
    let agent = state.join("workloads/deploy-agent.sock");
    let root = state.join("workloads/root.sock");
    let b = ["--broker", dev.grpc.as_str()];

    let issued = json(&cli(
        &[
            &[
                "request",
                "--profile",
                "gpu-scheduler-submit",
                "--scope",
                "job:submit",
                "--ttl",
                "10m",
            ][..],
            &[
                "--intent-action",
                "submit-training",
                "--intent-target",
                "queue/a100",
            ],
            &b,
        ]
        .concat(),
        Some(&agent),
    ));
    let lease = issued["lease_id"].as_str().expect("lease id").to_owned();
    assert!(issued["token"]
        .as_str()
        .is_some_and(|t| t.split('.').count() == 3));
    assert_eq!(issued["scopes"], serde_json::json!(["job:submit"]));
    assert_eq!(issued["spiffe_id"], "spiffe://example.org/ci/deploy-agent");

    one_error_line(
        &cli(
            &[
                &[
                    "request",
                    "--profile",
                    "gpu-scheduler-submit",
                    "--scope",
                    "cluster:admin",
                ][..],
                &[
                    "--intent-action",
                    "submit-training",
                    "--intent-target",
                    "queue/a100",
                ],
                &b,
            ]
            .concat(),
            Some(&agent),
        ),
        "PermissionDenied",
    );
    one_error_line(
        &cli(
            &[
                &[
                    "request",
                    "--profile",
                    "gpu-scheduler-submit",
                    "--ttl",
                    "10x",
                ][..],
                &b,
            ]
            .concat(),
            Some(&agent),
        ),
        "--ttl",
    );
    one_error_line(
        &cli(&[&["leases"][..], &b].concat(), Some(&agent)),
        "not a platform admin",
    );

    let listed = cli(
        &[&["leases", "--state", "active"][..], &b].concat(),
        Some(&root),
    );
    assert!(listed.status.success());
    assert!(String::from_utf8_lossy(&listed.stdout).contains(&lease));
    // Piped, a listing is JSON lines; a person asks for a table or YAML.
    let lines = String::from_utf8_lossy(&listed.stdout).to_string();
    let first: serde_json::Value = serde_json::from_str(lines.lines().next().expect("a line"))
        .expect("JSON lines when stdout is not a terminal");
    assert_eq!(first["state"], "active");
    for (format, expect) in [
        (
            "table",
            vec!["LEASE".to_owned(), "STATE".to_owned(), lease.clone()],
        ),
        (
            "yaml",
            vec![
                "- lease_id: ".to_owned(),
                lease.clone(),
                "  state: active".to_owned(),
            ],
        ),
    ] {
        let o = cli(
            &[&["leases", "--state", "active", "--output", format][..], &b].concat(),
            Some(&root),
        );
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(
            o.status.success() && expect.iter().all(|e| text.contains(e.as_str())),
            "{format}: {text}"
        );
    }
    let bad = cli(
        &[&["leases", "--output", "xml"][..], &b].concat(),
        Some(&root),
    );
    let err = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "a usage error: {err}");
    assert!(
        err.contains("invalid value 'xml'") && err.contains("json, table, yaml"),
        "{err}"
    );
    let revoked = json(&cli(
        &[
            &["revoke", "--lease", lease.as_str(), "--reason", "test"][..],
            &b,
        ]
        .concat(),
        Some(&root),
    ));
    assert_eq!(revoked["revoked"], serde_json::json!([lease]));

    // A test SVID from files instead of the Workload API.
    let files = dir.path().join("runtime");
    let minted = cli(
        &[
            "dev",
            "mint-svid",
            "spiffe://example.org/ml/model-runtime",
            "--out",
            files.to_str().expect("utf8"),
            "--state-dir",
            state.to_str().expect("utf8"),
        ],
        None,
    );
    assert!(
        minted.status.success(),
        "{}",
        String::from_utf8_lossy(&minted.stderr)
    );
    let f = |n: &str| files.join(n).display().to_string();
    let data = json(&cli(
        &[
            &["request", "--profile", "dataset-read"][..],
            &[
                "--svid-cert",
                &f("svid.pem"),
                "--svid-key",
                &f("svid.key"),
                "--bundle",
                &f("bundle.pem"),
            ],
            &b,
        ]
        .concat(),
        None,
    ));
    assert_eq!(data["scopes"], serde_json::json!(["dataset:read"]));

    // Graceful stop on SIGTERM, then the ledger verifies offline.
    let pid = dev.child.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill")
        .success());
    let mut dev = dev;
    let status = dev.child.wait().expect("wait");
    assert!(status.success(), "dev exits cleanly on SIGTERM: {status:?}");
    let report = json(&cli(
        &[
            "audit",
            "verify",
            "--state-dir",
            state.to_str().expect("utf8"),
        ],
        None,
    ));
    assert_eq!(report["ok"], true);
    assert!(report["entries"].as_u64().expect("entries") >= 5);
}

#[tokio::test]
async fn serve_with_a_config_file_gets_its_identity_from_the_workload_api() {
    // The in-process dev environment provides the Workload API (as SPIRE would).
    let h = common::start().await;
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
    };
    let (grpc, http) = (free(), free());
    let state = h.dir.path().join("served");
    let config = h.dir.path().join("serve.toml");
    let own_socket = format!(
        "unix://{}",
        state.join("workloads").join("spiffe-broker.sock").display()
    );
    let dev_socket = format!(
        "unix://{}",
        h.env.socket(spiffe_broker::dev::BROKER_ID).display()
    );
    let text =
        spiffe_broker::dev::demo_config(&state, grpc, http).replace(&own_socket, &dev_socket);
    assert!(text.contains(&dev_socket));
    std::fs::write(&config, text).expect("config");
    spiffe_broker::dev::write_demo_policy(&state).expect("policy files");
    spiffe_broker::issuer::x509::IssuingCa::create_dev(&state).expect("issuing CA");
    let mut child = Command::new(BIN)
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn serve");
    let mut ready = false;
    for _ in 0..200 {
        if let Ok(Ok(mut s)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(http)).await
        {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let _ = s
                .write_all(b"GET /readyz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await;
            let mut buf = String::new();
            let _ = s.read_to_string(&mut buf).await;
            if buf.starts_with("HTTP/1.1 200") {
                ready = true;
                break;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(ready, "serve becomes ready");
    let agent = h.env.socket(common::DEPLOY_AGENT);
    let grpc_addr = grpc.to_string();
    let out = tokio::task::spawn_blocking(move || {
        cli(
            &[
                "request",
                "--profile",
                "gpu-scheduler-submit",
                "--scope",
                "job:read",
                "--intent-action",
                "a",
                "--intent-target",
                "queue/b",
                "--broker",
                &grpc_addr,
            ],
            Some(&agent),
        )
    })
    .await
    .expect("join");
    let v = json(&out);
    assert_eq!(v["scopes"], serde_json::json!(["job:read"]));
    let _ = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    assert!(child.wait().expect("wait").success());
    assert!(state.join("ledger.db").exists());
}

/// `exchange` reads the subject token from a file (never argv), prints the chain; `leases
/// --tree` shows the derivation under its root; the person's `release` (a logout) ends it.
#[test]
fn exchange_and_the_derivation_tree_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("sb");
    let dev = start_dev(&state);
    let alice = state.join("workloads/alice.sock");
    let agent = state.join("workloads/deploy-agent.sock");
    let root = state.join("workloads/root.sock");
    let b = ["--broker", dev.grpc.as_str()];

    let session = json(&cli(
        &[
            &["request", "--profile", "agent-delegation", "--ttl", "20m"][..],
            &b,
        ]
        .concat(),
        Some(&alice),
    ));
    let token_file = dir.path().join("subject.jwt");
    std::fs::write(&token_file, session["token"].as_str().expect("token")).expect("write");
    let exchanged = json(&cli(
        &[
            &[
                "exchange",
                "--subject-token",
                token_file.to_str().expect("path"),
                "--profile",
                "gpu-scheduler-submit",
                "--scope",
                "job:submit",
                "--intent-action",
                "submit-training",
                "--intent-target",
                "queue/a100",
            ][..],
            &b,
        ]
        .concat(),
        Some(&agent),
    ));
    assert_eq!(
        exchanged["delegation"]["subject"],
        "spiffe://example.org/ops/alice"
    );
    assert_eq!(
        exchanged["delegation"]["actors"],
        serde_json::json!(["spiffe://example.org/ci/deploy-agent"])
    );
    assert_eq!(
        exchanged["issued_token_type"],
        "urn:ietf:params:oauth:token-type:access_token"
    );
    let root_lease = session["lease_id"].as_str().expect("lease").to_owned();
    let tree = cli(
        &[
            &["leases", "--tree", root_lease.as_str(), "--output", "table"][..],
            &b,
        ]
        .concat(),
        Some(&root),
    );
    let text = String::from_utf8_lossy(&tree.stdout).to_string();
    assert!(
        tree.status.success(),
        "{}",
        String::from_utf8_lossy(&tree.stderr)
    );
    let child = exchanged["lease_id"].as_str().expect("lease");
    let lines: Vec<&str> = text.lines().collect();
    assert!(
        lines.iter().any(|l| l.starts_with(root_lease.as_str())),
        "{text}"
    );
    assert!(
        lines.iter().any(|l| l.starts_with(&format!("  {child}"))),
        "the derived lease is indented under its root: {text}"
    );
    // Bad input: an unknown token type, a missing file.
    one_error_line(
        &cli(
            &[
                &[
                    "exchange",
                    "--subject-token",
                    "/nonexistent/token",
                    "--profile",
                    "gpu-scheduler-submit",
                ][..],
                &b,
            ]
            .concat(),
            Some(&agent),
        ),
        "/nonexistent/token",
    );
    // Alice logs out: the agent's lease is revoked with hers.
    json(&cli(
        &[&["release", "--lease", root_lease.as_str()][..], &b].concat(),
        Some(&alice),
    ));
    let rows: Vec<serde_json::Value> = String::from_utf8_lossy(
        &cli(
            &[
                &["leases", "--tree", root_lease.as_str(), "--output", "json"][..],
                &b,
            ]
            .concat(),
            Some(&root),
        )
        .stdout,
    )
    .lines()
    .map(|l| serde_json::from_str(l).expect("JSON line"))
    .collect();
    let state_of = |id: &str| {
        rows.iter()
            .find(|r| r["lease_id"] == id)
            .map(|r| r["state"].as_str().unwrap_or_default().to_owned())
    };
    assert_eq!(state_of(&root_lease).as_deref(), Some("released"));
    assert_eq!(state_of(child).as_deref(), Some("revoked"));
}

/// `policy replay` decides the ledger's requests again with a candidate policy: removing a
/// permit reports exactly the grants it would deny; a widening candidate is reported and,
/// with `--fail-on-widening` (what a CI policy check runs), fails.
#[test]
fn policy_replay_reports_what_a_candidate_would_change() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("sb");
    let dev = start_dev(&state);
    let b = ["--broker", dev.grpc.as_str()];
    let runtime = state.join("workloads/model-runtime.sock");
    let agent = state.join("workloads/deploy-agent.sock");
    for _ in 0..2 {
        json(&cli(
            &[&["request", "--profile", "dataset-read"][..], &b].concat(),
            Some(&runtime),
        ));
    }
    // Refused under the policy in force: the deploy agent may not read datasets.
    assert!(!cli(
        &[&["request", "--profile", "dataset-read"][..], &b].concat(),
        Some(&agent)
    )
    .status
    .success());
    drop(dev);

    let policy = std::fs::read_to_string(state.join("policy/demo.cedar")).expect("policy");
    let start = policy
        .find("@id(\"model-serving/dataset-read\")")
        .expect("the permit");
    let end = start + policy[start..].find(");\n").expect("its end") + 3;
    let narrower = dir.path().join("narrower");
    std::fs::create_dir(&narrower).expect("dir");
    std::fs::write(
        narrower.join("demo.cedar"),
        format!("{}{}", &policy[..start], &policy[end..]),
    )
    .expect("write");
    let config = state.join("config.toml");
    let replay = |candidate: &Path, extra: &[&str]| {
        cli(
            &[
                &[
                    "policy",
                    "replay",
                    "--config",
                    config.to_str().expect("path"),
                    "--candidate",
                    candidate.to_str().expect("path"),
                ][..],
                extra,
            ]
            .concat(),
            None,
        )
    };
    let r = json(&replay(&narrower, &[]));
    assert_eq!(r["widens"], false);
    assert_eq!(
        r["changes"],
        serde_json::json!([{
            "identity": "spiffe://example.org/ml/model-runtime",
            "profile": "dataset-read",
            "from": "allow",
            "to": "deny",
            "count": 2,
            "examples": r["changes"][0]["examples"],
            "widens": false,
        }]),
        "exactly the two grants it would deny: {r}"
    );
    assert!(r["replayed"].as_u64().expect("replayed") >= 3);

    let wider = dir.path().join("wider");
    std::fs::create_dir(&wider).expect("dir");
    std::fs::write(
        wider.join("demo.cedar"),
        policy.clone()
            + "\n@id(\"everyone/datasets\")\npermit (principal, action == SpiffeBroker::Action::\"issue\", resource == SpiffeBroker::Profile::\"dataset-read\");\n",
    )
    .expect("write");
    let r = json(&replay(&wider, &[]));
    assert_eq!(r["widens"], true);
    let c = &r["changes"][0];
    assert_eq!(
        (&c["identity"], &c["from"], &c["to"]),
        (
            &serde_json::json!("spiffe://example.org/ci/deploy-agent"),
            &serde_json::json!("deny"),
            &serde_json::json!("allow")
        )
    );
    one_error_line(&replay(&wider, &["--fail-on-widening"]), "gives more");
    one_error_line(&replay(dir.path(), &[]), "no .cedar files");
}

/// A one-request HTTP receiver on a thread: answers 204 and hands over the body.
fn one_post_receiver() -> (String, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead as _, Read as _, Write as _};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        let mut reader = std::io::BufReader::new(stream);
        let mut length = 0usize;
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
            if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        let _ = reader.read_exact(&mut body);
        let _ = reader
            .get_mut()
            .write_all(b"HTTP/1.1 204 No Content\r\ncontent-length: 0\r\n\r\n");
        let _ = tx.send(String::from_utf8_lossy(&body).into_owned());
    });
    (url, rx)
}

/// `monitor --once`, as an auditor's cron job runs it: the watched identity's issuances as
/// JSON lines, verified against the signed checkpoint; nothing again on the next run; the
/// batch also posted to `--webhook`; a bad watch refused with one clear line.
#[test]
fn monitor_reports_watched_issuances_once_from_the_cli() {
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("sb");
    let dev = start_dev_with(&state, &["--checkpoint-interval", "1s"]);
    let b = ["--broker", dev.grpc.as_str()];
    let agent = state.join("workloads/deploy-agent.sock");
    for _ in 0..2 {
        json(&cli(
            &[
                &[
                    "request",
                    "--profile",
                    "gpu-scheduler-submit",
                    "--scope",
                    "job:submit",
                    "--intent-action",
                    "submit-training",
                    "--intent-target",
                    "queue/a100",
                ][..],
                &b,
            ]
            .concat(),
            Some(&agent),
        ));
    }
    let log_key = state.join("keys/log.vkey");
    let monitor_state = dir.path().join("monitor.json");
    let (hook, posted) = one_post_receiver();
    let monitor = |extra: &[&str]| {
        let mut args = vec![
            "monitor",
            "--log",
            dev.http.as_str(),
            "--log-key",
            log_key.to_str().expect("path"),
            "--watch",
            "spiffe://example.org/ci/*",
            "--state",
            monitor_state.to_str().expect("path"),
            "--once",
        ];
        args.extend_from_slice(extra);
        cli(&args, None)
    };
    // Following the log (the checkpointer signs within a second), until both arrive.
    let mut follow = Command::new(BIN)
        .args([
            "monitor",
            "--log",
            dev.http.as_str(),
            "--log-key",
            log_key.to_str().expect("path"),
            "--watch",
            "spiffe://example.org/ci/*",
            "--state",
            monitor_state.to_str().expect("path"),
            "--interval",
            "1s",
            "--webhook",
            hook.as_str(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("monitor");
    let stdout = follow.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead as _;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let first: Vec<serde_json::Value> = (0..2)
        .map(|_| {
            let line = rx
                .recv_timeout(Duration::from_secs(30))
                .expect("a report in time");
            serde_json::from_str(&line).expect("a JSON line")
        })
        .collect();
    let body = posted
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook got the batch");
    // The position is saved after the webhook answered; wait (bounded) for it, so the
    // stop below is a clean one (a kill before the save repeats the batch, by design).
    let last = first
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .max()
        .expect("seq");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::fs::read(&monitor_state)
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .and_then(|v| v["size"].as_u64())
        .is_none_or(|size| size < last)
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the monitor saved its position"
        );
        let _ = rx.recv_timeout(Duration::from_millis(50));
    }
    let _ = follow.kill();
    let _ = follow.wait();
    assert_eq!(first.len(), 2, "{first:?}");
    for r in &first {
        assert_eq!(r["entry"]["kind"], "issue");
        assert_eq!(r["entry"]["caller"], "spiffe://example.org/ci/deploy-agent");
    }
    let posted: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(posted["reports"].as_array().map(Vec::len), Some(2));
    let again = monitor(&[]);
    assert!(again.status.success());
    assert!(again.stdout.is_empty(), "nothing twice");
    one_error_line(
        &cli(
            &[
                "monitor",
                "--log",
                dev.http.as_str(),
                "--log-key",
                log_key.to_str().expect("path"),
                "--watch",
                "example.org/ci",
            ],
            None,
        ),
        "--watch",
    );
}
