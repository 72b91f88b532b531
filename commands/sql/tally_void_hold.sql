-- VoidHold: end an active hold, releasing what remains of it (a HoldVoided event; no credits move),
-- exactly once per client's Idempotency-Key. `p_command` is commands.event_store.CommandRecord as
-- JSON: {key, client, fingerprint, legacy_fingerprint, context, assets, command: {hold_id, reason}}.
-- Answers the hold, voided. Outcomes and order as tally_capture_hold's: `hold_expired`,
-- `hold_not_active` recorded; `hold_not_found`, `forbidden` not.
CREATE OR REPLACE FUNCTION tally_void_hold(p_command jsonb)
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
    v_placed events;
    v_stream streams;
    v_writer xid8;
    v_claim record;
    v_entry jsonb;
    v_ended record;
    v_asset text;
    v_now timestamptz;
    v_remaining bigint;
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
    SELECT * INTO v_ended FROM tally_hold_ended(v_hold_id, v_entry, v_now);
    IF FOUND THEN
        outcome := v_ended.code;
        v_body := tally_rejection(v_ended.code, v_ended.detail, jsonb_build_object('hold_id', v_hold_id));
    ELSE
        outcome := 'accepted';
        v_remaining := (v_entry ->> 'remaining')::bigint;
        v_event_id := gen_random_uuid();
        v_data := jsonb_build_object('hold_id', v_hold_id, 'user_id', v_placed.data -> 'user_id', 'asset', v_asset,
                                     'released', v_remaining, 'reason', v_cmd ->> 'reason');
        v_writer := tally_stream_writer_xid(v_stream.last_writer_xid);
        v_event := tally_append_event(v_stream.stream_id, v_stream.version + 1, v_stream.last_hash, v_event_id,
                                      'HoldVoided', v_data, v_context, v_now, v_writer);
        UPDATE streams
           SET version = v_stream.version + 1,
               state = tally_with_hold(v_stream.state, v_hold_id, NULL),
               last_hash = v_event.o_hash,
               last_writer_xid = v_writer,
               updated_at = v_now
         WHERE stream_id = v_stream.stream_id;
        v_body := tally_hold_body(v_placed.data, (v_placed.data ->> 'amount')::bigint - v_remaining, 0, 'voided',
                                  v_placed.recorded_at, v_event.o_token);
    END IF;
    PERFORM tally_record_outcome(v_client, v_key, (p_command ->> 'fingerprint')::bytea, v_context, outcome, v_body, v_stream.stream_id, v_event_id);
    body := v_body::text;
    replayed := false;
    RETURN NEXT;
END $$;
