-- Appends one event to a stream whose row the caller has locked (or just created), chaining its
-- hash to the stream's head; `p_writer_xid` is the event's (tally_stream_writer_xid). Returns the
-- new head and the consistency token "<writer xid>.<global position>" that read-your-writes waits
-- for. The caller updates the stream
-- row (version, snapshot, last_hash) in the same transaction.
DROP FUNCTION IF EXISTS tally_append_event(text, bigint, bytea, uuid, text, jsonb, jsonb, timestamptz);
CREATE OR REPLACE FUNCTION tally_append_event(
    p_stream_id text, p_version bigint, p_prev_hash bytea, p_event_id uuid, p_event_type text,
    p_data jsonb, p_metadata jsonb, p_now timestamptz, p_writer_xid xid8, OUT o_hash bytea, OUT o_token text
) LANGUAGE plpgsql AS $$
DECLARE
    v_position bigint;
BEGIN
    o_hash := sha256(p_prev_hash || tally_event_bytes(
        p_stream_id, p_version, p_event_id, p_event_type, p_data, p_metadata, p_now));
    INSERT INTO events (stream_id, stream_version, event_id, event_type, data, metadata, hash,
                        recorded_at, writer_xid)
    VALUES (p_stream_id, p_version, p_event_id, p_event_type, p_data, p_metadata, o_hash, p_now,
            p_writer_xid)
    RETURNING global_position INTO v_position;
    o_token := p_writer_xid::text || '.' || v_position::text;
END $$;
