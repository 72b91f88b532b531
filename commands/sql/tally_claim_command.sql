-- Step 1 of every command: claim its Idempotency-Key, in its client's namespace, for this
-- transaction, and find what is recorded under it. The claim is a transaction-scoped advisory lock
-- on the key (tally_key_lock): a concurrent duplicate blocks here until the owner commits (then it
-- finds the owner's row, complete) or rolls back (then it owns the key). Returns NULL when nothing
-- is recorded under the key (this transaction now owns it), or the row recorded before (its
-- outcome is then replayed, tally_replay). The row itself is written once, whole, with its outcome
-- (tally_record_outcome), and only for an outcome a command records: a command refused without a
-- record writes nothing, and the claim goes with its transaction. (Measured, issue 11: a row
-- inserted to claim the key and updated with the outcome left a dead row per command; on a database
-- without aggressive autovacuum `commands` bloated and throughput fell by a fifth.)
--
-- The claim comes before any stream is locked; except that a command that waits for its wallet's
-- lock takes that lock first (the lifecycle commands, tally_reverse_transaction says why, and the
-- retried batches of tally_post_transactions), so that none waits for a key while another waits
-- for its wallet. A batch claims its keys in ascending order of their locks (tally_key_lock, then
-- the key), so no two batches wait for each other's keys. Two clients' keys never meet: the same
-- key from another client is another command (two keys whose locks collide only wait for each
-- other, a moment).
-- Proven by tests/integration/test_idempotency.py::test_concurrent_duplicates_have_one_effect and
-- tests/integration/test_two_servers.py.
DROP FUNCTION IF EXISTS tally_claim_command(uuid, text, bytea, jsonb);
--
-- The lookup must use the primary key, whatever the planner's statistics of `commands` say: they
-- can be far behind its size (measured in the hot-wallet benchmark: relpages 1 and reltuples 3
-- while it held 33,000 rows, and the lookup ran as sequential scans, 7,646 of them reading 72
-- million rows in twelve seconds; PostgreSQL's CPU per spend 1.1 ms instead of 0.3, throughput
-- 1,000/s instead of 2,650). The function plans it with sequential scans off.
CREATE OR REPLACE FUNCTION tally_claim_command(p_client uuid, p_command_id text) RETURNS commands
LANGUAGE plpgsql SET enable_seqscan = off AS $$
DECLARE
    v_prior commands;
BEGIN
    PERFORM pg_advisory_xact_lock(tally_key_lock_class(), tally_key_lock(p_client, p_command_id));
    SELECT * INTO v_prior FROM commands WHERE client_id = p_client AND command_id = p_command_id;
    RETURN v_prior;
END $$;

-- The advisory lock that claims a key: the two-part form (its own class, then a hash of the client
-- and the key), so it never meets Tally's one-part locks (projector, projections, migrations).
CREATE OR REPLACE FUNCTION tally_key_lock_class() RETURNS int LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 1952541769  -- 'tall' in ASCII
$$;
CREATE OR REPLACE FUNCTION tally_key_lock(p_client uuid, p_command_id text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtext(p_client::text || '/' || p_command_id)
$$;

-- A command's stored fingerprint: the request's, bound to the client that sent it.
CREATE OR REPLACE FUNCTION tally_fingerprint(p_client uuid, p_request bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(uuid_send(p_client) || p_request)
$$;
