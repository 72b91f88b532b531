-- CaptureHold: move `amount` (default: all that remains) of a hold from the user to revenue, as a
-- spend (a HoldCaptured event, `kind` spend, linked by `hold_id`), exactly once per client's
-- Idempotency-Key. `final` (default true) releases whatever remains; several partial captures are
-- allowed until then. `p_command` is commands.event_store.CommandRecord as JSON: {key, client,
-- fingerprint, legacy_fingerprint, context, assets, command: {hold_id, amount, final}}.
--
-- Outcomes: `accepted`; `capture_exceeds_hold` (more than remains), `hold_expired` (its expiry has
-- passed by the database's clock, whether or not HoldExpired is recorded yet), `hold_not_active`
-- (captured or voided): recorded and replayed; `hold_not_found`, `forbidden`: refused without a
-- record. The wallet's row is locked before the key is claimed (tally_reverse_transaction says
-- why); a capture and a void racing on one hold: exactly one wins (tests/integration/test_lifecycle.py).
-- The captured credits were reserved, so the wallet's available balance cannot go below zero.
CREATE OR REPLACE FUNCTION tally_capture_hold(p_command jsonb)
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
    v_hold_id uuid := (v_cmd ->> 'hold_id')::uuid;
    v_final boolean := coalesce((v_cmd ->> 'final')::boolean, true);
    v_placed events;
    v_stream streams;
    v_writer xid8;
    v_claim record;
    v_entry jsonb;
    v_ended record;
    v_asset text;
    v_user_id text;
    v_now timestamptz;
    v_remaining bigint;
    v_amount bigint;
    v_left bigint;
    v_released bigint;
    v_balance numeric;
    v_after numeric;
    v_event_id uuid;
    v_data jsonb;
    v_event record;
    v_body jsonb;
BEGIN
    SELECT * INTO v_placed FROM events WHERE event_id = v_hold_id AND event_type = 'HoldPlaced';
    IF NOT FOUND THEN
        RETURN QUERY SELECT * FROM tally_recorded_or(p_command, tally_rejection('hold_not_found', format('no hold %s', v_hold_id)));
        RETURN;
    END IF;
    v_asset := v_placed.data ->> 'asset';
    v_user_id := v_placed.data ->> 'user_id';
    IF NOT tally_asset_allowed(p_command, v_asset) THEN
        RETURN QUERY SELECT * FROM tally_asset_forbidden(v_asset);
        RETURN;
    END IF;
    SELECT * INTO v_claim FROM tally_lock_and_claim(p_command, v_placed.stream_id);
    IF v_claim.o_outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_claim.o_outcome, v_claim.o_body, v_claim.o_replayed;
        RETURN;
    END IF;
    v_stream := v_claim.o_stream;
    v_now := greatest(clock_timestamp(), v_stream.updated_at);
    v_entry := v_stream.state -> 'holds' -> v_hold_id::text;
    v_remaining := (v_entry ->> 'remaining')::bigint;
    v_amount := coalesce((v_cmd ->> 'amount')::bigint, v_remaining);
    SELECT * INTO v_ended FROM tally_hold_ended(v_hold_id, v_entry, v_now);
    IF FOUND THEN
        outcome := v_ended.code;
        v_body := tally_rejection(v_ended.code, v_ended.detail, jsonb_build_object('hold_id', v_hold_id));
    ELSIF v_amount > v_remaining OR v_amount < 1 THEN
        outcome := 'capture_exceeds_hold';
        v_body := tally_rejection('capture_exceeds_hold',
            format('hold %s has %s left, less than the %s to capture', v_hold_id, v_remaining, v_amount),
            jsonb_build_object('remaining', v_remaining, 'amount', v_amount));
    ELSE
        v_balance := coalesce((v_stream.state -> 'balances' ->> v_asset)::numeric, 0);
        v_after := v_balance - v_amount;
        IF v_after < 0 THEN  -- the hold reserved it: only a broken snapshot gets here
            RAISE EXCEPTION 'hold % reserves more than wallet % holds', v_hold_id, v_user_id
                USING ERRCODE = 'data_corrupted';
        END IF;
        outcome := 'accepted';
        v_left := CASE WHEN v_final THEN 0 ELSE v_remaining - v_amount END;
        v_released := v_remaining - v_amount - v_left;
        v_event_id := gen_random_uuid();
        v_data := jsonb_build_object(
            'transaction_id', v_event_id, 'kind', 'spend', 'user_id', v_user_id, 'asset', v_asset,
            'amount', v_amount,
            'entries', (SELECT tally_legs(f, v_user_id, v_amount) FROM flows f WHERE f.kind = 'spend'),
            'reference', v_placed.data -> 'reference', 'metadata', v_placed.data -> 'metadata',
            'balance_after', v_after, 'hold_id', v_hold_id, 'final', v_final, 'released', v_released,
            'hold_remaining', v_left);
        v_writer := tally_stream_writer_xid(v_stream.last_writer_xid);
        v_event := tally_append_event(v_stream.stream_id, v_stream.version + 1, v_stream.last_hash, v_event_id,
                                      'HoldCaptured', v_data, v_context, v_now, v_writer);
        UPDATE streams
           SET version = v_stream.version + 1,
               state = tally_with_hold(
                   jsonb_set(v_stream.state, ARRAY['balances', v_asset], to_jsonb(v_after)), v_hold_id,
                   CASE WHEN v_left > 0 THEN jsonb_set(v_entry, '{remaining}', to_jsonb(v_left)) END),
               last_hash = v_event.o_hash,
               last_writer_xid = v_writer,
               updated_at = v_now
         WHERE stream_id = v_stream.stream_id;
        v_body := v_data || jsonb_build_object('wallet_version', v_stream.version + 1,
                                               'created_by', v_context ->> 'created_by',
                                               'created_at', tally_timestamp_text(v_now),
                                               'consistency_token', v_event.o_token);
    END IF;
    PERFORM tally_record_outcome(v_client, v_key, (p_command ->> 'fingerprint')::bytea, v_context, outcome, v_body, v_stream.stream_id, v_event_id);
    body := v_body::text;
    replayed := false;
    RETURN NEXT;
END $$;
