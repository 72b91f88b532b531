-- Records a command's outcome under its Idempotency-Key: one row, written once, complete, in the
-- command's own transaction (the key's advisory lock, tally_lock_command_key, is held meanwhile).
-- `metadata` is the request's context; the primary key is the last line of defence against a
-- second outcome for one key.
CREATE OR REPLACE FUNCTION tally_record_command(
    p_key text, p_fingerprint bytea, p_metadata jsonb, p_outcome text, p_response jsonb,
    p_stream_id text, p_event_id uuid
) RETURNS void LANGUAGE sql AS $$
    INSERT INTO commands (command_id, fingerprint, metadata, outcome, response, stream_id, event_id)
    VALUES (p_key, p_fingerprint, p_metadata, p_outcome, p_response, p_stream_id, p_event_id)
$$;
