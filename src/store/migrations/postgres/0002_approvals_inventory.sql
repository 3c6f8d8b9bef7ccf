-- 0002: access requests (approvals), reviews, and what the inventory has seen.
CREATE TABLE access_requests (
    id             TEXT COLLATE "C" PRIMARY KEY,
    requester      TEXT COLLATE "C" NOT NULL,
    profile        TEXT COLLATE "C" NOT NULL,
    request        TEXT NOT NULL,        -- canonical JSON: scopes, ttl, intent
    request_digest TEXT NOT NULL,        -- SHA-256 of `request`; approvals bind to it
    approver_group TEXT NOT NULL,
    threshold      BIGINT NOT NULL,
    state          TEXT NOT NULL CHECK (state IN ('pending', 'approved', 'denied', 'expired', 'issued')),
    created_at     BIGINT NOT NULL,
    expires_at     BIGINT NOT NULL,
    deny_ends      BOOLEAN NOT NULL,
    break_glass    BOOLEAN NOT NULL DEFAULT false,
    post_review    TEXT CHECK (post_review IN ('pending', 'approved', 'denied')),
    lease_id       TEXT COLLATE "C",
    decided_at     BIGINT
);
CREATE INDEX access_requests_open ON access_requests (state, expires_at);
CREATE INDEX access_requests_post_review ON access_requests (post_review) WHERE post_review = 'pending';

CREATE TABLE access_reviews (
    request_id  TEXT COLLATE "C" NOT NULL REFERENCES access_requests (id),
    reviewer    TEXT COLLATE "C" NOT NULL,
    verdict     TEXT NOT NULL CHECK (verdict IN ('approve', 'deny')),
    reason      TEXT NOT NULL,
    at          BIGINT NOT NULL,
    post_review BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (request_id, reviewer, post_review)
);

-- Every authenticated SPIFFE ID that reached the broker (registered or not).
CREATE TABLE identities_seen (
    spiffe_id   TEXT COLLATE "C" PRIMARY KEY,
    first_seen  BIGINT NOT NULL,       -- Unix ms
    last_seen   BIGINT NOT NULL,
    last_issued BIGINT,
    issued      BIGINT NOT NULL DEFAULT 0,
    denied      BIGINT NOT NULL DEFAULT 0
);

-- Quotas count a holder's active leases per profile.
CREATE INDEX leases_holder_profile ON leases (spiffe_id, profile, state);
