-- 0009: lease indexes that a revocation leaves alone, or only leaves.
--
-- The holder indexes carried `state` as a column, so revoking a lease moved its entry in
-- two indexes (a delete and an insert each), and a bulk revocation's later chunks walked
-- past every entry the earlier chunks had revoked (quadratic in the chunk count). Now:
--   * active leases per holder and profile are a partial index on state = 'active': a
--     revocation only deletes the entry, and what a chunk walks is what is left to revoke;
--     it also serves the per-profile quota and the inventory's active counts;
--   * a holder's leases of any state, newest first (the listing), are an index without
--     `state`, which no state change touches.
DROP INDEX leases_holder;
DROP INDEX leases_holder_profile;
CREATE INDEX leases_active_holder ON leases (spiffe_id, profile, expires_at) WHERE state = 'active';
CREATE INDEX leases_holder ON leases (spiffe_id, issued_at, id);
