-- Step 1 of every command: claim its Idempotency-Key, in its client's namespace, by inserting the
-- command's row, before any stream is locked; except that a command that waits for its wallet's
-- lock takes that lock first (the lifecycle commands, tally_reverse_transaction says why, and the
-- retried batches of tally_post_transactions), so that none waits for a key while another waits
-- for its wallet. `p_request` is the request's fingerprint as the API
-- computed it; the row stores it bound to the client (tally_fingerprint). Returns NULL when this
-- transaction now owns the key, or the row recorded under it before (its outcome is then replayed,
-- tally_replay): one statement when the key is new. A concurrent duplicate blocks on the primary
-- key inside this INSERT until the owner commits (then it finds the owner's row, complete) or rolls
-- back (then it owns the key). The row's outcome is written once, by tally_record_outcome in the
-- same transaction, or, for a command refused without a record (an unknown asset or wallet), the
-- row is deleted before that transaction commits: no committed row is ever without an outcome, and
-- the claim held the key until then. Two clients' keys never meet: the same key from another
-- client is another command.
-- Proven by tests/integration/test_idempotency.py::test_concurrent_duplicates_have_one_effect and
-- tests/integration/test_two_servers.py.
CREATE OR REPLACE FUNCTION tally_claim_command(
    p_client uuid, p_command_id text, p_request bytea, p_metadata jsonb
) RETURNS commands LANGUAGE plpgsql AS $$
DECLARE
    v_prior commands;
BEGIN
    INSERT INTO commands (client_id, command_id, fingerprint, metadata)
    VALUES (p_client, p_command_id, tally_fingerprint(p_client, p_request), p_metadata)
    ON CONFLICT (client_id, command_id) DO NOTHING;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO STRICT v_prior FROM commands WHERE client_id = p_client AND command_id = p_command_id;
    RETURN v_prior;
END $$;

-- A command's stored fingerprint: the request's, bound to the client that sent it.
CREATE OR REPLACE FUNCTION tally_fingerprint(p_client uuid, p_request bytea) RETURNS bytea
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT sha256(uuid_send(p_client) || p_request)
$$;
