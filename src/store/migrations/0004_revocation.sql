-- 0004: revocation that reaches relying parties, locks, idempotent issuance.

-- A revocation by identity, prefix or profile also bars issuing anything it covers that
-- was requested before the revocation (cutoff), so no in-flight issuance slips past an
-- acknowledged revocation.
CREATE TABLE revocation_rules (
    id         INTEGER PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('spiffe_id', 'prefix', 'profile', 'all')),
    value      TEXT NOT NULL,
    cutoff     INTEGER NOT NULL,  -- leases issued at or before this (Unix s) are covered
    created_at INTEGER NOT NULL
);
CREATE INDEX revocation_rules_kind ON revocation_rules (kind, value);

-- Operator locks: no issuance for an identity, prefix or profile until a time.
CREATE TABLE locks (
    id         TEXT PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('spiffe_id', 'prefix', 'profile')),
    value      TEXT NOT NULL,
    until      INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at INTEGER NOT NULL
);

-- The revocation feed relying parties follow: one event per revoked lease, sequenced
-- and hash-chained; signed feed heads let a consumer tell a forged feed.
CREATE TABLE revocation_events (
    seq        INTEGER PRIMARY KEY,
    lease_id   TEXT NOT NULL,
    spiffe_id  TEXT NOT NULL,
    profile    TEXT NOT NULL,
    expires_at INTEGER NOT NULL,      -- consumers may forget the event after this
    revoked_at INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    chain_hash BLOB NOT NULL          -- SHA-256(prev chain_hash || canonical event)
);

-- Idempotent IssueCredential: the credential is kept only encrypted under a key derived
-- from the client's idempotency key, which the broker does not store.
CREATE TABLE idempotency (
    caller     TEXT NOT NULL,
    key_hash   TEXT NOT NULL,         -- SHA-256 of the idempotency key
    digest     TEXT NOT NULL,         -- the request it was used for
    lease_id   TEXT NOT NULL,
    sealed     BLOB NOT NULL,         -- AEAD(credential) under HKDF(idempotency key)
    expires_at INTEGER NOT NULL,
    PRIMARY KEY (caller, key_hash)
);
