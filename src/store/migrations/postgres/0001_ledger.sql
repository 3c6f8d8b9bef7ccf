-- 0001: leases and the hash-chained audit log (PostgreSQL; the same meaning as the SQLite
-- migration of the same number). Integers are BIGINT (Unix seconds and ms, counters),
-- hashes BYTEA, JSON is kept as TEXT so the canonical bodies stay byte-identical.
-- Identifiers compared, ordered or matched by prefix are COLLATE "C": byte order, as in
-- SQLite, whatever the database's locale.
CREATE TABLE leases (
    id                TEXT COLLATE "C" PRIMARY KEY,
    profile           TEXT COLLATE "C" NOT NULL,
    spiffe_id         TEXT COLLATE "C" NOT NULL,
    scopes            TEXT NOT NULL,            -- JSON array
    audience          TEXT NOT NULL,
    state             TEXT NOT NULL CHECK (state IN ('active', 'released', 'revoked', 'expired')),
    issued_at         BIGINT NOT NULL,          -- Unix seconds
    expires_at        BIGINT NOT NULL,
    max_expires_at    BIGINT NOT NULL,
    credential_sha256 TEXT NOT NULL,            -- never the credential
    renewals          BIGINT NOT NULL DEFAULT 0,
    ended_at          BIGINT,
    end_reason        TEXT,
    intent            TEXT                      -- JSON
);
-- The reaper walks active leases by expiry; nothing loads all leases.
CREATE INDEX leases_active_expiry ON leases (expires_at) WHERE state = 'active';
CREATE INDEX leases_holder ON leases (spiffe_id, state);
CREATE INDEX leases_newest ON leases (issued_at DESC, id DESC);

CREATE TABLE audit_log (
    seq       BIGINT PRIMARY KEY CHECK (seq >= 1),  -- 1-based, gap-free; the key stops a fork
    time_ms   BIGINT NOT NULL,
    kind      TEXT NOT NULL,
    caller    TEXT,
    lease_id  TEXT COLLATE "C",
    body      TEXT NOT NULL,                    -- canonical JSON, hashed
    prev_hash BYTEA NOT NULL,
    hash      BYTEA NOT NULL
);
CREATE INDEX audit_by_lease ON audit_log (lease_id) WHERE lease_id IS NOT NULL;

-- Defence in depth: the broker never updates, deletes or truncates audit rows. (The
-- table's owner can drop these triggers; the hash chain and signed checkpoints still
-- catch any change.)
CREATE FUNCTION audit_log_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only';
END
$$;
CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
