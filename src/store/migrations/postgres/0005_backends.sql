-- 0005: credential backends. A lease may carry the backend's own handle (Vault lease
-- id, certificate serial, STS assumed-role id; never a secret). When a lease whose
-- backend holds state ends, by any path (revoke, release, expiry), the same
-- transaction queues its revocation in the backend; a broker replica claims it (moving
-- next_attempt_at past the claim, FOR UPDATE SKIP LOCKED, so no two replicas work one
-- row at once) and retries with back-off until the backend confirms, or a
-- platform-admin force-removes it.
ALTER TABLE leases ADD COLUMN backend_kind TEXT;
ALTER TABLE leases ADD COLUMN backend_handle TEXT;
ALTER TABLE leases ADD COLUMN backend_revocable BOOLEAN NOT NULL DEFAULT false;

CREATE TABLE backend_revocations (
    lease_id        TEXT COLLATE "C" PRIMARY KEY REFERENCES leases (id),
    kind            TEXT NOT NULL,
    handle          TEXT NOT NULL,
    queued_at       BIGINT NOT NULL,   -- when the lease ended (Unix s)
    attempts        BIGINT NOT NULL DEFAULT 0,
    next_attempt_at BIGINT NOT NULL,   -- next try, or the end of a replica's claim
    last_error      TEXT,
    done_at         BIGINT,            -- set once the backend confirmed (or force-removed)
    outcome         TEXT CHECK (outcome IN ('revoked', 'force_removed'))
);
CREATE INDEX backend_revocations_due ON backend_revocations (next_attempt_at) WHERE done_at IS NULL;

-- The revocation feed names a revoked certificate's serial, for TLS relying parties.
ALTER TABLE revocation_events ADD COLUMN certificate_serial TEXT;

CREATE FUNCTION lease_end_queues_backend_revocation() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO backend_revocations (lease_id, kind, handle, queued_at, next_attempt_at)
    VALUES (NEW.id, NEW.backend_kind, NEW.backend_handle,
            COALESCE(NEW.ended_at, 0), COALESCE(NEW.ended_at, 0))
    ON CONFLICT (lease_id) DO NOTHING;
    RETURN NULL;
END
$$;
CREATE TRIGGER lease_end_queues_backend_revocation
    AFTER UPDATE OF state ON leases
    FOR EACH ROW
    WHEN (OLD.state = 'active' AND NEW.state <> 'active' AND NEW.backend_revocable)
    EXECUTE FUNCTION lease_end_queues_backend_revocation();
