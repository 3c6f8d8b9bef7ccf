-- 0003: the Merkle tree over audit_log (RFC 6962) and signed checkpoints.
-- merkle_nodes holds every complete subtree: level 0 are the leaf hashes
-- (SHA-256(0x00 || body) of entry seq = idx + 1); level l, index i covers leaves
-- [i * 2^l, (i + 1) * 2^l). Proofs read O(log n) rows; nothing rescans the leaves.
CREATE TABLE merkle_nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;

-- Signed checkpoints (C2SP signed-note format), one per published tree size.
CREATE TABLE checkpoints (
    size    INTEGER PRIMARY KEY,
    root    BLOB NOT NULL,
    time_ms INTEGER NOT NULL,
    note    TEXT NOT NULL
);
