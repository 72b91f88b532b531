-- A projection meets an event type it has no rule for: it stops, loudly, rather than guess (an
-- event it does not understand may move credits). Raised from inside the projection's statement,
-- so nothing of the batch is applied; the projector then applies what precedes the event one by
-- one and stops the projection with the event named (projections/projector.py), as for any poison
-- event. Proven by tests/integration/test_event_types.py.
CREATE OR REPLACE FUNCTION tally_refuse_event(
    p_projection text, p_position bigint, p_stream_id text, p_event_type text
) RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'projection % has no rule for event type % (position %, stream %)',
        p_projection, p_event_type, p_position, p_stream_id
        USING ERRCODE = 'data_exception';
END $$;
