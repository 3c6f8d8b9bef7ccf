-- 0007: delegation (RFC 8693 token exchange). A lease issued on an exchanged token
-- records the lease of the broker-issued subject token it was derived from (revoking
-- that one revokes this one, transitively) and the subject it acts for, when the
-- subject is not the holder (revoking the subject's identity revokes it too).
ALTER TABLE leases ADD COLUMN parent_lease_id TEXT;
ALTER TABLE leases ADD COLUMN subject TEXT;
CREATE INDEX leases_parent ON leases (parent_lease_id) WHERE parent_lease_id IS NOT NULL;
CREATE INDEX leases_subject ON leases (subject, state) WHERE subject IS NOT NULL;
