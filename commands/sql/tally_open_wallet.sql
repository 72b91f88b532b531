-- OpenWallet: creates the stream `wallet:<user_id>` with its WalletOpened event, exactly once per
-- client's Idempotency-Key. `p_command` is commands.event_store.CommandRecord as JSON:
-- {key, client, fingerprint, legacy_fingerprint, context, command: {user_id, metadata}}. Returns the
-- domain outcome (`accepted` or `wallet_exists`, both recorded and replayed), the response body, and whether it
-- was replayed. Runs as its owner (SECURITY DEFINER): the application role may call it, and cannot
-- write these tables itself (api/migrate.py).
CREATE OR REPLACE FUNCTION tally_open_wallet(p_command jsonb)
RETURNS TABLE (outcome text, body text, replayed boolean) LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    v_key text := p_command ->> 'key';
    v_client uuid := (p_command ->> 'client')::uuid;
    v_fingerprint bytea := (p_command ->> 'fingerprint')::bytea;
    v_context jsonb := (p_command -> 'context')
                       || jsonb_build_object('command_id', v_key, 'client_id', v_client);
    v_user_id text := p_command -> 'command' ->> 'user_id';
    v_stream text := 'wallet:' || v_user_id;
    v_writer xid8;
    v_now timestamptz := now();
    v_data jsonb := jsonb_build_object('user_id', v_user_id,
                                       'metadata', coalesce(p_command -> 'command' -> 'metadata', '{}'));
    v_event_id uuid := gen_random_uuid();
    v_prior commands;
    v_event record;
    v_body jsonb;
BEGIN
    v_prior := tally_claim_command(v_client, v_key);
    IF v_prior.command_id IS NOT NULL THEN
        RETURN QUERY SELECT r.outcome, r.body, r.replayed FROM tally_replay(
            v_prior, v_client, v_fingerprint, (p_command ->> 'legacy_fingerprint')::bytea) r;
        RETURN;
    END IF;
    INSERT INTO streams (stream_id, stream_type, version, state, last_hash, created_at, updated_at)
    VALUES (v_stream, 'wallet', 1, '{"balances": {}}', tally_genesis_hash(), v_now, v_now)
    ON CONFLICT (stream_id) DO NOTHING;
    IF NOT FOUND THEN
        v_body := tally_rejection('wallet_exists', format('a wallet for user %s already exists', v_user_id));
        PERFORM tally_record_outcome(v_client, v_key, v_fingerprint, v_context, 'wallet_exists', v_body, v_stream, NULL);
        RETURN QUERY SELECT 'wallet_exists', v_body::text, false;
        RETURN;
    END IF;
    v_writer := tally_writer_xid();
    v_event := tally_append_event(v_stream, 1, tally_genesis_hash(), v_event_id, 'WalletOpened', v_data,
                                  v_context, v_now, v_writer);
    UPDATE streams SET last_hash = v_event.o_hash, last_writer_xid = v_writer WHERE stream_id = v_stream;
    v_body := v_data || jsonb_build_object('version', 1, 'balances', '[]'::jsonb,
                                           'created_at', tally_timestamp_text(v_now),
                                           'consistency_token', v_event.o_token);
    PERFORM tally_record_outcome(v_client, v_key, v_fingerprint, v_context, 'accepted', v_body, v_stream, v_event_id);
    RETURN QUERY SELECT 'accepted', v_body::text, false;
END $$;
