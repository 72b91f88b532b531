-- Records the expiry of one wallet's holds whose `expires_at` has passed (a HoldExpired event each,
-- releasing what remained; no credits move), at most `p_max` of them, and takes them out of its
-- snapshot. Correctness does not wait for it: from its `expires_at` on, a hold holds nothing and
-- cannot be captured or voided (tally_held, tally_hold_ended). It only puts the expiry in the
-- history, for readers, verify and as-of. The active `tally projector` calls it for each wallet
-- the holds read model shows with a hold past its expiry (commands/expiry.py), each call its own
-- transaction, so a sweep holds one wallet's lock at a time, for one short statement.
--
-- The wallet's row is locked SKIP LOCKED: a busy wallet is left for the next sweep, and the sweep
-- never makes a command wait. Its snapshot is the truth: only its entries past expiry are ended, so
-- a hold is never ended twice (the read model may lag). HoldExpired is caused by no command: its
-- metadata says so (`cause`), and verify knows it. Each expiry is a wallet event and takes a wallet
-- version, like every event of the wallet. Returns how many holds it ended.
CREATE OR REPLACE FUNCTION tally_expire_wallet_holds(p_user_id text, p_max int)
RETURNS int LANGUAGE plpgsql SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_stream streams;
    v_hold record;
    v_now timestamptz;
    v_writer xid8;
    v_data jsonb;
    v_event record;
    v_ended int := 0;
BEGIN
    SELECT * INTO v_stream FROM streams WHERE stream_id = 'wallet:' || p_user_id FOR UPDATE SKIP LOCKED;
    IF NOT FOUND OR NOT v_stream.state ? 'holds' THEN
        RETURN 0;
    END IF;
    v_now := greatest(clock_timestamp(), v_stream.updated_at);
    FOR v_hold IN
        SELECT h.key::uuid AS hold_id, h.value AS entry FROM jsonb_each(v_stream.state -> 'holds') h
         WHERE (h.value ->> 'expires_at')::timestamptz <= v_now
         ORDER BY (h.value ->> 'expires_at')::timestamptz, h.key
         LIMIT p_max
    LOOP
        v_data := jsonb_build_object('hold_id', v_hold.hold_id, 'user_id', p_user_id,
                                     'asset', v_hold.entry -> 'asset', 'released', v_hold.entry -> 'remaining',
                                     'expires_at', v_hold.entry -> 'expires_at');
        v_writer := coalesce(v_writer, tally_stream_writer_xid(v_stream.last_writer_xid));
        v_event := tally_append_event(v_stream.stream_id, v_stream.version + 1, v_stream.last_hash, gen_random_uuid(),
                                      'HoldExpired', v_data, jsonb_build_object('cause', 'hold expired'), v_now,
                                      v_writer);
        v_stream.version := v_stream.version + 1;
        v_stream.last_hash := v_event.o_hash;
        v_stream.state := tally_with_hold(v_stream.state, v_hold.hold_id, NULL);
        v_ended := v_ended + 1;
    END LOOP;
    IF v_ended > 0 THEN
        UPDATE streams
           SET version = v_stream.version, state = v_stream.state, last_hash = v_stream.last_hash,
               last_writer_xid = v_writer, updated_at = v_now
         WHERE stream_id = v_stream.stream_id;
    END IF;
    RETURN v_ended;
END $$;
