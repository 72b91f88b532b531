-- Step 2: the claimed command's domain outcome and response, written once (the trigger
-- commands_outcome_once, commands/sql/tally_reject_change.sql, refuses any other update), in the
-- transaction that claimed it.
CREATE OR REPLACE FUNCTION tally_record_outcome(
    p_client uuid, p_key text, p_outcome text, p_response jsonb, p_stream_id text, p_event_id uuid
) RETURNS void LANGUAGE sql AS $$
    UPDATE commands
       SET outcome = p_outcome, response = p_response, stream_id = p_stream_id, event_id = p_event_id
     WHERE client_id = p_client AND command_id = p_key
$$;
