//! TLS on the link to the PostgreSQL ledger, against real servers (`common::pg` clusters
//! started with `ssl=on` and a certificate made here with rcgen): `verify-full` connects
//! and the ledger works over it; a certificate from another CA, a certificate for another
//! host name and a server without TLS are each refused, with a message that says which
//! and never the password.

use crate::common;
use common::pki::{ca, pki, write};

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use common::pg;
use spiffe_broker::audit::{AuditEvent, EventKind};
use spiffe_broker::config::LedgerConfig;
use spiffe_broker::domain::{Lease, LeaseId, LeaseState, ProfileName, Scope};
use spiffe_broker::metrics::Metrics;
use spiffe_broker::store::{LedgerOp, PostgresStore, Store, StoreError};

const HOLDER: &str = "spiffe://example.org/ci/deploy-agent";
/// A password in every URL (the clusters trust any): no message may show it.
const PASSWORD: &str = "s3cret-pw";

fn cfg(ca_file: Option<PathBuf>) -> LedgerConfig {
    LedgerConfig {
        commit_timeout: Duration::from_secs(10),
        busy_timeout: Duration::from_secs(2),
        max_batch: 16,
        postgres_sslmode: None,
        postgres_ca_file: ca_file,
    }
}

/// Opens the store (connects, migrates) on a blocking thread.
fn open(url: &str, cfg: &LedgerConfig) -> Result<PostgresStore, StoreError> {
    let (url, cfg) = (url.to_owned(), cfg.clone());
    std::thread::spawn(move || PostgresStore::open(&url, &cfg, Arc::new(Metrics::new())))
        .join()
        .expect("open thread")
}

/// The store could not open; its message, checked free of the password.
fn refused(url: &str, cfg: &LedgerConfig) -> String {
    let e = match open(url, cfg) {
        Ok(_) => panic!("{url}: opened, but should have been refused"),
        Err(e) => e.to_string(),
    };
    assert!(!e.contains(PASSWORD), "the password leaked: {e}");
    e
}

fn lease() -> Lease {
    let now = 1_790_000_000_000;
    Lease {
        id: LeaseId::generate(now).expect("id"),
        profile: ProfileName::parse("gpu-scheduler-submit").expect("profile"),
        spiffe_id: HOLDER.to_owned(),
        scopes: vec![Scope::parse("job:submit").expect("scope")],
        audience: "gpu-scheduler".into(),
        state: LeaseState::Active,
        issued_at: now,
        expires_at: now + 600,
        max_expires_at: now + 3600,
        credential_sha256: "00".repeat(32),
        renewals: 0,
        ended_at: None,
        end_reason: None,
        intent: None,
        backend: None,
        parent: None,
        subject: None,
    }
}

/// One issuance through the store, read back: the ledger works over this link.
fn issue_and_read_back(store: PostgresStore) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let l = lease();
        let id = l.id.clone();
        let mut event = AuditEvent::new(1_000, EventKind::Issue, "allow");
        event.lease_id = Some(id.to_string());
        event.caller = Some(HOLDER.to_owned());
        let applied = store
            .apply(LedgerOp::Issue {
                lease: l,
                event,
                max_active: None,
                break_glass: None,
                idempotency: None,
            })
            .await
            .expect("issue commits over TLS");
        assert!(applied.receipt.is_some(), "a receipt");
        let back = store
            .lease(&id)
            .await
            .expect("read over TLS")
            .expect("the lease is there");
        assert_eq!(back.spiffe_id, HOLDER);
        let entries = store.audit_entries(0, 10).await.expect("entries");
        assert_eq!(entries.len(), 1, "one audit entry");
        drop(store);
    });
}

/// Every connection the broker holds open (application_name `spiffe-broker`) is TLS.
fn broker_sessions_encrypted(server: &pg::PgServer) -> (usize, Vec<String>) {
    let rows = server.sql(
        "SELECT s.ssl::text, coalesce(s.version, '') FROM pg_stat_ssl s \
         JOIN pg_stat_activity a USING (pid) WHERE a.application_name = 'spiffe-broker'",
    );
    let all_ssl = rows.iter().all(|r| r[0].as_deref() == Some("true"));
    assert!(all_ssl, "a broker session without TLS: {rows:?}");
    let versions = rows.iter().filter_map(|r| r[1].clone()).collect();
    (rows.len(), versions)
}

/// `sslmode=verify-full` with the CA from `sslrootcert` (URL form, host name) and from
/// `ledger.postgres_ca_file` (key=value form, IP address): the store opens, issues and
/// reads back, and PostgreSQL reports the broker's sessions as TLS.
#[test]
fn verify_full_connects_and_the_ledger_works_over_tls() {
    let pki = pki(&["localhost", "127.0.0.1"]);
    let server = pg::local_tls(&pki.cert_pem, &pki.key_pem);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let port = server.port();

    let url = format!(
        "postgres://postgres:{PASSWORD}@localhost:{port}/broker?sslmode=verify-full&sslrootcert={}",
        ca.display()
    );
    let store = open(&url, &cfg(None)).expect("verify-full opens");
    let (sessions, versions) = broker_sessions_encrypted(&server);
    assert!(sessions >= 1, "the writer's session is listed");
    println!("broker sessions over TLS: {sessions}, versions {versions:?}");
    issue_and_read_back(store);

    let kv = format!(
        "host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname=broker \
         sslmode=verify-full"
    );
    let store = open(&kv, &cfg(Some(ca.clone()))).expect("verify-full, CA from the config");
    assert!(broker_sessions_encrypted(&server).0 >= 1);
    drop(store);
}

/// A server whose certificate chains to another CA: `verify-full` and `verify-ca`
/// refuse it, naming the cause; `require` (encryption only, as libpq) still connects.
#[test]
fn verify_full_refuses_a_server_certificate_from_another_ca() {
    let pki = pki(&["localhost", "127.0.0.1"]);
    let server = pg::local_tls(&pki.cert_pem, &pki.key_pem);
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, other_pem) = ca("some other CA");
    let other = write(dir.path(), "other-ca.pem", &other_pem);
    let port = server.port();
    for mode in ["verify-full", "verify-ca", "require"] {
        let url = format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{port}/broker?sslmode={mode}&sslrootcert={}",
            other.display()
        );
        let e = refused(&url, &cfg(None));
        println!("{mode}, wrong CA: {e}");
        assert!(
            e.contains("PostgreSQL server certificate not trusted")
                && e.contains(&format!("sslmode={mode}")),
            "{e}"
        );
    }
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/broker?sslmode=require");
    let store = open(&url, &cfg(None)).expect("require without a CA encrypts, verifies nothing");
    assert!(broker_sessions_encrypted(&server).0 >= 1);
    drop(store);
}

/// A certificate from the right CA for another name (`db.example`): `verify-full` to
/// 127.0.0.1 and to localhost is refused as a host name mismatch; `verify-ca` (chain
/// only, by definition) connects.
#[test]
fn verify_full_refuses_a_certificate_for_another_host_name() {
    let pki = pki(&["db.example"]);
    let server = pg::local_tls(&pki.cert_pem, &pki.key_pem);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let port = server.port();
    for host in ["127.0.0.1", "localhost"] {
        let url = format!(
            "host={host} port={port} user=postgres password={PASSWORD} dbname=broker \
             sslmode=verify-full sslrootcert='{}'",
            ca.display()
        );
        let e = refused(&url, &cfg(None));
        println!("verify-full, {host} vs db.example: {e}");
        assert!(e.contains("host name mismatch") && e.contains(host), "{e}");
    }
    let url = format!(
        "host=127.0.0.1 port={port} user=postgres password={PASSWORD} dbname=broker \
         sslmode=verify-ca"
    );
    let store = open(&url, &cfg(Some(ca))).expect("verify-ca checks the chain only");
    assert!(broker_sessions_encrypted(&server).0 >= 1);
    drop(store);
}

/// A server without TLS (`ssl=off`): every mode that requires TLS refuses to fall back to
/// plain text, and says so; the default (`prefer`) still connects in plain text.
#[test]
fn tls_modes_refuse_a_server_without_tls() {
    let server = pg::local();
    let dir = tempfile::tempdir().expect("tempdir");
    let (_, _, ca_pem) = ca("unused CA");
    let ca = write(dir.path(), "ca.pem", &ca_pem);
    let port = server.port();
    for mode in ["require", "verify-ca", "verify-full"] {
        let url = format!(
            "postgres://postgres:{PASSWORD}@127.0.0.1:{port}/broker?sslmode={mode}&sslrootcert={}",
            ca.display()
        );
        let e = refused(&url, &cfg(None));
        println!("{mode}, server without TLS: {e}");
        assert!(
            e.contains(&format!(
                "server does not support TLS, but sslmode={mode} requires it"
            )),
            "{e}"
        );
    }
    let url = format!("postgres://postgres:{PASSWORD}@127.0.0.1:{port}/broker");
    drop(open(&url, &cfg(None)).expect("prefer falls back to plain text"));
}

/// SCRAM over TLS with `channel_binding=require`: the broker's `tls-server-end-point`
/// hash matches the server's, so SCRAM-SHA-256-PLUS succeeds; a wrong password is refused
/// without showing either password.
#[test]
fn scram_over_verify_full_binds_the_channel() {
    let pki = pki(&["localhost", "127.0.0.1"]);
    let server = pg::local_tls(&pki.cert_pem, &pki.key_pem);
    let dir = tempfile::tempdir().expect("tempdir");
    let ca = write(dir.path(), "ca.pem", &pki.ca_pem);
    let port = server.port();
    server.sql(&format!("ALTER ROLE postgres PASSWORD '{PASSWORD}'"));
    server.hba_first("hostssl all all 127.0.0.1/32 scram-sha-256");
    let url = |pw: &str| {
        format!(
            "postgres://postgres:{pw}@127.0.0.1:{port}/broker?sslmode=verify-full&sslrootcert={}&channel_binding=require",
            ca.display()
        )
    };
    let store = open(&url(PASSWORD), &cfg(None)).expect("SCRAM-SHA-256-PLUS over TLS");
    let rows = server.sql(
        "SELECT count(*) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
         WHERE a.application_name = 'spiffe-broker' AND s.ssl",
    );
    assert_ne!(
        rows[0][0].as_deref(),
        Some("0"),
        "an encrypted broker session"
    );
    drop(store);
    let e = refused(&url("not-the-password"), &cfg(None));
    println!("wrong password: {e}");
    assert!(!e.contains("not-the-password"), "{e}");
    assert!(e.contains("password authentication failed"), "{e}");
}
