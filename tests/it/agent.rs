//! `spiffe-broker agent` against a running dev broker over real mTLS, on a manual clock:
//! credentials written atomically and renewed, a revoked lease replaced, a refused one
//! removed, the broker killed and restarted, expiry while it is away, and bad input that
//! writes nothing.

use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::process::ExitStatusExt as _;
use std::path::Path;
use std::time::Duration;

use spiffe_broker::agent::{Agent, AgentConfig, CredentialStatus, State};
use spiffe_broker::clock::Clock as _;
use spiffe_broker::dev::{self, DevOptions};
use spiffe_broker::proto::v1 as pb;
use spiffe_broker::proto::v1::revoke_request::Selector;
use tokio::sync::watch;

use crate::common::{self, Harness, DEPLOY_AGENT, ROOT};

const GPU: &str = r#"
[[credential]]
name = "gpu"
profile = "gpu-scheduler-submit"
scopes = ["job:submit"]
ttl = "10m"
intent = { action = "submit-training", target = "queue/a100" }
format = "token"
"#;

/// A helper config reaching `h`'s broker as the deploy agent (Workload API), with
/// `credentials` (each `[[credential]]` without its `path`, which is added under `dir`).
fn config(h: &Harness, dir: &Path, head: &str, credentials: &[&str]) -> AgentConfig {
    let mut text = format!(
        "broker = \"{}\"\nbroker_id = \"{}\"\nhealth_addr = \"127.0.0.1:0\"\nretry_max = \"2s\"\n{head}\n",
        h.env.grpc_addr,
        dev::BROKER_ID,
    );
    if !head.contains("svid_cert") {
        text += &format!(
            "workload_api = \"unix://{}\"\n",
            h.env.socket(DEPLOY_AGENT).display()
        );
    }
    for (i, c) in credentials.iter().enumerate() {
        text += &format!(
            "{c}\npath = \"{}\"\n",
            dir.join(format!("cred{i}")).display()
        );
    }
    AgentConfig::from_toml(&text).expect("helper config")
}

async fn until(
    rx: &mut watch::Receiver<CredentialStatus>,
    what: &str,
    f: impl FnMut(&CredentialStatus) -> bool,
) -> CredentialStatus {
    let seen = tokio::time::timeout(Duration::from_secs(30), rx.wait_for(f))
        .await
        .map(|r| r.expect("keeper alive").clone());
    seen.unwrap_or_else(|_| panic!("timed out waiting for: {what}; status {:?}", rx.borrow()))
}

fn lease_state(h: &Harness, lease: &str) -> String {
    let conn = rusqlite::Connection::open(h.ledger_path()).expect("open ledger");
    conn.query_row("SELECT state FROM leases WHERE id = ?1", [lease], |r| {
        r.get(0)
    })
    .expect("lease row")
}

fn files_in(dir: &Path) -> Vec<String> {
    let mut names: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn the_helper_writes_renews_signals_and_releases() {
    let h = common::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let hook_log = dir.path().join("hooks");
    let out = tempfile::tempdir().expect("tempdir");
    // A process to signal after the certificate is written (it dies of SIGTERM).
    let mut child = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    let pid_file = dir.path().join("pid");
    std::fs::write(&pid_file, child.id().to_string()).expect("pid file");
    let gpu_with_hook = format!(
        "{GPU}command = [\"sh\", \"-c\", \"echo written >> {}\"]",
        hook_log.display()
    );
    let cert = format!(
        "[[credential]]\nname = \"node\"\nprofile = \"gpu-node-cert\"\nintent = {{ action = \"join\", target = \"node/a100-1\" }}\nformat = \"pem\"\nsignal = {{ pid_file = \"{}\", signal = \"TERM\" }}",
        pid_file.display()
    );
    let agent = Agent::start(
        config(&h, out.path(), "", &[&gpu_with_hook, &cert]),
        h.clock.clone(),
    )
    .await
    .expect("helper starts");
    let mut gpu = agent.watch(0);
    let first = until(&mut gpu, "first write", |s| s.writes == 1).await;
    let node = until(&mut agent.watch(1), "certificate written", |s| {
        s.writes == 1
    })
    .await;
    assert_eq!(first.state, State::Fresh);

    // The token: mode 0600, verifies against the broker's JWKS, names the lease.
    let path = out.path().join("cred0");
    let mode = std::fs::metadata(&path).expect("stat").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let token = std::fs::read_to_string(&path).expect("token");
    let claims = common::verify_jwt(&token, &h.jwks().await);
    assert_eq!(claims["sub"], DEPLOY_AGENT);
    assert_eq!(claims["jti"], first.lease_id.clone().expect("lease"));
    // The certificate and its key in one file, the key the one the CSR was made with.
    let pem = std::fs::read_to_string(out.path().join("cred1")).expect("pem");
    assert!(pem.contains("BEGIN CERTIFICATE") && pem.contains("BEGIN PRIVATE KEY"));
    assert_eq!(
        lease_state(&h, node.lease_id.as_deref().expect("lease")),
        "active"
    );
    let status = child.wait().expect("child");
    assert_eq!(status.signal(), Some(15), "the process was signalled");

    // Ready, and the status shows no secret.
    let addr = agent.health_addr().expect("health").to_string();
    let (code, body) = common::http_get(&addr, "/ready").await;
    assert_eq!(code, 200, "{body}");
    assert!(
        !body.contains(&token) && body.contains("\"fresh\""),
        "{body}"
    );
    assert_eq!(common::http_get(&addr, "/live").await.0, 200);

    // Past half of the 10-minute lifetime: renewed in place, same lease, new token.
    h.clock.advance(Duration::from_secs(301));
    agent.wake();
    let second = until(&mut gpu, "renewal", |s| s.writes == 2).await;
    assert_eq!(second.lease_id, first.lease_id);
    let renewed = std::fs::read_to_string(&path).expect("token");
    assert_ne!(renewed, token);
    assert_eq!(
        std::fs::read_to_string(&hook_log).expect("hook log"),
        "written\nwritten\n",
        "the command ran after each write"
    );

    // Shutdown gives the leases back and removes the files.
    agent.shutdown().await;
    assert_eq!(
        lease_state(&h, first.lease_id.as_deref().expect("lease")),
        "released"
    );
    assert!(
        files_in(out.path()).is_empty(),
        "{:?}",
        files_in(out.path())
    );
}

#[tokio::test]
async fn a_revoked_lease_is_replaced_and_a_refused_credential_removed() {
    let h = common::start().await;
    let out = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(config(&h, out.path(), "", &[GPU]), h.clock.clone())
        .await
        .expect("helper starts");
    let mut gpu = agent.watch(0);
    let first = until(&mut gpu, "first write", |s| s.writes == 1).await;
    let mut root = h.admin_as(ROOT).await;
    let revoke = |lease: String| pb::RevokeRequest {
        selector: Some(Selector::LeaseId(lease)),
        reason: "runner compromised".into(),
        ..Default::default()
    };
    root.revoke(revoke(first.lease_id.clone().expect("lease")))
        .await
        .expect("revoke");

    // At renewal time the revoked lease cannot be renewed: a new one is asked for.
    h.clock.advance(Duration::from_secs(301));
    agent.wake();
    let second = until(&mut gpu, "a new lease", |s| s.writes == 2).await;
    assert_ne!(second.lease_id, first.lease_id);
    assert_eq!(second.state, State::Fresh);

    // Locked out and revoked again: renewal and a new request are both refused, so the
    // file goes and the status says why.
    root.create_lock(pb::CreateLockRequest {
        kind: "spiffe_id".into(),
        value: DEPLOY_AGENT.into(),
        until: Some(prost_types::Timestamp {
            seconds: spiffe_broker::clock::unix_seconds(h.clock.now()) + 3600,
            nanos: 0,
        }),
        reason: "pipeline under investigation".into(),
    })
    .await
    .expect("lock");
    root.revoke(revoke(second.lease_id.clone().expect("lease")))
        .await
        .expect("revoke");
    h.clock.advance(Duration::from_secs(301));
    agent.wake();
    let refused = until(&mut gpu, "refused", |s| s.state == State::Refused).await;
    assert!(!refused.on_disk);
    assert!(files_in(out.path()).is_empty());
    let message = refused.message.expect("reason");
    assert!(
        message.contains("could not be renewed") && message.contains("PermissionDenied"),
        "{message}"
    );
    let (code, _) =
        common::http_get(&agent.health_addr().expect("health").to_string(), "/ready").await;
    assert_eq!(code, 503);
    agent.shutdown().await;
}

#[tokio::test]
async fn with_the_broker_gone_the_credential_is_kept_until_it_expires_and_renewed_when_it_is_back()
{
    let h = common::start().await;
    // The helper's SVID from files (as spiffe-helper writes them): it outlives the
    // broker's Workload API.
    let svid = h
        .env
        .ca
        .mint_x509_svid(
            &spiffe::SpiffeId::new(DEPLOY_AGENT).expect("id"),
            Duration::from_secs(3600),
        )
        .expect("svid");
    let files = h.dir.path().join("svid");
    std::fs::create_dir_all(&files).expect("dir");
    std::fs::write(files.join("svid.pem"), &svid.cert_pem).expect("cert");
    std::fs::write(files.join("svid.key"), svid.key_pem.as_bytes()).expect("key");
    std::fs::write(files.join("bundle.pem"), h.env.ca.bundle_pem()).expect("bundle");
    let head = format!(
        "svid_cert = \"{0}/svid.pem\"\nsvid_key = \"{0}/svid.key\"\nbundle = \"{0}/bundle.pem\"",
        files.display()
    );
    let out = tempfile::tempdir().expect("tempdir");
    let agent = Agent::start(config(&h, out.path(), &head, &[GPU]), h.clock.clone())
        .await
        .expect("helper starts");
    let mut gpu = agent.watch(0);
    let first = until(&mut gpu, "first write", |s| s.writes == 1).await;
    let token = std::fs::read_to_string(out.path().join("cred0")).expect("token");

    // The broker stops. Renewal fails; the credential stays on disk, unchanged.
    let Harness {
        env,
        clock,
        dir: _keep,
    } = h;
    let (grpc_addr, http_addr, state_dir) = (env.grpc_addr, env.http_addr, env.state_dir.clone());
    env.shutdown().await.expect("broker stops");
    clock.advance(Duration::from_secs(301));
    agent.wake();
    let retrying = until(&mut gpu, "retrying", |s| s.state == State::Retrying).await;
    assert!(retrying.on_disk);
    assert_eq!(
        std::fs::read_to_string(out.path().join("cred0")).expect("kept"),
        token
    );

    // Past its expiry it is removed: an expired credential is no credential.
    clock.advance(Duration::from_secs(300));
    agent.wake();
    let gone = until(&mut gpu, "removed at expiry", |s| !s.on_disk).await;
    assert_eq!(gone.state, State::Retrying);
    assert!(files_in(out.path()).is_empty());

    // The broker comes back on the same address and state: the helper asks again on its
    // own (back-off of at most 2 s) and writes a new credential.
    let env = dev::start(DevOptions {
        state_dir,
        grpc_addr,
        http_addr,
        svid_ttl: Duration::from_secs(3600),
        clock: clock.clone(),
        config: None,
        vault_addr: None,
        aws_sts_endpoint: None,
    })
    .await
    .expect("broker restarts");
    let back = until(&mut gpu, "written again", |s| s.writes == 2).await;
    assert_eq!(back.state, State::Fresh);
    assert_ne!(back.lease_id, first.lease_id);
    agent.shutdown().await;
    env.shutdown().await.expect("stop");
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_writes_nothing() {
    let h = common::start().await;
    let out = tempfile::tempdir().expect("tempdir");

    // A profile the identity may not request, after one it may: refused, the granted
    // lease given back, nothing written.
    let dataset = "[[credential]]\nprofile = \"dataset-read\"\nscopes = [\"dataset:read\"]\nintent = { action = \"read\", target = \"datasets/x\" }";
    let err = Agent::start(config(&h, out.path(), "", &[GPU, dataset]), h.clock.clone())
        .await
        .err()
        .expect("refused");
    assert!(
        err.to_string().contains("\"dataset-read\"")
            && err.to_string().contains("PermissionDenied")
            && err.to_string().contains("nothing was written"),
        "{err}"
    );
    assert!(files_in(out.path()).is_empty());
    let conn = rusqlite::Connection::open(h.ledger_path()).expect("ledger");
    let active: i64 = conn
        .query_row(
            "SELECT count(*) FROM leases WHERE state = 'active'",
            [],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(
        active, 0,
        "the lease granted before the refusal was released"
    );

    // A path that cannot be written: nothing is asked for.
    let before = h.lease_count();
    let mut bad = config(&h, out.path(), "", &[GPU]);
    bad.credentials[0].path = out.path().join("missing-dir").join("token");
    let err = Agent::start(bad, h.clock.clone())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("missing-dir"), "{err}");
    assert_eq!(h.lease_count(), before);

    // A broker that is not the one configured: the handshake is refused, nothing asked.
    let mut wrong = config(&h, out.path(), "", &[GPU]);
    wrong.broker_id = "spiffe://example.org/not-the-broker".into();
    let err = Agent::start(wrong, h.clock.clone())
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("not-the-broker"), "{err}");
    assert_eq!(h.lease_count(), before);
    assert!(files_in(out.path()).is_empty());

    // Config mistakes are named.
    for (text, says) in [
        ("renew_fraction = 1.5", "renew_fraction"),
        ("[[credential]]\nprofile = \"p\"\npath = \"/tmp/x\"\nmode = 0o666", "world-writable"),
        ("[[credential]]\nprofile = \"p\"\npath = \"/tmp/x\"\nsignal = { pid_file = \"/p\", signal = \"KILL\" }", "signal"),
        ("[[credential]]\nprofile = \"p\"\npath = \"/tmp/x\"\n[[credential]]\nprofile = \"q\"\npath = \"/tmp/x\"", "two credentials"),
        ("[[credential]]\nprofile = \"p\"\npath = \"/tmp/x\"\nformat = \"jwt\"", "unknown variant"),
    ] {
        let full = format!("broker = \"b:1\"\nbroker_id = \"spiffe://example.org/b\"\n{text}");
        let err = AgentConfig::from_toml(&full).expect_err(text);
        assert!(err.to_string().contains(says), "{text}: {err}");
    }
}
