-- A projection meets an event type it has no rule for (tally_event_kind is NULL): it stops, loudly,
-- rather than guess (an event it does not understand may move credits). Each projection function
-- calls this after its statement when the batch held such an event, so the raise rolls the whole
-- batch back; the projector then applies what precedes the event one by one and stops the
-- projection with the event named (projections/projector.py), as for any poison event.
-- Proven by tests/integration/test_event_types.py.
CREATE OR REPLACE FUNCTION tally_refuse_event(p_projection text, p_position bigint) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    v_event events;
BEGIN
    SELECT * INTO v_event FROM events WHERE global_position = p_position;
    RAISE EXCEPTION 'projection % has no rule for event type % (position %, stream %)',
        p_projection, v_event.event_type, p_position, v_event.stream_id
        USING ERRCODE = 'data_exception';
END $$;
