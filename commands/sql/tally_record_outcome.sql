-- Step 2: the command's row, written once and whole, in the transaction that claimed its key
-- (tally_claim_command): the request's fingerprint bound to the client, the command's context, its
-- domain outcome and response, the stream and event it produced. Nothing changes it afterwards
-- (the trigger commands_outcome_once, commands/sql/tally_command_outcome_once.sql).
DROP FUNCTION IF EXISTS tally_record_outcome(uuid, text, text, jsonb, text, uuid);
CREATE OR REPLACE FUNCTION tally_record_outcome(
    p_client uuid, p_key text, p_request bytea, p_metadata jsonb, p_outcome text, p_response jsonb,
    p_stream_id text, p_event_id uuid
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO commands (client_id, command_id, fingerprint, metadata, outcome, response, stream_id, event_id)
    VALUES (p_client, p_key, tally_fingerprint(p_client, p_request), p_metadata, p_outcome, p_response,
            p_stream_id, p_event_id)
$$;
