-- Commands that share an Idempotency-Key are serialised by a transaction-level advisory lock on
-- this hash, in the two-key space (class 31249 = 0x7A11), which never meets Tally's one-key locks
-- (migrations, projector, projections, rebuilds). The lock is the command's claim on its key: a
-- concurrent duplicate waits for it until the first commits, then finds the stored outcome and
-- replays it. Batches take these locks in ascending hash order (tally_post_transactions): every
-- transaction takes them in one global order, so they cannot deadlock each other; two keys of one
-- hash only ever make a command wait, never answer wrongly (the key itself is compared).
-- Proven by tests/integration/test_idempotency.py and tests/integration/test_two_servers.py.
CREATE OR REPLACE FUNCTION tally_command_key_hash(p_key text) RETURNS int
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT hashtext(p_key)
$$;

CREATE OR REPLACE FUNCTION tally_lock_command_key(p_key text) RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(31249, tally_command_key_hash(p_key))
$$;
