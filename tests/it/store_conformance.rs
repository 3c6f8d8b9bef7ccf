//! One `Store` contract, one conformance suite, run against every backend (SQLite and
//! PostgreSQL). Each check goes through the trait only. The PostgreSQL tests start their
//! own throwaway server (`common::pg`; Debian's `postgresql` package) or use
//! `SPIFFE_BROKER_TEST_PG_URL`; without either they fail, naming the package.

use crate::common;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::pg;
use spiffe_broker::audit::{AuditEvent, ChainVerifier, EventKind, LogReport, LogVerifier};
use spiffe_broker::checkpoint::{LogSigner, VerifierKey};
use spiffe_broker::config::LedgerConfig;
use spiffe_broker::domain::{
    AccessFilter, AccessRequest, AccessState, BackendHandle, IdempotencyRecord, Lease, LeaseFilter,
    LeaseId, LeaseState, Lock, ProfileName, RequestSpec, RevokeSelector, Scope, Verdict,
};
use spiffe_broker::merkle::{leaf_hash, verify_consistency, verify_inclusion};
use spiffe_broker::metrics::Metrics;
use spiffe_broker::store::{
    Cosignature, LedgerOp, PostgresStore, Refusal, SinkClaim, SinkPosition, SqliteStore, Store,
    StoreError, StoredCheckpoint,
};

const HOLDER: &str = "spiffe://example.org/ci/deploy-agent";

fn lease(holder: &str, issued_at: i64, ttl: i64) -> Lease {
    Lease {
        id: LeaseId::generate(1_790_000_000_000).expect("id"),
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
        parent: None,
        subject: None,
    }
}

fn ev(kind: EventKind, lease: Option<&LeaseId>) -> AuditEvent {
    let mut e = AuditEvent::new(1_000, kind, "allow");
    e.lease_id = lease.map(|l| l.to_string());
    // Entries name their caller, as the broker's do (the per-identity counters run too).
    e.caller = Some(HOLDER.to_owned());
    e
}

async fn issue(store: &dyn Store, l: Lease) -> Lease {
    issue_at(store, l)
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
        s.lease(&LeaseId::generate(1_790_000_000_000).expect("id"))
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

    // Backend revocations: queued when a stateful backend's lease ends, claimed for a
    // while (not handed out again meanwhile), rescheduled by a failed attempt, done once
    // the backend confirmed.
    let vault = |n: u32| {
        let mut l = lease("spiffe://example.org/ml/model-runtime", now, 600);
        l.backend = Some(BackendHandle {
            kind: "vault".into(),
            handle: format!("database/creds/reader/{n}"),
            revocable: true,
        });
        l
    };
    let (v1, v2) = (issue(s, vault(1)).await, issue(s, vault(2)).await);
    s.apply(LedgerOp::Release {
        lease_id: v1.id.clone(),
        holder: v1.spiffe_id.clone(),
        now: now + 50,
        event: ev(EventKind::Release, Some(&v1.id)),
    })
    .await
    .expect("release");
    s.apply(LedgerOp::Revoke {
        selector: RevokeSelector::Lease(v2.id.clone()),
        issued_before: None,
        reason: "test".into(),
        now: now + 60,
        dry_run: false,
        chunk: None,
        event: ev(EventKind::Revoke, None),
    })
    .await
    .expect("revoke");
    assert!(
        s.claim_backend_revocations(now + 49, 10, 60)
            .await
            .expect("claim")
            .is_empty(),
        "nothing is due before the lease ended"
    );
    let claimed = s
        .claim_backend_revocations(now + 100, 10, 60)
        .await
        .expect("claim");
    let ids: Vec<&str> = claimed.iter().map(|r| r.lease_id.as_str()).collect();
    assert_eq!(ids, [v1.id.as_str(), v2.id.as_str()], "oldest due first");
    assert!(claimed
        .iter()
        .all(|r| r.next_attempt_at == now + 160 && r.attempts == 0));
    assert_eq!(claimed[0].handle, "database/creds/reader/1");
    assert_eq!(claimed[1].queued_at, now + 60);
    assert!(
        s.claim_backend_revocations(now + 100, 10, 60)
            .await
            .expect("claim")
            .is_empty(),
        "claimed rows are not handed out twice"
    );
    assert_eq!(
        s.pending_backend_revocations(0, 10)
            .await
            .expect("pending")
            .len(),
        2,
        "a claim is not a revocation"
    );
    s.apply(LedgerOp::BackendRevoked {
        lease_id: v1.id.to_string(),
        now: now + 101,
        event: ev(EventKind::BackendRevoke, Some(&v1.id)),
    })
    .await
    .expect("revoked");
    s.apply(LedgerOp::BackendRevokeFailed {
        lease_id: v2.id.to_string(),
        error: "vault: connection refused".into(),
        next_attempt_at: now + 105,
    })
    .await
    .expect("failed attempt");
    assert!(s
        .claim_backend_revocations(now + 104, 10, 60)
        .await
        .expect("claim")
        .is_empty());
    let again = s
        .claim_backend_revocations(now + 105, 10, 60)
        .await
        .expect("claim");
    assert_eq!(again.len(), 1, "only the failed one, at its next attempt");
    assert_eq!(again[0].lease_id, v2.id.as_str());
    assert_eq!(again[0].attempts, 1);
    assert_eq!(
        again[0].last_error.as_deref(),
        Some("vault: connection refused")
    );
    assert!(
        s.claim_backend_revocations(now + 10_000, 10, 60)
            .await
            .expect("claim")
            .iter()
            .all(|r| r.lease_id != v1.id.as_str()),
        "a confirmed revocation is never claimed again"
    );

    guards_and_access(s, now + 20_000).await;
    derivation(s, now + 40_000).await;
}

/// A lease derived by token exchange from `parent`, held by `holder` for `subject`.
fn derived(parent: &Lease, holder: &str, subject: &str, at: i64) -> Lease {
    Lease {
        parent: Some(parent.id.clone()),
        subject: Some(subject.to_owned()),
        ..lease(holder, at, 600)
    }
}

/// Token exchange: a derived lease needs its parent active at commit; revoking the root
/// of a tree of 1,000 derived leases revokes all of them in one operation, one feed event
/// each; revoking the subject's identity reaches what others hold for it.
async fn derivation(s: &dyn Store, now: i64) {
    const ALICE: &str = "spiffe://example.org/ops/alice";
    const AGENT: &str = "spiffe://example.org/gpu/provisioner";
    let revoke = |sel: RevokeSelector, at: i64, dry_run: bool| LedgerOp::Revoke {
        selector: sel,
        issued_before: None,
        reason: "session ended".into(),
        now: at,
        dry_run,
        chunk: None,
        event: ev(EventKind::Revoke, None),
    };
    // The parent ended before the derived lease committed: refused, recorded.
    let gone = issue(s, lease(ALICE, now, 600)).await;
    s.apply(revoke(
        RevokeSelector::Lease(gone.id.clone()),
        now + 1,
        false,
    ))
    .await
    .expect("revoke");
    let r = issue_at(s, derived(&gone, AGENT, ALICE, now + 2))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::ParentEnded));
    assert!(r.receipt.is_some(), "the refusal is recorded");

    // Root → 10 children → 99 grandchildren each: 1,000 derived leases.
    let root = issue(s, lease(ALICE, now, 3600)).await;
    let children =
        futures::future::join_all((0..10).map(|_| issue(s, derived(&root, AGENT, ALICE, now + 1))))
            .await;
    let mut grandchildren = Vec::new();
    for c in &children {
        grandchildren.extend(
            futures::future::join_all(
                (0..99).map(|_| issue(s, derived(c, HOLDER, ALICE, now + 2))),
            )
            .await,
        );
    }
    let tree = s
        .leases(LeaseFilter {
            derived_from: Some(root.id.to_string()),
            ..Default::default()
        })
        .await
        .expect("tree");
    assert_eq!(tree.len(), 1001);
    let preview = s
        .apply(revoke(
            RevokeSelector::Lease(root.id.clone()),
            now + 3,
            true,
        ))
        .await
        .expect("dry run");
    assert_eq!(
        preview.affected.len(),
        1001,
        "a dry run previews the whole tree"
    );
    let (seq_before, _) = s.revocation_tail().await.expect("tail").unwrap_or_default();
    let r = s
        .apply(revoke(
            RevokeSelector::Lease(root.id.clone()),
            now + 3,
            false,
        ))
        .await
        .expect("cascade");
    assert_eq!(r.affected.len(), 1001, "one operation revokes the tree");
    let (seq_after, _) = s.revocation_tail().await.expect("tail").unwrap_or_default();
    assert_eq!(seq_after - seq_before, 1001, "one feed event per lease");
    for l in children.iter().chain(&grandchildren) {
        let now_state = s.lease(&l.id).await.expect("read").expect("lease").state;
        assert_eq!(now_state, LeaseState::Revoked);
    }
    let r = issue_at(s, derived(&root, AGENT, ALICE, now + 4))
        .await
        .expect("commit");
    assert_eq!(
        r.refused,
        Some(Refusal::ParentEnded),
        "nothing derives from it after"
    );

    // Revoking the subject's identity revokes what an agent holds for her.
    let held = issue(
        s,
        Lease {
            subject: Some(ALICE.into()),
            ..lease(AGENT, now + 5, 600)
        },
    )
    .await;
    let r = s
        .apply(revoke(
            RevokeSelector::SpiffeId(ALICE.into()),
            now + 6,
            false,
        ))
        .await
        .expect("revoke identity");
    assert!(r.affected.contains(&held.id.to_string()));
    let r = issue_at(
        s,
        Lease {
            subject: Some(ALICE.into()),
            ..lease(AGENT, now + 6, 600)
        },
    )
    .await
    .expect("commit");
    assert_eq!(
        r.refused,
        Some(Refusal::RevokedBefore),
        "the rule covers the subject"
    );
}

fn access_request(id: &str, requester: &str, profile: &str, at: i64) -> AccessRequest {
    AccessRequest {
        id: id.to_owned(),
        requester: requester.to_owned(),
        profile: ProfileName::parse(profile).expect("profile"),
        request: RequestSpec {
            scopes: vec!["job:submit".into()],
            ttl_secs: Some(600),
            intent: None,
            grant: None,
            delegation: None,
        },
        digest: format!("digest-of-{id}"),
        group: "approvers".into(),
        threshold: 2,
        state: AccessState::Pending,
        created_at: at,
        expires_at: at + 3600,
        deny_ends: true,
        break_glass: false,
        post_review: None,
        lease_id: None,
        reviews: Vec::new(),
    }
}

/// Locks, revocation rules, quotas, idempotency, access requests (reviews, redemption,
/// break-glass post-review), the other revocation selectors, the revocation feed and the
/// per-identity counters: every op family through the trait, on every backend.
async fn guards_and_access(s: &dyn Store, now: i64) {
    const ALICE: &str = "spiffe://example.org/team-a/alice";
    const BOB: &str = "spiffe://example.org/team-b/bob";
    let issue_op = |l: Lease, max_active: Option<u32>| {
        let id = l.id.clone();
        LedgerOp::Issue {
            lease: l,
            event: ev(EventKind::Issue, Some(&id)),
            max_active,
            break_glass: None,
            idempotency: None,
        }
    };

    // An operator lock on a prefix bars issuance and renewal under it, until unlocked.
    let held = issue(s, lease(ALICE, now, 600)).await;
    let lock = Lock {
        id: "lock-1".into(),
        kind: "prefix".into(),
        value: "spiffe://example.org/team-a/".into(),
        until: now + 500,
        reason: "incident 42".into(),
        created_by: "spiffe://example.org/ops".into(),
        created_at: now,
    };
    s.apply(LedgerOp::Lock {
        lock: lock.clone(),
        event: ev(EventKind::Lock, None),
    })
    .await
    .expect("lock");
    assert_eq!(s.locks(now + 1).await.expect("locks"), vec![lock.clone()]);
    assert!(s.locks(now + 500).await.expect("locks").is_empty(), "ended");
    let r = s
        .apply(issue_op(lease(ALICE, now + 1, 600), None))
        .await
        .expect("commit");
    match r.refused {
        Some(Refusal::Locked(why)) => assert!(why.starts_with("incident 42 (until "), "{why}"),
        other => panic!("expected a lock refusal, got {other:?}"),
    }
    assert!(r.lease.is_none() && r.receipt.is_some());
    let r = s
        .apply(issue_op(lease(BOB, now + 1, 600), None))
        .await
        .expect("commit");
    assert_eq!(r.refused, None, "the lock covers only its prefix");
    let r = s
        .apply(LedgerOp::Renew {
            lease_id: held.id.clone(),
            holder: ALICE.into(),
            now: now + 2,
            expires_at: now + 900,
            credential_sha256: "22".repeat(32),
            event: ev(EventKind::Renew, Some(&held.id)),
        })
        .await
        .expect("commit");
    assert!(matches!(r.refused, Some(Refusal::Locked(_))), "{r:?}");
    let unlock = || LedgerOp::Unlock {
        id: "lock-1".into(),
        event: ev(EventKind::Lock, None),
    };
    assert_eq!(s.apply(unlock()).await.expect("unlock").refused, None);
    assert_eq!(
        s.apply(unlock()).await.expect("unlock").refused,
        Some(Refusal::NothingMatched)
    );

    // Quotas count the holder's active leases on the profile.
    let r = s
        .apply(issue_op(lease(BOB, now + 3, 600), Some(1)))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::QuotaExceeded(1)));
    let r = s
        .apply(issue_op(lease(BOB, now + 3, 600), Some(2)))
        .await
        .expect("commit");
    assert_eq!(r.refused, None);

    // Idempotent issuance: the record is kept with the lease; the key cannot be reused;
    // expiry forgets it once it has expired.
    let record = IdempotencyRecord {
        caller: BOB.into(),
        key_hash: "k".repeat(64),
        digest: "d".repeat(64),
        lease_id: "lease-of-the-key".into(),
        sealed: vec![0, 1, 2, 255],
        expires_at: now + 50,
    };
    let keyed = |l: Lease| {
        let id = l.id.clone();
        LedgerOp::Issue {
            lease: l,
            event: ev(EventKind::Issue, Some(&id)),
            max_active: None,
            break_glass: None,
            idempotency: Some(record.clone()),
        }
    };
    assert_eq!(
        s.apply(keyed(lease(BOB, now + 4, 600)))
            .await
            .expect("commit")
            .refused,
        None
    );
    assert_eq!(
        s.idempotency(BOB, &record.key_hash).await.expect("read"),
        Some(record.clone())
    );
    assert_eq!(
        s.idempotency(ALICE, &record.key_hash).await.expect("read"),
        None
    );
    assert_eq!(
        s.apply(keyed(lease(BOB, now + 5, 600)))
            .await
            .expect("commit")
            .refused,
        Some(Refusal::Duplicate)
    );
    s.apply(LedgerOp::Expire {
        now: now + 50,
        limit: 10,
        event: ev(EventKind::Expire, None),
    })
    .await
    .expect("expire");
    assert_eq!(
        s.idempotency(BOB, &record.key_hash).await.expect("read"),
        None
    );

    // Access requests: reviews count toward the threshold; the requester redeems once,
    // bound to the approved digest.
    let req = access_request("req-1", ALICE, "gpu-scheduler-submit", now);
    let r = s
        .apply(LedgerOp::OpenAccessRequest {
            request: req.clone(),
            event: ev(EventKind::AccessRequest, None),
        })
        .await
        .expect("open");
    assert_eq!(r.access_request, Some(req.clone()));
    let other = access_request("req-2", BOB, "other-profile", now + 1);
    s.apply(LedgerOp::OpenAccessRequest {
        request: other.clone(),
        event: ev(EventKind::AccessRequest, None),
    })
    .await
    .expect("open");
    let review = |reviewer: &str, verdict: Verdict, id: &str| LedgerOp::Review {
        id: id.to_owned(),
        reviewer: reviewer.to_owned(),
        verdict,
        reason: "looks right".into(),
        now: now + 10,
        event: ev(EventKind::Review, None),
    };
    let r = s
        .apply(review(ALICE, Verdict::Approve, "req-1"))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::SelfReview));
    let r = s
        .apply(review(
            "spiffe://example.org/approver/1",
            Verdict::Approve,
            "req-1",
        ))
        .await
        .expect("commit");
    let pending = r.access_request.expect("request");
    assert_eq!(pending.state, AccessState::Pending, "one of two approvals");
    assert_eq!(pending.reviews.len(), 1);
    assert_eq!(pending.reviews[0].verdict, Verdict::Approve);
    assert!(!pending.reviews[0].post_review);
    let r = s
        .apply(review(
            "spiffe://example.org/approver/1",
            Verdict::Approve,
            "req-1",
        ))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::AlreadyReviewed));
    let r = s
        .apply(review(
            "spiffe://example.org/approver/2",
            Verdict::Approve,
            "req-1",
        ))
        .await
        .expect("commit");
    assert_eq!(
        r.access_request.expect("request").state,
        AccessState::Approved
    );
    let r = s
        .apply(review(
            "spiffe://example.org/approver/1",
            Verdict::Deny,
            "req-2",
        ))
        .await
        .expect("commit");
    assert_eq!(
        r.access_request.expect("request").state,
        AccessState::Denied
    );
    assert_eq!(
        s.apply(review(
            "spiffe://example.org/approver/1",
            Verdict::Deny,
            "nope"
        ))
        .await
        .expect("commit")
        .refused,
        Some(Refusal::RequestNotFound)
    );
    let listed = |filter: AccessFilter| async move {
        s.access_requests(filter)
            .await
            .expect("list")
            .into_iter()
            .map(|r| r.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(
        listed(AccessFilter {
            limit: 10,
            ..Default::default()
        })
        .await,
        ["req-2", "req-1"],
        "newest first"
    );
    assert_eq!(
        listed(AccessFilter {
            profiles: Some(vec!["gpu-scheduler-submit".into(), "third".into()]),
            limit: 10,
            ..Default::default()
        })
        .await,
        ["req-1"]
    );
    assert!(listed(AccessFilter {
        profiles: Some(Vec::new()),
        limit: 10,
        ..Default::default()
    })
    .await
    .is_empty());
    assert_eq!(
        listed(AccessFilter {
            state: Some(AccessState::Denied),
            limit: 10,
            ..Default::default()
        })
        .await,
        ["req-2"]
    );
    assert_eq!(
        listed(AccessFilter {
            requester: Some(ALICE.into()),
            limit: 10,
            ..Default::default()
        })
        .await,
        ["req-1"]
    );
    let redeem = |requester: &str, digest: &str, l: Lease| {
        let id = l.id.clone();
        LedgerOp::Redeem {
            id: "req-1".into(),
            requester: requester.to_owned(),
            digest: digest.to_owned(),
            max_active: None,
            lease: l,
            now: now + 20,
            event: ev(EventKind::Issue, Some(&id)),
        }
    };
    assert_eq!(
        s.apply(redeem(BOB, &req.digest, lease(BOB, now + 20, 600)))
            .await
            .expect("commit")
            .refused,
        Some(Refusal::RequestNotFound),
        "only its requester redeems it"
    );
    assert_eq!(
        s.apply(redeem(ALICE, "other", lease(ALICE, now + 20, 600)))
            .await
            .expect("commit")
            .refused,
        Some(Refusal::DigestMismatch)
    );
    let r = s
        .apply(redeem(ALICE, &req.digest, lease(ALICE, now + 20, 600)))
        .await
        .expect("commit");
    assert_eq!(r.refused, None);
    let redeemed = r.lease.expect("lease");
    let issued = r.access_request.expect("request");
    assert_eq!(issued.state, AccessState::Issued);
    assert_eq!(issued.lease_id.as_deref(), Some(redeemed.id.as_str()));
    assert_eq!(
        s.access_request("req-1").await.expect("read"),
        Some(issued.clone())
    );
    assert_eq!(
        s.apply(redeem(ALICE, &req.digest, lease(ALICE, now + 21, 600)))
            .await
            .expect("commit")
            .refused,
        Some(Refusal::RequestEnded(AccessState::Issued)),
        "exactly once"
    );

    // A pending request past its expiry expires when reviewed.
    let mut late = access_request("req-3", BOB, "gpu-scheduler-submit", now);
    late.expires_at = now + 5;
    s.apply(LedgerOp::OpenAccessRequest {
        request: late,
        event: ev(EventKind::AccessRequest, None),
    })
    .await
    .expect("open");
    assert_eq!(
        s.apply(review(
            "spiffe://example.org/approver/1",
            Verdict::Approve,
            "req-3"
        ))
        .await
        .expect("commit")
        .refused,
        Some(Refusal::RequestExpired)
    );
    assert_eq!(
        s.access_request("req-3")
            .await
            .expect("read")
            .expect("request")
            .state,
        AccessState::Expired
    );

    // Break-glass: issued at once with its request, post-reviewed after.
    let mut glass = access_request("req-4", BOB, "gpu-scheduler-submit", now + 30);
    glass.state = AccessState::Issued;
    glass.break_glass = true;
    glass.post_review = Some("pending".into());
    let urgent = lease(BOB, now + 30, 600);
    glass.lease_id = Some(urgent.id.to_string());
    let id = urgent.id.clone();
    let r = s
        .apply(LedgerOp::Issue {
            lease: urgent,
            event: ev(EventKind::Issue, Some(&id)),
            max_active: None,
            break_glass: Some(glass.clone()),
            idempotency: None,
        })
        .await
        .expect("commit");
    assert_eq!(r.access_request, Some(glass.clone()));
    assert_eq!(
        listed(AccessFilter {
            awaiting_post_review: true,
            limit: 10,
            ..Default::default()
        })
        .await,
        ["req-4"]
    );
    let r = s
        .apply(review(
            "spiffe://example.org/approver/1",
            Verdict::Deny,
            "req-4",
        ))
        .await
        .expect("commit");
    let reviewed = r.access_request.expect("request");
    assert_eq!(reviewed.post_review.as_deref(), Some("denied"));
    assert!(reviewed.reviews[0].post_review);
    assert!(listed(AccessFilter {
        awaiting_post_review: true,
        limit: 10,
        ..Default::default()
    })
    .await
    .is_empty());

    // The other selectors: by approver, by access request, by profile; a dry run changes
    // nothing; a revocation by prefix leaves a rule that bars what it covers.
    let revoke =
        |selector: RevokeSelector, dry_run: bool, issued_before: Option<i64>| LedgerOp::Revoke {
            selector,
            issued_before,
            reason: "conformance".into(),
            now: now + 40,
            dry_run,
            chunk: None,
            event: ev(EventKind::Revoke, None),
        };
    let r = s
        .apply(revoke(RevokeSelector::All, true, Some(now + 40)))
        .await
        .expect("dry run");
    assert!(r.receipt.is_none() && r.affected.contains(&redeemed.id.to_string()));
    let r = s
        .apply(revoke(
            RevokeSelector::Approver("spiffe://example.org/approver/2".into()),
            false,
            None,
        ))
        .await
        .expect("commit");
    assert_eq!(r.affected, vec![redeemed.id.to_string()]);
    let r = s
        .apply(revoke(
            RevokeSelector::AccessRequest("req-1".into()),
            false,
            None,
        ))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::NothingMatched), "already revoked");
    let before = s
        .leases(LeaseFilter {
            spiffe_id: Some(BOB.into()),
            state: Some(LeaseState::Active),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(!before.is_empty());
    let r = s
        .apply(revoke(
            RevokeSelector::Prefix("spiffe://example.org/team-b/".into()),
            false,
            None,
        ))
        .await
        .expect("commit");
    let mut ids: Vec<String> = before.iter().map(|l| l.id.to_string()).collect();
    ids.sort();
    assert_eq!(r.affected, ids);
    let r = s
        .apply(issue_op(lease(BOB, now + 40, 600), None))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::RevokedBefore));
    let r = s
        .apply(issue_op(lease(BOB, now + 41, 600), None))
        .await
        .expect("commit");
    assert_eq!(
        r.refused, None,
        "the rule covers only what was issued before it"
    );
    let one = s
        .leases(LeaseFilter {
            lease_id: Some(held.id.to_string()),
            limit: 10,
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(one.len(), 1);
    let r = s
        .apply(revoke(
            RevokeSelector::Profile(ProfileName::parse("gpu-scheduler-submit").expect("p")),
            false,
            Some(now + 40),
        ))
        .await
        .expect("commit");
    assert!(r.affected.contains(&held.id.to_string()));

    // The revocation feed: one event per revoked lease, sequenced and chained.
    let feed = s.revocations(0, 10_000).await.expect("feed");
    assert!(feed.len() >= 4);
    assert!(feed.windows(2).all(|w| w[1].seq == w[0].seq + 1));
    assert!(feed.iter().any(|e| e.lease_id == redeemed.id.as_str()));
    let (seq, hash) = s.revocation_tail().await.expect("tail").expect("events");
    let last = feed.last().expect("last");
    assert_eq!(
        (seq, hex::encode(hash)),
        (last.seq, last.chain_hash.clone())
    );
    assert_eq!(s.revocations(seq, 10).await.expect("feed").len(), 0);

    // Force-removing a backend revocation that is not pending is refused (and recorded).
    let r = s
        .apply(LedgerOp::ForceRemoveBackendRevocation {
            lease_id: redeemed.id.to_string(),
            now: now + 50,
            event: ev(EventKind::BackendRevoke, Some(&redeemed.id)),
        })
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::NothingMatched));

    // A plain record, the entries of one lease, the per-identity counters.
    let r = s
        .apply(LedgerOp::Record {
            event: ev(EventKind::Deny, None),
        })
        .await
        .expect("record");
    assert!(r.receipt.is_some());
    let entries = s
        .entries_for_lease(redeemed.id.as_str())
        .await
        .expect("entries");
    assert!(
        entries.len() >= 2,
        "the issuance and the refused force-removal"
    );
    assert!(entries.windows(2).all(|w| w[0].seq < w[1].seq));
    let stats = s.identity_stats().await.expect("stats");
    let holder = stats
        .iter()
        .find(|i| i.spiffe_id == HOLDER)
        .expect("the caller of every entry");
    assert!(holder.issued > 0 && holder.denied > 0);
    assert!(holder.first_seen_ms <= holder.last_seen_ms);
    assert_eq!(holder.last_issued_ms, Some(1_000));
    let size = assert_chain(s).await;

    // Audit sinks: one holder at a time, taken over once the hold lapses, and a position
    // that only moves forward.
    let claim = |holder: &str, now_ms: i64, shipped: Option<u64>| SinkClaim {
        name: "siem".into(),
        holder: holder.into(),
        now_ms,
        held_until_ms: now_ms + 60_000,
        shipped,
    };
    let at = |shipped| {
        Some(SinkPosition {
            shipped,
            log_size: size,
        })
    };
    assert_eq!(
        s.audit_sink(claim("a", 0, None)).await.expect("claim"),
        at(0)
    );
    assert_eq!(
        s.audit_sink(claim("b", 1_000, None)).await.expect("claim"),
        None
    );
    assert_eq!(
        s.audit_sink(claim("a", 2_000, Some(3)))
            .await
            .expect("advance"),
        at(3)
    );
    assert_eq!(
        s.audit_sink(claim("b", 3_000, Some(9)))
            .await
            .expect("refused"),
        None
    );
    // `a` renewed at 2 s: held until 62 s.
    assert_eq!(
        s.audit_sink(claim("b", 61_000, None)).await.expect("claim"),
        None
    );
    assert_eq!(
        s.audit_sink(claim("b", 62_001, None))
            .await
            .expect("take over"),
        at(3)
    );
    assert_eq!(
        s.audit_sink(claim("a", 63_000, Some(2)))
            .await
            .expect("late"),
        None
    );
    assert_eq!(
        s.audit_sink(claim("b", 64_000, Some(2)))
            .await
            .expect("back"),
        at(3)
    );
    assert_eq!(
        s.audit_sink(SinkClaim {
            name: "other".into(),
            ..claim("a", 64_000, None)
        })
        .await
        .expect("another sink"),
        at(0)
    );
}

fn ledger_cfg(commit_timeout: Duration) -> LedgerConfig {
    LedgerConfig {
        commit_timeout,
        busy_timeout: Duration::from_secs(2),
        max_batch: 256,
        postgres_sslmode: None,
        postgres_ca_file: None,
    }
}

/// Group commit happened: fewer commits than operations.
fn assert_group_commit(metrics: &Metrics) -> (f64, f64) {
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
    (commits, ops)
}

async fn checkpoint(store: &dyn Store, signer: &Arc<LogSigner>, time_ms: i64) -> StoredCheckpoint {
    store
        .apply(LedgerOp::Checkpoint {
            signer: signer.clone(),
            time_ms,
        })
        .await
        .expect("checkpoint")
        .checkpoint
        .expect("signed")
}

/// The offline verification, through the trait: every entry's chain link, the Merkle
/// root of every checkpoint recomputed from the entries, every checkpoint signature.
async fn verify_log(store: &dyn Store, signer: &LogSigner) -> LogReport {
    let vkey = VerifierKey::parse(&signer.vkey()).expect("vkey");
    let notes: Vec<(u64, String)> = store
        .checkpoints()
        .await
        .expect("checkpoints")
        .into_iter()
        .map(|c| (c.size, c.note))
        .collect();
    let mut v = LogVerifier::new(&notes, &vkey).expect("checkpoint signatures");
    let mut after = 0;
    loop {
        let page = store.audit_entries(after, 500).await.expect("entries");
        if page.is_empty() {
            break;
        }
        for e in &page {
            v.push(e, None).expect("entry verifies");
            after = e.seq;
        }
    }
    v.finish().expect("log verifies")
}

/// A PostgreSQL store; opening connects and migrates, so it runs off the async threads.
async fn open_pg(url: &str, cfg: &LedgerConfig, metrics: Arc<Metrics>) -> Arc<PostgresStore> {
    let (url, cfg) = (url.to_owned(), cfg.clone());
    let store = tokio::task::spawn_blocking(move || PostgresStore::open(&url, &cfg, metrics))
        .await
        .expect("open task")
        .expect("PostgreSQL store opens");
    Arc::new(store)
}

async fn issue_at(
    store: &dyn Store,
    l: Lease,
) -> Result<spiffe_broker::store::Applied, StoreError> {
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
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    let cfg = ledger_cfg(Duration::from_secs(5));
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&dir.path().join("ledger.db"), &cfg, metrics.clone()).expect("open"),
    );
    conformance(store.clone()).await;
    assert_group_commit(&metrics);

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
    issue_at(&store, lease(HOLDER, 1, 600))
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
    cosignatures(&store, &before, &after).await;
    let report = SqliteStore::verify_file(&dir.path().join("ledger.db"))
        .expect("chain and tree continue across restarts");
    assert_eq!(report.report.checkpoints, 2);
    assert!(
        report.report.notes[0].ends_with("— w2 AAAAAAAC\n"),
        "the offline verifier reads the cosignatures too"
    );
}

/// Witness cosignatures: stored per witness and size (a newer one replaces), attached to
/// the checkpoints they sign, and the largest cosigned size per witness.
async fn cosignatures(store: &dyn Store, before: &StoredCheckpoint, after: &StoredCheckpoint) {
    let add = |size: u64, witness: &str, line: &str| Cosignature {
        size,
        witness: witness.into(),
        line: line.into(),
        cosigned_at: 1,
    };
    assert_eq!(store.cosigned_size("w1").await.expect("read"), None);
    for c in [
        add(before.size, "w2", "— w2 AAAAAAAC\n"),
        add(before.size, "w1", "— w1 AAAAAAAA\n"),
        add(before.size, "w1", "— w1 AAAAAAAB\n"),
        add(after.size, "w1", "— w1 AAAAAAAD\n"),
    ] {
        store.add_cosignature(c).await.expect("stored");
    }
    assert_eq!(
        store.cosigned_size("w1").await.expect("read"),
        Some(after.size)
    );
    assert_eq!(
        store.cosigned_size("w2").await.expect("read"),
        Some(before.size)
    );
    let first = store
        .checkpoint(Some(before.size))
        .await
        .expect("read")
        .expect("cp");
    assert_eq!(first.cosignatures, ["— w1 AAAAAAAB\n", "— w2 AAAAAAAC\n"]);
    assert_eq!(
        first.cosigned_note(),
        format!("{}— w1 AAAAAAAB\n— w2 AAAAAAAC\n", before.note)
    );
    let all = store.checkpoints().await.expect("read");
    assert_eq!(all.len(), 2);
    assert_eq!(all[0].cosignatures, first.cosignatures);
    assert_eq!(all[1].cosignatures, ["— w1 AAAAAAAD\n"]);
    let latest = store.checkpoint(None).await.expect("read").expect("cp");
    assert_eq!(latest.cosignatures, ["— w1 AAAAAAAD\n"]);
}

/// The WAL stays bounded under sustained concurrent writes: checkpoints run between the
/// writer's transactions, so the WAL restarts from its beginning. (A background
/// checkpointer racing a busy writer never let it restart: 27.8 GB after six minutes.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_wal_stays_bounded_under_sustained_writes() {
    // SQLite checkpoints at 1,000 pages (4 MiB); the bound leaves room for one batch more.
    const BOUND: u64 = 8 << 20;
    let dir = tempfile::tempdir().expect("tempdir");
    let metrics = Arc::new(Metrics::new());
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(
            &dir.path().join("ledger.db"),
            &ledger_cfg(Duration::from_secs(10)),
            metrics.clone(),
        )
        .expect("open"),
    );
    // Rounds of 32 concurrent writers until the commits together far exceed the bound: a
    // loaded machine batches more per commit, so the number of rounds it takes varies.
    let mut round = 0;
    let (commits, ops) = loop {
        let writers: Vec<_> = (0..32)
            .map(|w| {
                let store = store.clone();
                tokio::spawn(async move {
                    for i in 0..500 {
                        let n = 1_000 + round * 100_000 + w * 1_000 + i;
                        issue(&*store, lease(HOLDER, n, 600)).await;
                    }
                })
            })
            .collect();
        for w in writers {
            w.await.expect("writer");
        }
        round += 1;
        let (commits, ops) = assert_group_commit(&metrics);
        if commits * 3.0 * 4096.0 > BOUND as f64 * 2.0 || round == 8 {
            break (commits, ops);
        }
    };
    assert_eq!(ops, 16_000.0 * round as f64);
    let wal = std::fs::metadata(dir.path().join("ledger.db-wal")).map_or(0, |m| m.len());
    // Every commit appends at least a few pages; together far more than the bound.
    assert!(
        commits * 3.0 * 4096.0 > BOUND as f64,
        "too few commits ({commits}) for the bound to mean anything"
    );
    assert!(
        wal < BOUND,
        "the WAL grew to {wal} bytes over {commits} commits"
    );
    println!("WAL {wal} bytes after {ops} ops in {commits} commits");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_ledger_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().expect("tempdir");
    let cfg = LedgerConfig {
        commit_timeout: Duration::from_secs(5),
        busy_timeout: Duration::from_secs(2),
        max_batch: 16,
        postgres_sslmode: None,
        postgres_ca_file: None,
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_conforms() {
    let server = pg::start();
    let metrics = Arc::new(Metrics::new());
    let cfg = ledger_cfg(Duration::from_secs(5));
    let store: Arc<dyn Store> = open_pg(server.url(), &cfg, metrics.clone()).await;
    conformance(store.clone()).await;
    assert_group_commit(&metrics);

    // A checkpoint before the restart, one after: the chain and tree continue.
    let keys = tempfile::tempdir().expect("tempdir");
    let signer = Arc::new(LogSigner::load_or_create(keys.path(), "test/audit").expect("log key"));
    let before = checkpoint(store.as_ref(), &signer, 1).await;
    drop(store);

    let store = open_pg(server.url(), &cfg, metrics).await;
    issue_at(store.as_ref(), lease(HOLDER, 1, 600))
        .await
        .expect("commit after restart");
    let after = checkpoint(store.as_ref(), &signer, 2).await;
    assert_eq!(after.size, before.size + 1);
    let proof = store
        .consistency_proof(before.size, after.size)
        .await
        .expect("read")
        .expect("in range");
    verify_consistency(before.size, after.size, &before.root, &after.root, &proof)
        .expect("consistent");
    cosignatures(store.as_ref(), &before, &after).await;
    let report = verify_log(store.as_ref(), &signer).await;
    assert_eq!(report.checkpoints, 2);
    assert_eq!(report.entries, after.size);
}

/// Two replicas starting at once on a fresh database: both open, the migrations ran once.
#[test]
fn postgres_replicas_starting_together_migrate_once() {
    let server = pg::start();
    let start = Arc::new(std::sync::Barrier::new(2));
    let opens: Vec<_> = (0..2)
        .map(|_| {
            let (url, start) = (server.url().to_owned(), start.clone());
            std::thread::spawn(move || {
                start.wait();
                PostgresStore::open(
                    &url,
                    &ledger_cfg(Duration::from_secs(5)),
                    Arc::new(Metrics::new()),
                )
            })
        })
        .collect();
    let stores: Vec<PostgresStore> = opens
        .into_iter()
        .map(|h| h.join().expect("thread").expect("both replicas open"))
        .collect();
    // Each migration's DDL creates its tables without IF NOT EXISTS: had both replicas run
    // one, the second would have failed to open.
    let ran = "SELECT count(*), count(DISTINCT version), min(version), max(version) FROM schema_migrations";
    let once = vec![vec![
        Some("9".to_owned()),
        Some("9".to_owned()),
        Some("1".to_owned()),
        Some("9".to_owned()),
    ]];
    assert_eq!(server.sql(ran), once);
    // A replica restarting later finds nothing to do.
    drop(stores);
    PostgresStore::open(
        server.url(),
        &ledger_cfg(Duration::from_secs(5)),
        Arc::new(Metrics::new()),
    )
    .expect("reopen");
    assert_eq!(server.sql(ran), once);
}

/// Two replicas on one database, issuing at once: one gap-free chain that verifies, one
/// Merkle tree (checkpoints signed by either replica are consistent), and revocations and
/// locks committed by one replica bind the other at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_replicas_share_one_chain() {
    let server = pg::start();
    let cfg = ledger_cfg(Duration::from_secs(10));
    let (ma, mb) = (Arc::new(Metrics::new()), Arc::new(Metrics::new()));
    let a: Arc<dyn Store> = open_pg(server.url(), &cfg, ma.clone()).await;
    let b: Arc<dyn Store> = open_pg(server.url(), &cfg, mb.clone()).await;
    let keys = tempfile::tempdir().expect("tempdir");
    let signer = Arc::new(LogSigner::load_or_create(keys.path(), "test/audit").expect("log key"));

    const ROUNDS: usize = 4;
    const ISSUES: usize = 400;
    let started = Instant::now();
    let mut seqs = Vec::new();
    for round in 0..ROUNDS {
        // Interleaved: even tasks through one replica, odd through the other, all at once.
        let mut tasks = Vec::new();
        for i in 0..ISSUES / ROUNDS {
            let st = if i % 2 == 0 { a.clone() } else { b.clone() };
            tasks.push(tokio::spawn(async move {
                issue_at(st.as_ref(), lease(HOLDER, 10_000, 600))
                    .await
                    .expect("commit")
                    .receipt
                    .expect("receipt")
                    .sequence
            }));
        }
        for t in tasks {
            seqs.push(t.await.expect("task"));
        }
        // A checkpoint per round, signed by either replica in turn.
        let st = if round % 2 == 0 { &a } else { &b };
        checkpoint(st.as_ref(), &signer, round as i64).await;
    }
    let elapsed = started.elapsed();
    let total = seqs.len();
    seqs.sort();
    seqs.dedup();
    assert_eq!(seqs.len(), total, "no sequence number given twice");
    let ((ca, oa), (cb, ob)) = (metrics_of(&ma), metrics_of(&mb));
    eprintln!(
        "two replicas: {ISSUES} concurrent issues in {:.0} ms ({:.0}/s); ops per commit {:.1} (a) {:.1} (b)",
        elapsed.as_secs_f64() * 1000.0,
        ISSUES as f64 / elapsed.as_secs_f64(),
        oa / ca,
        ob / cb,
    );

    // One chain, seen alike from both replicas.
    let (na, nb) = (
        assert_chain(a.as_ref()).await,
        assert_chain(b.as_ref()).await,
    );
    assert_eq!(na, nb);
    assert_eq!(na, *seqs.last().expect("last"));
    assert_eq!(seqs, (1..=na).collect::<Vec<_>>(), "gap-free");

    // One tree: checkpoints from either replica agree; a size is signed once.
    let last_a = checkpoint(a.as_ref(), &signer, 10_000).await;
    let last_b = checkpoint(b.as_ref(), &signer, 10_001).await;
    assert_eq!(
        last_a, last_b,
        "the same size is signed once, by whichever came first"
    );
    let cps = b.checkpoints().await.expect("checkpoints");
    assert_eq!(
        cps.len(),
        ROUNDS,
        "one per round; the last one was not signed twice"
    );
    for pair in cps.windows(2) {
        let (old, new) = (&pair[0], &pair[1]);
        let proof = a
            .consistency_proof(old.size, new.size)
            .await
            .expect("read")
            .expect("in range");
        verify_consistency(old.size, new.size, &old.root, &new.root, &proof)
            .expect("checkpoints are consistent across replicas");
    }
    let entries = a.audit_entries(0, 10_000).await.expect("entries");
    for e in entries.iter().step_by(37) {
        let proof = b
            .inclusion_proof(e.seq - 1, last_b.size)
            .await
            .expect("read")
            .expect("in range");
        verify_inclusion(
            &leaf_hash(e.body.as_bytes()),
            e.seq - 1,
            last_b.size,
            &proof,
            &last_b.root,
        )
        .expect("included");
    }
    let report = verify_log(b.as_ref(), &signer).await;
    assert_eq!(report.checkpoints, cps.len());

    // A revocation committed through one replica refuses issuance through the other.
    let revoked = "spiffe://example.org/ci/compromised";
    let r = a
        .apply(LedgerOp::Revoke {
            selector: RevokeSelector::SpiffeId(revoked.into()),
            issued_before: None,
            reason: "compromised".into(),
            now: 20_000,
            dry_run: false,
            chunk: None,
            event: ev(EventKind::Revoke, None),
        })
        .await
        .expect("revoke");
    assert_eq!(r.refused, Some(Refusal::NothingMatched));
    let r = issue_at(b.as_ref(), lease(revoked, 19_999, 600))
        .await
        .expect("commit");
    assert_eq!(r.refused, Some(Refusal::RevokedBefore));
    // So does a lock.
    b.apply(LedgerOp::Lock {
        lock: Lock {
            id: "0".repeat(32),
            kind: "spiffe_id".into(),
            value: HOLDER.into(),
            until: 30_000,
            reason: "incident".into(),
            created_by: "spiffe://example.org/ops/root".into(),
            created_at: 20_000,
        },
        event: ev(EventKind::Lock, None),
    })
    .await
    .expect("lock");
    let r = issue_at(a.as_ref(), lease(HOLDER, 20_001, 600))
        .await
        .expect("commit");
    assert!(
        matches!(r.refused, Some(Refusal::Locked(_))),
        "{:?}",
        r.refused
    );
    assert_eq!(assert_chain(b.as_ref()).await, na + 4);
}

fn metrics_of(m: &Metrics) -> (f64, f64) {
    let text = m.render();
    let count = |name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    (
        count("spiffe_broker_ledger_commit_batch_size_count").max(1.0),
        count("spiffe_broker_ledger_commit_batch_size_sum"),
    )
}

/// Two replicas reaping at once: every lease is expired exactly once, and the expire
/// entries' batches do not overlap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_expiry_runs_once_across_replicas() {
    let server = pg::start();
    let cfg = ledger_cfg(Duration::from_secs(10));
    let a: Arc<dyn Store> = open_pg(server.url(), &cfg, Arc::new(Metrics::new())).await;
    let b: Arc<dyn Store> = open_pg(server.url(), &cfg, Arc::new(Metrics::new())).await;
    const LEASES: usize = 300;
    let mut tasks = Vec::new();
    for i in 0..LEASES {
        let st = if i % 2 == 0 { a.clone() } else { b.clone() };
        tasks.push(tokio::spawn(async move {
            let l = issue_at(st.as_ref(), lease(HOLDER, 1_000, 10 + (i % 50) as i64))
                .await
                .expect("issue")
                .lease
                .expect("lease");
            l.id.to_string()
        }));
    }
    let mut issued = BTreeSet::new();
    for t in tasks {
        issued.insert(t.await.expect("task"));
    }

    let reap = |st: Arc<dyn Store>| {
        tokio::spawn(async move {
            let mut batches = Vec::new();
            loop {
                let applied = st
                    .apply(LedgerOp::Expire {
                        now: 5_000,
                        limit: 20,
                        event: ev(EventKind::Expire, None),
                    })
                    .await
                    .expect("expire");
                if applied.affected.is_empty() {
                    return batches;
                }
                batches.push((applied.receipt.expect("entry").sequence, applied.affected));
            }
        })
    };
    let (ra, rb) = (reap(a.clone()), reap(b.clone()));
    let mut batches = ra.await.expect("reaper a");
    batches.extend(rb.await.expect("reaper b"));

    let mut expired = Vec::new();
    for (_, ids) in &batches {
        expired.extend(ids.iter().cloned());
    }
    assert_eq!(expired.len(), LEASES, "no lease expired twice");
    assert_eq!(expired.into_iter().collect::<BTreeSet<_>>(), issued);
    // The ledger says the same: one expire entry per batch, disjoint, covering all.
    let entries = a.audit_entries(0, 10_000).await.expect("entries");
    let mut in_log = BTreeSet::new();
    let mut count = 0;
    for e in entries.iter().filter(|e| e.kind == "expire") {
        let body: serde_json::Value = serde_json::from_str(&e.body).expect("json");
        for id in body["affected_leases"].as_array().expect("listed") {
            assert!(
                in_log.insert(id.as_str().expect("id").to_owned()),
                "lease {id} in two expire entries"
            );
        }
        count += 1;
    }
    assert_eq!(count, batches.len(), "one entry per batch");
    assert_eq!(in_log, issued);
    let active = a
        .leases(LeaseFilter {
            state: Some(LeaseState::Active),
            limit: 1000,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(active.is_empty());
}

/// Two replicas claiming backend revocations at once: each queued revocation goes to
/// exactly one of them, and comes back only when the claim's hold ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_backend_revocation_claims_are_exclusive() {
    let server = pg::start();
    let cfg = ledger_cfg(Duration::from_secs(10));
    let a: Arc<dyn Store> = open_pg(server.url(), &cfg, Arc::new(Metrics::new())).await;
    let b: Arc<dyn Store> = open_pg(server.url(), &cfg, Arc::new(Metrics::new())).await;
    const QUEUED: usize = 120;
    let holder = "spiffe://example.org/ml/model-runtime";
    for n in 0..QUEUED {
        let mut l = lease(holder, 1_000, 600);
        l.backend = Some(BackendHandle {
            kind: "vault".into(),
            handle: format!("database/creds/reader/{n}"),
            revocable: true,
        });
        issue_at(a.as_ref(), l).await.expect("issue");
    }
    let r = b
        .apply(LedgerOp::Revoke {
            selector: RevokeSelector::SpiffeId(holder.into()),
            issued_before: None,
            reason: "test".into(),
            now: 1_100,
            dry_run: false,
            chunk: None,
            event: ev(EventKind::Revoke, None),
        })
        .await
        .expect("revoke");
    assert_eq!(r.affected.len(), QUEUED);

    let claim = |st: Arc<dyn Store>| {
        tokio::spawn(async move {
            let mut mine = Vec::new();
            loop {
                let got = st
                    .claim_backend_revocations(1_200, 7, 60)
                    .await
                    .expect("claim");
                if got.is_empty() {
                    return mine;
                }
                mine.extend(got.into_iter().map(|r| r.lease_id));
            }
        })
    };
    let (ca, cb) = (claim(a.clone()), claim(b.clone()));
    let (mine_a, mine_b) = (ca.await.expect("a"), cb.await.expect("b"));
    let all: BTreeSet<String> = mine_a.iter().chain(&mine_b).cloned().collect();
    assert_eq!(
        mine_a.len() + mine_b.len(),
        QUEUED,
        "no row claimed twice (a {}, b {})",
        mine_a.len(),
        mine_b.len()
    );
    assert_eq!(all.len(), QUEUED);
    assert!(b
        .claim_backend_revocations(1_259, 1_000, 60)
        .await
        .expect("claim")
        .is_empty());
    let back = a
        .claim_backend_revocations(1_260, 1_000, 60)
        .await
        .expect("claim");
    assert_eq!(
        back.len(),
        QUEUED,
        "an abandoned claim is due again when it ends"
    );
}

/// Fail closed, recover alone: with the database down, writes and reads answer
/// `Unavailable` within the commit timeout; once it is back, the same store works again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_fails_closed_and_reconnects() {
    let mut server = pg::local();
    let timeout = Duration::from_secs(2);
    let bound = timeout + Duration::from_secs(1);
    let store: Arc<dyn Store> =
        open_pg(server.url(), &ledger_cfg(timeout), Arc::new(Metrics::new())).await;
    let first = issue_at(store.as_ref(), lease(HOLDER, 1_000, 600))
        .await
        .expect("commit")
        .lease
        .expect("lease");
    assert!(store.lease(&first.id).await.expect("read").is_some());

    tokio::task::block_in_place(|| server.stop());
    let lost = lease(HOLDER, 1_000, 600);
    let lost_id = lost.id.clone();
    let t = Instant::now();
    let r = issue_at(store.as_ref(), lost).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < bound, "apply failed in {:?}", t.elapsed());
    let t = Instant::now();
    let r = store.lease(&first.id).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    let r = store.audit_entries(0, 10).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < bound * 2, "reads failed in {:?}", t.elapsed());
    match issue_at(store.as_ref(), lease(HOLDER, 1, 1)).await {
        Err(StoreError::Unavailable(why)) => {
            assert!(why.contains("127.0.0.1"), "names the server: {why}")
        }
        other => panic!("{other:?}"),
    }
    // A replica starting now fails at once, naming the server but never its password.
    let with_password = server.url().replace("postgres@", "postgres:s3cret@");
    let cfg = ledger_cfg(timeout);
    let t = Instant::now();
    let e = tokio::task::spawn_blocking(move || {
        PostgresStore::open(&with_password, &cfg, Arc::new(Metrics::new())).err()
    })
    .await
    .expect("open task")
    .expect("no database, no store");
    assert!(t.elapsed() < bound, "open failed in {:?}", t.elapsed());
    let e = e.to_string();
    assert!(e.contains("127.0.0.1") && !e.contains("s3cret"), "{e}");

    tokio::task::block_in_place(|| server.restart());
    let t = Instant::now();
    let next = issue_at(store.as_ref(), lease(HOLDER, 1_000, 600))
        .await
        .expect("the same store commits again once the database is back");
    assert!(t.elapsed() < bound, "recovered in {:?}", t.elapsed());
    assert_eq!(
        next.receipt.expect("receipt").sequence,
        2,
        "nothing of the outage was recorded"
    );
    assert!(store.lease(&first.id).await.expect("read").is_some());
    assert_eq!(store.lease(&lost_id).await.expect("read"), None);
    assert_eq!(assert_chain(store.as_ref()).await, 2);

    // A server that keeps its connections but stops answering (stuck on its disk): TCP
    // sees nothing wrong, so only the store's own bounds keep callers from hanging.
    server.freeze();
    let t = Instant::now();
    let r = issue_at(store.as_ref(), lease(HOLDER, 1_000, 600)).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < bound, "apply failed in {:?}", t.elapsed());
    let t = Instant::now();
    let r = store.audit_entries(0, 10).await;
    assert!(matches!(r, Err(StoreError::Unavailable(_))), "{r:?}");
    assert!(t.elapsed() < bound, "read failed in {:?}", t.elapsed());
    server.thaw();
    // The op caught in flight may have committed once the server resumed (its caller was
    // told Unavailable and got no credential, which is the invariant); the chain holds.
    let t = Instant::now();
    let mut recovered = None;
    while t.elapsed() < Duration::from_secs(15) {
        if let Ok(a) = issue_at(store.as_ref(), lease(HOLDER, 1_000, 600)).await {
            recovered = Some(a);
            break;
        }
    }
    let seq = recovered
        .expect("the store recovers once the server answers again")
        .receipt
        .expect("receipt")
        .sequence;
    assert!(
        store.audit_entries(0, 10).await.is_ok(),
        "reads recover too"
    );
    assert_eq!(assert_chain(store.as_ref()).await, seq);
}
