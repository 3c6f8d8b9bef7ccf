-- 0004: revocation that reaches relying parties, locks, idempotent issuance.

-- A revocation by identity, prefix or profile also bars issuing anything it covers that
-- was requested before the revocation (cutoff), so no in-flight issuance slips past an
-- acknowledged revocation, on any replica.
CREATE TABLE revocation_rules (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('spiffe_id', 'prefix', 'profile', 'all')),
    value      TEXT COLLATE "C" NOT NULL,
    cutoff     BIGINT NOT NULL,   -- leases issued at or before this (Unix s) are covered
    created_at BIGINT NOT NULL
);
CREATE INDEX revocation_rules_kind ON revocation_rules (kind, value);

-- Operator locks: no issuance for an identity, prefix or profile until a time.
CREATE TABLE locks (
    id         TEXT COLLATE "C" PRIMARY KEY,
    kind       TEXT NOT NULL CHECK (kind IN ('spiffe_id', 'prefix', 'profile')),
    value      TEXT COLLATE "C" NOT NULL,
    until      BIGINT NOT NULL,
    reason     TEXT NOT NULL,
    created_by TEXT NOT NULL,
    created_at BIGINT NOT NULL
);

-- The revocation feed relying parties follow: one event per revoked lease, sequenced
-- and hash-chained; signed feed heads let a consumer tell a forged feed.
CREATE TABLE revocation_events (
    seq        BIGINT PRIMARY KEY,
    lease_id   TEXT COLLATE "C" NOT NULL,
    spiffe_id  TEXT COLLATE "C" NOT NULL,
    profile    TEXT COLLATE "C" NOT NULL,
    expires_at BIGINT NOT NULL,       -- consumers may forget the event after this
    revoked_at BIGINT NOT NULL,
    reason     TEXT NOT NULL,
    chain_hash BYTEA NOT NULL         -- SHA-256(prev chain_hash || canonical event)
);

-- Idempotent IssueCredential: the credential is kept only encrypted under a key derived
-- from the client's idempotency key, which the broker does not store.
CREATE TABLE idempotency (
    caller     TEXT COLLATE "C" NOT NULL,
    key_hash   TEXT COLLATE "C" NOT NULL,  -- SHA-256 of the idempotency key
    digest     TEXT NOT NULL,              -- the request it was used for
    lease_id   TEXT NOT NULL,
    sealed     BYTEA NOT NULL,             -- AEAD(credential) under HKDF(idempotency key)
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (caller, key_hash)
);
