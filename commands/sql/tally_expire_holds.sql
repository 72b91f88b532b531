-- Records the expiry of holds whose `expires_at` has passed (a HoldExpired event each, releasing
-- what remained; no credits move) and takes them out of their wallets' snapshots. Correctness does
-- not wait for it: from its `expires_at` on, a hold holds nothing and cannot be captured or voided
-- (tally_held, tally_hold_ended). It only puts the expiry in the history, for readers, verify and
-- as-of. `tally projector` calls it every few seconds (projections/projector.py).
--
-- Candidates come from the holds read model (rm_holds_expiring), so a sweep costs an index read;
-- each wallet's row is locked SKIP LOCKED (a busy wallet waits for the next sweep, and no command
-- ever waits for a sweep) and its snapshot is the truth: only its entries past expiry are ended.
-- HoldExpired is caused by no command: its metadata says so (`cause`), and verify knows it.
-- Returns how many holds it ended.
CREATE OR REPLACE FUNCTION tally_expire_holds(p_limit int)
RETURNS int LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_user_id text;
    v_stream streams;
    v_hold record;
    v_now timestamptz;
    v_writer xid8;
    v_event_id uuid;
    v_data jsonb;
    v_event record;
    v_ended int := 0;
BEGIN
    FOR v_user_id IN
        SELECT DISTINCT h.user_id FROM (
            SELECT user_id FROM rm_holds WHERE status = 'active' AND expires_at <= now()
             ORDER BY expires_at LIMIT p_limit) h
    LOOP
        SELECT * INTO v_stream FROM streams WHERE stream_id = 'wallet:' || v_user_id FOR UPDATE SKIP LOCKED;
        CONTINUE WHEN NOT FOUND;
        v_now := greatest(clock_timestamp(), v_stream.updated_at);
        FOR v_hold IN
            SELECT h.key::uuid AS hold_id, h.value AS entry FROM jsonb_each(v_stream.state -> 'holds') h
             WHERE (h.value ->> 'expires_at')::timestamptz <= v_now ORDER BY h.value ->> 'expires_at', h.key
        LOOP
            v_event_id := gen_random_uuid();
            v_data := jsonb_build_object('hold_id', v_hold.hold_id, 'user_id', v_user_id,
                                         'asset', v_hold.entry -> 'asset', 'released', v_hold.entry -> 'remaining',
                                         'expires_at', v_hold.entry -> 'expires_at');
            v_writer := coalesce(v_writer, tally_writer_xid());
            v_event := tally_append_event(v_stream.stream_id, v_stream.version + 1, v_stream.last_hash, v_event_id,
                                          'HoldExpired', v_data, jsonb_build_object('cause', 'hold expired'),
                                          v_now, v_writer);
            v_stream.version := v_stream.version + 1;
            v_stream.last_hash := v_event.o_hash;
            v_stream.state := tally_with_hold(v_stream.state, v_hold.hold_id, NULL);
            v_ended := v_ended + 1;
        END LOOP;
        CONTINUE WHEN NOT FOUND;  -- (the read model lags: its holds may have ended already)
        UPDATE streams
           SET version = v_stream.version, state = v_stream.state, last_hash = v_stream.last_hash, updated_at = v_now
         WHERE stream_id = v_stream.stream_id;
    END LOOP;
    RETURN v_ended;
END $$;
