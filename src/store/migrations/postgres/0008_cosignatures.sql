-- 0008: witness cosignatures (c2sp.org/tlog-cosignature) on the signed checkpoints. One
-- row per witness and tree size: the note signature line the witness returned from
-- add-checkpoint (c2sp.org/tlog-witness), already verified under its configured key.
-- The largest size per witness is where the next submission's consistency proof starts.
CREATE TABLE cosignatures (
    size        BIGINT NOT NULL REFERENCES checkpoints (size),
    witness     TEXT NOT NULL,
    line        TEXT NOT NULL,
    cosigned_at BIGINT NOT NULL,   -- the cosignature's timestamp (Unix seconds)
    PRIMARY KEY (witness, size)
);
CREATE INDEX cosignatures_size ON cosignatures (size);
