-- 0006: audit sinks. Each configured sink (a JSON-lines file, syslog, OTLP) ships the
-- log's committed entries in order, from the position stored here, so a restart neither
-- loses nor repeats one. One broker (replica) ships a sink at a time: it holds the row
-- until held_until and renews the hold as it goes; another takes over once it lapses.
CREATE TABLE audit_sinks (
    name       TEXT PRIMARY KEY,
    shipped    BIGINT NOT NULL DEFAULT 0,   -- the last entry (seq) the sink has
    holder     TEXT,
    held_until BIGINT NOT NULL DEFAULT 0    -- Unix ms
);
