-- The answer a batch's Idempotency-Key replays: its row, written once, with what the commands'
-- own rows do not hold (migrations/0010_batches.sql). Concurrent duplicates of a batch may both
-- run (each command's key still applies it once); the first to record its answer keeps it, and
-- the caller answers what is recorded (tally_batch_answer).
-- Returns whether this call recorded it.
CREATE OR REPLACE FUNCTION tally_record_batch(
    p_client uuid, p_key text, p_request bytea, p_atomic boolean, p_applied boolean, p_results jsonb
) RETURNS boolean LANGUAGE sql SECURITY DEFINER SET search_path FROM CURRENT AS $$
    WITH recorded AS (
        INSERT INTO batches (client_id, batch_key, fingerprint, atomic, applied, results)
        VALUES (p_client, p_key, tally_fingerprint(p_client, p_request), p_atomic, p_applied, p_results)
        ON CONFLICT (client_id, batch_key) DO NOTHING
        RETURNING 1
    )
    SELECT EXISTS (SELECT FROM recorded)
$$;
