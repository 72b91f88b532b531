-- PlaceHold: reserve `amount` of a wallet's available balance until `expires_in_seconds` from now
-- (the database's clock), exactly once per client's Idempotency-Key. No credits move: the hold
-- enters the wallet's snapshot (`state.holds`, tally_held) and a HoldPlaced event records it; its
-- id is the event's. `p_command` is commands.event_store.CommandRecord as JSON: {key, client,
-- fingerprint, legacy_fingerprint, context, command: {user_id, asset, amount, expires_in_seconds,
-- reference, metadata}}.
--
-- Outcomes: `accepted`; `insufficient_funds` (the available balance, balance - active unexpired
-- holds, is short): recorded and replayed; `wallet_not_found`, `asset_not_found`: refused without a
-- record. The wallet's row is locked before the key is claimed (tally_reverse_transaction says why).
-- N concurrent holds on a wallet that can afford k of them: exactly k, proven by
-- tests/integration/test_lifecycle.py.
CREATE OR REPLACE FUNCTION tally_place_hold(p_command jsonb)
RETURNS TABLE (outcome text, body text, replayed boolean) LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT
-- Every lookup here is by an index; planned with sequential scans off, so statistics far behind
-- the tables' sizes cannot turn them into scans (measured on the key lookup: tally_claim_command).
SET enable_seqscan = off AS $$
DECLARE
    v_key text := p_command ->> 'key';
    v_client uuid := (p_command ->> 'client')::uuid;
    v_context jsonb := (p_command -> 'context') || jsonb_build_object('command_id', v_key, 'client_id', v_client);
    v_cmd jsonb := p_command -> 'command';
    v_user_id text := v_cmd ->> 'user_id';
    v_asset text := v_cmd ->> 'asset';
    v_amount bigint := (v_cmd ->> 'amount')::bigint;
    v_seconds int := (v_cmd ->> 'expires_in_seconds')::int;
    v_stream streams;
    v_writer xid8;
    v_claim record;
    v_now timestamptz;
    v_expires timestamptz;
    v_balance numeric;
    v_held numeric;
    v_hold_id uuid;
    v_data jsonb;
    v_event record;
    v_body jsonb;
BEGIN
    IF v_amount IS NULL OR v_amount NOT BETWEEN 1 AND 1000000000000000 OR v_seconds IS NULL
       OR v_seconds NOT BETWEEN 1 AND 2592000 THEN
        RAISE EXCEPTION 'not a valid hold command' USING ERRCODE = 'data_exception';
    END IF;
    -- (Streams are never removed: one seen here is still there when it is locked.)
    IF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'asset:' || v_asset) THEN
        RETURN QUERY SELECT * FROM tally_recorded_or(p_command,
            tally_rejection('asset_not_found', format('asset %s is not defined', v_asset)));
        RETURN;
    ELSIF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'wallet:' || v_user_id) THEN
        RETURN QUERY SELECT * FROM tally_recorded_or(p_command,
            tally_rejection('wallet_not_found', format('no wallet for user %s', v_user_id)));
        RETURN;
    END IF;
    SELECT * INTO v_claim FROM tally_lock_and_claim(p_command, 'wallet:' || v_user_id);
    IF v_claim.o_outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_claim.o_outcome, v_claim.o_body, v_claim.o_replayed;
        RETURN;
    END IF;
    v_stream := v_claim.o_stream;
    v_now := greatest(clock_timestamp(), v_stream.updated_at);
    v_expires := v_now + make_interval(secs => v_seconds);
    v_balance := coalesce((v_stream.state -> 'balances' ->> v_asset)::numeric, 0);
    v_held := tally_held(v_stream.state, v_asset, v_now);
    IF v_balance - v_held < v_amount THEN
        outcome := 'insufficient_funds';
        v_body := tally_rejection('insufficient_funds',
            format('wallet %s has %s %s available, less than the %s to hold', v_user_id, v_balance - v_held,
                   v_asset, v_amount),
            jsonb_build_object('balance', v_balance, 'held', v_held, 'available', v_balance - v_held,
                               'amount', v_amount));
    ELSE
        outcome := 'accepted';
        v_hold_id := gen_random_uuid();
        v_data := jsonb_build_object(
            'hold_id', v_hold_id, 'user_id', v_user_id, 'asset', v_asset, 'amount', v_amount,
            'expires_at', tally_timestamp_text(v_expires), 'reference', v_cmd ->> 'reference',
            'metadata', coalesce(v_cmd -> 'metadata', '{}'));
        v_writer := tally_stream_writer_xid(v_stream.last_writer_xid);
        v_event := tally_append_event(v_stream.stream_id, v_stream.version + 1, v_stream.last_hash, v_hold_id,
                                      'HoldPlaced', v_data, v_context, v_now, v_writer);
        UPDATE streams
           SET version = v_stream.version + 1,
               state = tally_with_hold(v_stream.state, v_hold_id, jsonb_build_object(
                   'asset', v_asset, 'remaining', v_amount, 'expires_at', v_data -> 'expires_at')),
               last_hash = v_event.o_hash,
               last_writer_xid = v_writer,
               updated_at = v_now
         WHERE stream_id = v_stream.stream_id;
        v_body := tally_hold_body(v_data, 0, v_amount, 'active', v_now, v_event.o_token);
    END IF;
    PERFORM tally_record_outcome(v_client, v_key, (p_command ->> 'fingerprint')::bytea, v_context, outcome, v_body, v_stream.stream_id, v_hold_id);
    body := v_body::text;
    replayed := false;
    RETURN NEXT;
END $$;
