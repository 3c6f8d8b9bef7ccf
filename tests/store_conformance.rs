//! One `Store` contract, one conformance suite, run against every backend
//! (SQLite today). Each check goes through the trait only.

use std::sync::Arc;
use std::time::Duration;

use spiffe_broker::audit::{AuditEvent, ChainVerifier, EventKind};
use spiffe_broker::checkpoint::LogSigner;
use spiffe_broker::config::LedgerConfig;
use spiffe_broker::domain::{
    Lease, LeaseFilter, LeaseId, LeaseState, ProfileName, RevokeSelector, Scope,
};
use spiffe_broker::merkle::verify_consistency;
use spiffe_broker::metrics::Metrics;
use spiffe_broker::store::{LedgerOp, Refusal, SqliteStore, Store};

const HOLDER: &str = "spiffe://example.org/ci/deploy-agent";

fn lease(holder: &str, issued_at: i64, ttl: i64) -> Lease {
    Lease {
        id: LeaseId::generate().expect("id"),
        profile: ProfileName::parse("gpu-scheduler-submit").expect("profile"),
        spiffe_id: holder.to_owned(),
        scopes: vec![Scope::parse("job:submit").expect("scope")],
        audience: "gpu-scheduler".into(),
        state: LeaseState::Active,
        issued_at,
        expires_at: issued_at + ttl,
        max_expires_at: issued_at + 3600,
        credential_sha256: "00".repeat(32),
        renewals: 0,
        ended_at: None,
        end_reason: None,
        intent: None,
        backend: None,
    }
}

fn ev(kind: EventKind, lease: Option<&LeaseId>) -> AuditEvent {
    let mut e = AuditEvent::new(1_000, kind, "allow");
    e.lease_id = lease.map(|l| l.to_string());
    e
}

async fn issue(store: &dyn Store, l: Lease) -> Lease {
    let id = l.id.clone();
    store
        .apply(LedgerOp::Issue {
            lease: l,
            event: ev(EventKind::Issue, Some(&id)),
            max_active: None,
            break_glass: None,
            idempotency: None,
        })
        .await
        .expect("issue commits")
        .lease
        .expect("lease")
}

async fn assert_chain(store: &dyn Store) -> u64 {
    let mut v = ChainVerifier::default();
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, 100).await.expect("entries");
        if page.is_empty() {
            break;
        }
        for e in &page {
            v.push(e).expect("chain verifies");
            after = e.seq;
        }
    }
    v.finish().0
}

/// The suite every backend must pass.
async fn conformance(store: Arc<dyn Store>) {
    let s = store.as_ref();
    let now = 10_000;

    // Issue and read back.
    let a = issue(s, lease(HOLDER, now, 600)).await;
    assert_eq!(s.lease(&a.id).await.expect("read"), Some(a.clone()));
    assert_eq!(
        s.lease(&LeaseId::generate().expect("id"))
            .await
            .expect("read"),
        None
    );

    // Renew: guarded on holder, state and expiry; capped at max_expires_at.
    let renew = |id: &LeaseId, holder: &str, at: i64, exp: i64| LedgerOp::Renew {
        lease_id: id.clone(),
        holder: holder.to_owned(),
        now: at,
        expires_at: exp,
        credential_sha256: "11".repeat(32),
        event: ev(EventKind::Renew, Some(id)),
    };
    let r = s
        .apply(renew(&a.id, "spiffe://example.org/other", now, now + 900))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::NotHolder));
    assert!(r.receipt.is_some(), "the refusal is recorded");
    let r = s
        .apply(renew(&a.id, HOLDER, now + 10, now + 99_999))
        .await
        .expect("commit");
    assert_eq!(r.refused, None);
    let renewed = r.lease.expect("lease");
    assert_eq!(renewed.expires_at, a.max_expires_at, "never beyond max");
    assert_eq!(renewed.renewals, 1);
    assert_eq!(renewed.credential_sha256, "11".repeat(32));

    // Expired leases cannot renew.
    let b = issue(s, lease(HOLDER, now, 60)).await;
    let r = s
        .apply(renew(&b.id, HOLDER, now + 61, now + 600))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::Expired));

    // Revoke by lease, then by SPIFFE ID; a revoked lease never comes back.
    let c = issue(s, lease("spiffe://example.org/gpu/provisioner", now, 600)).await;
    let d = issue(s, lease("spiffe://example.org/gpu/provisioner", now, 600)).await;
    let revoke = |sel: RevokeSelector| LedgerOp::Revoke {
        selector: sel,
        issued_before: None,
        reason: "test".into(),
        now: now + 20,
        dry_run: false,
        chunk: None,
        event: ev(EventKind::Revoke, None),
    };
    let r = s
        .apply(revoke(RevokeSelector::Lease(c.id.clone())))
        .await
        .expect("commit");
    assert_eq!(r.affected, vec![c.id.to_string()]);
    let r = s
        .apply(revoke(RevokeSelector::SpiffeId(
            "spiffe://example.org/gpu/provisioner".into(),
        )))
        .await
        .expect("commit");
    assert_eq!(r.affected, vec![d.id.to_string()]);
    let r = s
        .apply(revoke(RevokeSelector::Lease(c.id.clone())))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::Ended(LeaseState::Revoked)));
    let r = s
        .apply(renew(
            &c.id,
            "spiffe://example.org/gpu/provisioner",
            now + 30,
            now + 600,
        ))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::Ended(LeaseState::Revoked)));
    let revoked = s.lease(&c.id).await.expect("read").expect("lease");
    assert_eq!(revoked.state, LeaseState::Revoked);
    assert_eq!(revoked.end_reason.as_deref(), Some("revoked: test"));

    // Release.
    let r = s
        .apply(LedgerOp::Release {
            lease_id: a.id.clone(),
            holder: HOLDER.into(),
            now: now + 40,
            event: ev(EventKind::Release, Some(&a.id)),
        })
        .await
        .expect("commit");
    assert_eq!(r.lease.expect("lease").state, LeaseState::Released);

    // Expire in bounded batches, by expiry index.
    for i in 0..5 {
        issue(s, lease(HOLDER, now, 100 + i)).await;
    }
    let expire = |limit| LedgerOp::Expire {
        now: now + 1_000,
        limit,
        event: ev(EventKind::Expire, None),
    };
    let first = s.apply(expire(3)).await.expect("commit");
    assert_eq!(first.affected.len(), 3);
    let second = s.apply(expire(3)).await.expect("commit");
    assert_eq!(second.affected.len(), 3, "b (60s) and the last two");
    let none = s.apply(expire(3)).await.expect("commit");
    assert!(
        none.affected.is_empty() && none.receipt.is_none(),
        "no entry when nothing expired"
    );

    // Listing: filters and pagination, newest first.
    let all = s
        .leases(LeaseFilter {
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(all.len(), 9);
    let mut seen = Vec::new();
    let mut before = None;
    loop {
        let page = s
            .leases(LeaseFilter {
                limit: 4,
                before: before.clone(),
                ..Default::default()
            })
            .await
            .expect("page");
        if page.is_empty() {
            break;
        }
        before = page.last().map(|l| (l.issued_at, l.id.to_string()));
        seen.extend(page.into_iter().map(|l| l.id));
    }
    assert_eq!(seen, all.iter().map(|l| l.id.clone()).collect::<Vec<_>>());
    let revoked = s
        .leases(LeaseFilter {
            state: Some(LeaseState::Revoked),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(revoked.len(), 2);

    // Concurrent writers share commits and the chain stays gap-free.
    let mut tasks = Vec::new();
    for _ in 0..200 {
        let st = store.clone();
        tasks.push(tokio::spawn(async move {
            let l = lease(HOLDER, now, 600);
            let id = l.id.clone();
            st.apply(LedgerOp::Issue {
                lease: l,
                event: ev(EventKind::Issue, Some(&id)),
                max_active: None,
                break_glass: None,
                idempotency: None,
            })
            .await
            .expect("commit")
            .receipt
            .expect("receipt")
            .sequence
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        seqs.push(t.await.expect("task"));
    }
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "distinct sequence numbers");
    let entries = assert_chain(s).await;
    assert_eq!(entries, *seqs.last().expect("last"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(5),
        busy_timeout: Duration::from_secs(2),
        max_batch: 256,
    };
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("ledger.db"), &cfg, metrics.clone()).expect("open"),
    );
    conformance(store.clone()).await;
    // Group commit happened: fewer commits than operations.
    let text = metrics.render();
    let count = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .expect("metric present")
    };
    let commits = count("spiffe_broker_ledger_commit_batch_size_count");
    let ops = count("spiffe_broker_ledger_commit_batch_size_sum");
    assert!(commits < ops, "ops {ops} shared {commits} commits");

    // A checkpoint before the restart, one after: the tree continues across restarts.
    let signer = Arc::new(
        LogSigner::load_or_create(&dir.path().join("keys"), "test/audit").expect("log key"),
    );
    let before = store
        .apply(LedgerOp::Checkpoint {
            signer: signer.clone(),
            time_ms: 1,
        })
        .await
        .expect("checkpoint")
        .checkpoint
        .expect("signed");
    drop(store);

    // Reopening resumes the same chain (restart keeps the ledger consistent).
    let store = SqliteStore::open(&dir.path().join("ledger.db"), &cfg, metrics).expect("reopen");
    let l = lease(HOLDER, 1, 600);
    let id = l.id.clone();
    store
        .apply(LedgerOp::Issue {
            lease: l,
            event: ev(EventKind::Issue, Some(&id)),
            max_active: None,
            break_glass: None,
            idempotency: None,
        })
        .await
        .expect("commit after restart");
    let after = store
        .apply(LedgerOp::Checkpoint { signer, time_ms: 2 })
        .await
        .expect("checkpoint")
        .checkpoint
        .expect("signed");
    assert_eq!(after.size, before.size + 1);
    let proof = store
        .consistency_proof(before.size, after.size)
        .await
        .expect("read")
        .expect("in range");
    verify_consistency(before.size, after.size, &before.root, &after.root, &proof)
        .expect("consistent");
    let report = SqliteStore::verify_file(&dir.path().join("ledger.db"))
        .expect("chain and tree continue across restarts");
    assert_eq!(report.report.checkpoints, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(5),
        busy_timeout: Duration::from_secs(2),
        max_batch: 16,
    };
    let mode = |name: &str| {
        std::fs::metadata(dir.path().join(name))
            .expect(name)
            .permissions()
            .mode()
            & 0o777
    };
    let path = dir.path().join("ledger.db");
    // A ledger left world-readable (for example restored from a backup) is tightened on open.
    std::fs::write(&path, b"").expect("precreate");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let store = SqliteStore::open(&path, &cfg, Arc::new(Metrics::new())).expect("open");
    let l = lease(HOLDER, 1, 600);
    let id = l.id.clone();
    store
        .apply(LedgerOp::Issue {
            lease: l,
            event: ev(EventKind::Issue, Some(&id)),
            max_active: None,
            break_glass: None,
            idempotency: None,
        })
        .await
        .expect("commit");
    for name in ["ledger.db", "ledger.db-wal", "ledger.db-shm"] {
        assert_eq!(mode(name), 0o600, "{name} is owner-only");
    }
}
