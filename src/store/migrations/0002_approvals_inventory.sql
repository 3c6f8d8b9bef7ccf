-- 0002: access requests (approvals), reviews, and what the inventory has seen.
CREATE TABLE access_requests (
    id             TEXT PRIMARY KEY,
    requester      TEXT NOT NULL,
    profile        TEXT NOT NULL,
    request        TEXT NOT NULL,        -- canonical JSON: scopes, ttl, intent
    request_digest TEXT NOT NULL,        -- SHA-256 of `request`; approvals bind to it
    approver_group TEXT NOT NULL,
    threshold      INTEGER NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'issued')),
    created_at     INTEGER NOT NULL,
    expires_at     INTEGER NOT NULL,
    deny_ends      INTEGER NOT NULL,
    break_glass    INTEGER NOT NULL DEFAULT 0,
    post_review    TEXT CHECK (post_review IN ('pending', 'approved', 'denied')),
    lease_id       TEXT,
    decided_at     INTEGER
);
CREATE INDEX access_requests_open ON access_requests (state, expires_at);
CREATE INDEX access_requests_post_review ON access_requests (post_review) WHERE post_review = 'pending';

CREATE TABLE access_reviews (
    request_id  TEXT NOT NULL REFERENCES access_requests (id),
    reviewer    TEXT NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('approve', 'deny')),
    reason      TEXT NOT NULL,
    at          INTEGER NOT NULL,
    post_review INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (request_id, reviewer, post_review)
);

-- Every authenticated SPIFFE ID that reached the broker (registered or not).
CREATE TABLE identities_seen (
    spiffe_id   TEXT PRIMARY KEY,
    first_seen  INTEGER NOT NULL,       -- Unix ms
    last_seen   INTEGER NOT NULL,
    last_issued INTEGER,
    issued      INTEGER NOT NULL DEFAULT 0,
    denied      INTEGER NOT NULL DEFAULT 0
);

-- Quotas count a holder's active leases per profile.
CREATE INDEX leases_holder_profile ON leases (spiffe_id, profile, state);
