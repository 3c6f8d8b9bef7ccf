-- 0001: leases and the hash-chained audit log.
CREATE TABLE leases (
    id                TEXT PRIMARY KEY,
    profile           TEXT NOT NULL,
    spiffe_id         TEXT NOT NULL,
    scopes            TEXT NOT NULL,            -- JSON array
    audience          TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('active', 'released', 'revoked', 'expired')),
    issued_at         INTEGER NOT NULL,         -- Unix seconds
    expires_at        INTEGER NOT NULL,
    max_expires_at    INTEGER NOT NULL,
    credential_sha256 TEXT NOT NULL,            -- never the credential
    renewals          INTEGER NOT NULL DEFAULT 0,
    ended_at          INTEGER,
    end_reason        TEXT,
    intent            TEXT                      -- JSON
);
-- The reaper walks active leases by expiry; nothing loads all leases.
CREATE INDEX leases_active_expiry ON leases (expires_at) WHERE state = 'active';
CREATE INDEX leases_holder ON leases (spiffe_id, state);
CREATE INDEX leases_newest ON leases (issued_at DESC, id DESC);

CREATE TABLE audit_log (
    seq       INTEGER PRIMARY KEY,              -- 1-based, gap-free
    time_ms   INTEGER NOT NULL,
    kind      TEXT NOT NULL,
    caller    TEXT,
    lease_id  TEXT,
    body      TEXT NOT NULL,                    -- canonical JSON, hashed
    prev_hash BLOB NOT NULL,
    hash      BLOB NOT NULL
);
CREATE INDEX audit_by_lease ON audit_log (lease_id) WHERE lease_id IS NOT NULL;

-- Defence in depth: the broker never updates or deletes audit rows. (Someone with
-- write access to the file can drop these; the hash chain still catches them.)
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
