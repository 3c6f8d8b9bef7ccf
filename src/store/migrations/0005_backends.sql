-- 0005: credential backends. A lease may carry the backend's own handle (Vault lease
-- id, certificate serial, STS assumed-role id; never a secret). When a lease whose
-- backend holds state ends, by any path (revoke, release, expiry), the same
-- transaction queues its revocation in the backend; the broker retries it with
-- back-off until the backend confirms, or a platform-admin force-removes it.
ALTER TABLE leases ADD COLUMN backend_kind TEXT;
ALTER TABLE leases ADD COLUMN backend_handle TEXT;
ALTER TABLE leases ADD COLUMN backend_revocable INTEGER NOT NULL DEFAULT 0;

CREATE TABLE backend_revocations (
    lease_id        TEXT PRIMARY KEY REFERENCES leases (id),
    kind            TEXT NOT NULL,
    handle          TEXT NOT NULL,
    queued_at       INTEGER NOT NULL,   -- when the lease ended (Unix s)
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    last_error      TEXT,
    done_at         INTEGER,            -- set once the backend confirmed (or force-removed)
    outcome         TEXT CHECK (outcome IN ('revoked', 'force_removed'))
);
CREATE INDEX backend_revocations_due ON backend_revocations (next_attempt_at) WHERE done_at IS NULL;

-- The revocation feed names a revoked certificate's serial, for TLS relying parties.
ALTER TABLE revocation_events ADD COLUMN certificate_serial TEXT;

CREATE TRIGGER lease_end_queues_backend_revocation
AFTER UPDATE OF state ON leases
WHEN OLD.state = 'active' AND NEW.state != 'active' AND NEW.backend_revocable = 1
BEGIN
    INSERT OR IGNORE INTO backend_revocations (lease_id, kind, handle, queued_at, next_attempt_at)
    VALUES (NEW.id, NEW.backend_kind, NEW.backend_handle, COALESCE(NEW.ended_at, 0), COALESCE(NEW.ended_at, 0));
END;
