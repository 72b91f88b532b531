-- Atomic batches (POST /v1/batches with "atomic": true). Each command is decided exactly as
-- tally_post_transactions decides a group-committed one, under its own key; a non-atomic batch is
-- a call of that function itself (commands/event_store.py, EventStore.post_batch).
--
-- An atomic batch applies all of its commands or none: tally_post_atomic runs them in a
-- subtransaction and, when any of them is refused (or p_reject says the caller refused one before
-- sending, for want of a scope), rolls that subtransaction back. PL/pgSQL keeps the local variables
-- of a block whose changes an exception undid, so every command's outcome is still answered: what
-- was refused, and that the rest was not applied. It waits for its wallets (p_lock_wait_ms, locked
-- first, in one order, before any key is claimed: tally_post_transactions says why that cannot
-- deadlock), since none of its commands may be left out.
--
-- Returns one row per command, in request order: tally_post_transactions's columns, and whether
-- the batch was applied.
CREATE OR REPLACE FUNCTION tally_post_atomic(p_commands jsonb, p_lock_wait_ms int, p_reject boolean)
RETURNS TABLE (idx int, outcome text, body text, replayed boolean, applied boolean) LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    o_outcome text[];
    o_body text[];
    o_replayed boolean[];
    v_applied boolean;
BEGIN
    BEGIN
        SELECT array_agg(t.outcome ORDER BY t.idx), array_agg(t.body ORDER BY t.idx),
               array_agg(t.replayed ORDER BY t.idx)
          INTO o_outcome, o_body, o_replayed
          FROM tally_post_transactions(p_commands, p_lock_wait_ms) t;
        v_applied := NOT p_reject AND 'accepted' = ALL (o_outcome);
        IF NOT v_applied THEN
            RAISE EXCEPTION 'the atomic batch is rejected' USING ERRCODE = 'TA001';
        END IF;
    EXCEPTION WHEN SQLSTATE 'TA001' THEN
        NULL;  -- everything the batch wrote is undone; the outcomes above are what it answers
    END;
    FOR i IN 1 .. coalesce(array_length(o_outcome, 1), 0) LOOP
        idx := i;
        outcome := o_outcome[i];
        body := o_body[i];
        replayed := o_replayed[i];
        applied := v_applied;
        RETURN NEXT;
    END LOOP;
END $$;
