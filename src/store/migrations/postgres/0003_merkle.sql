-- 0003: the Merkle tree over audit_log (RFC 6962) and signed checkpoints.
-- merkle_nodes holds every complete subtree: level 0 are the leaf hashes
-- (SHA-256(0x00 || body) of entry seq = idx + 1); level l, index i covers leaves
-- [i * 2^l, (i + 1) * 2^l). Proofs read O(log n) rows; nothing rescans the leaves.
-- Nodes are written in the same transaction as their entry, under the ledger lock, so
-- every replica extends the one tree.
CREATE TABLE merkle_nodes (
    level BIGINT NOT NULL,
    idx   BIGINT NOT NULL,
    hash  BYTEA NOT NULL,
    PRIMARY KEY (level, idx)
);

-- Signed checkpoints (C2SP signed-note format), one per published tree size.
CREATE TABLE checkpoints (
    size    BIGINT PRIMARY KEY,
    root    BYTEA NOT NULL,
    time_ms BIGINT NOT NULL,
    note    TEXT NOT NULL
);
