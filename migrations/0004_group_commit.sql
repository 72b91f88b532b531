-- Group commit: many transaction commands in one call and one database transaction.
--
-- Measured (bench/): one command per transaction spends most of PostgreSQL's CPU and the hot
-- wallet's lock hold time on the commit itself (the row lock is released only after the WAL
-- flush). The API therefore sends the commands that arrive while others are in flight together
-- (commands/event_store.py); each keeps its own key, decision, event and recorded outcome, and the
-- batch commits once.
--
-- Rules that keep a batch safe:
-- * Wallets are locked in ascending stream order (arrival order within one wallet), the same order
--   in every batch, so batches cannot deadlock on wallet rows.
-- * Rejections that are not recorded (asset_not_found, wallet_not_found, idempotency_key_reused)
--   are decided before the key is claimed, without writing: nothing needs undoing, and the rest of
--   the batch proceeds. Streams are never removed, so an existence check stays true.
-- * A key seen before (committed, or earlier in this very batch) replays its stored outcome.
--   A key being claimed by a concurrent transaction blocks the INSERT until that one commits or
--   rolls back, exactly as for a single command.
-- * Any unexpected error aborts the whole batch (nothing is applied); the caller then retries its
--   commands one by one.

CREATE FUNCTION tally_replay(p_prior commands, p_fingerprint bytea, OUT o_status int, OUT o_body text,
                             OUT o_replayed boolean)
LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN p_prior.fingerprint = p_fingerprint THEN p_prior.status::int ELSE 422 END,
           CASE WHEN p_prior.fingerprint = p_fingerprint THEN p_prior.response::text
                ELSE jsonb_build_object('code', 'idempotency_key_reused',
                                        'detail', 'this Idempotency-Key was used for a different request')::text
           END,
           p_prior.fingerprint = p_fingerprint
$$;

CREATE FUNCTION tally_post_transactions(
    p_command_ids text[], p_fingerprints bytea[], p_metadata jsonb[], p_event_ids uuid[],
    p_event_types text[], p_kinds text[], p_user_ids text[], p_assets text[], p_amounts bigint[],
    p_user_deltas bigint[], p_entries jsonb[], p_references text[], p_tx_metadata jsonb[],
    p_expected_versions bigint[]
) RETURNS TABLE (idx int, status int, body text, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    c record;
    v_prior commands;
    v_stream streams;
    v_stream_id text;
    v_now timestamptz := now();
    v_balance numeric;
    v_after numeric;
    v_data jsonb;
    v_event record;
    v_body jsonb;
BEGIN
    FOR c IN
        SELECT u.*
          FROM unnest(p_command_ids, p_fingerprints, p_metadata, p_event_ids, p_event_types, p_kinds,
                      p_user_ids, p_assets, p_amounts, p_user_deltas, p_entries, p_references,
                      p_tx_metadata, p_expected_versions) WITH ORDINALITY
               AS u(command_id, fingerprint, metadata, event_id, event_type, kind, user_id, asset,
                    amount, user_delta, entries, reference, tx_metadata, expected_version, i)
         ORDER BY u.user_id COLLATE "C", u.i
    LOOP
        idx := c.i;
        replayed := false;
        v_stream_id := 'wallet:' || c.user_id;

        SELECT * INTO v_prior FROM commands WHERE command_id = c.command_id;
        IF FOUND THEN
            SELECT r.o_status, r.o_body, r.o_replayed INTO status, body, replayed
              FROM tally_replay(v_prior, c.fingerprint) r;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'asset:' || c.asset) THEN
            status := 404;
            body := jsonb_build_object('code', 'asset_not_found',
                                       'detail', format('asset %s is not defined', c.asset))::text;
            RETURN NEXT;
            CONTINUE;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = v_stream_id) THEN
            status := 404;
            body := jsonb_build_object('code', 'wallet_not_found',
                                       'detail', format('no wallet for user %s', c.user_id))::text;
            RETURN NEXT;
            CONTINUE;
        END IF;

        INSERT INTO commands (command_id, fingerprint, metadata)
        VALUES (c.command_id, c.fingerprint, c.metadata)
        ON CONFLICT (command_id) DO NOTHING;
        IF NOT FOUND THEN  -- a concurrent duplicate committed while this INSERT waited for it
            SELECT * INTO STRICT v_prior FROM commands WHERE command_id = c.command_id;
            SELECT r.o_status, r.o_body, r.o_replayed INTO status, body, replayed
              FROM tally_replay(v_prior, c.fingerprint) r;
            RETURN NEXT;
            CONTINUE;
        END IF;

        SELECT * INTO STRICT v_stream FROM streams WHERE stream_id = v_stream_id FOR UPDATE;
        IF c.expected_version IS NOT NULL AND v_stream.version <> c.expected_version THEN
            v_body := jsonb_build_object(
                'code', 'version_mismatch',
                'detail', format('wallet %s is at version %s, not %s',
                                 c.user_id, v_stream.version, c.expected_version),
                'current_version', v_stream.version);
            PERFORM tally_record_outcome(c.command_id, 412, v_body, v_stream_id, NULL);
            status := 412;
            body := v_body::text;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_balance := coalesce((v_stream.state -> 'balances' ->> c.asset)::numeric, 0);
        v_after := v_balance + c.user_delta;
        IF v_after < 0 THEN
            v_body := jsonb_build_object(
                'code', 'insufficient_funds',
                'detail', format('wallet %s holds %s %s, less than the %s requested',
                                 c.user_id, v_balance, c.asset, c.amount),
                'balance', v_balance, 'amount', c.amount);
            PERFORM tally_record_outcome(c.command_id, 409, v_body, v_stream_id, NULL);
            status := 409;
            body := v_body::text;
            RETURN NEXT;
            CONTINUE;
        END IF;
        v_data := jsonb_build_object(
            'transaction_id', c.event_id, 'kind', c.kind, 'user_id', c.user_id, 'asset', c.asset,
            'amount', c.amount, 'entries', c.entries, 'reference', c.reference,
            'metadata', c.tx_metadata, 'balance_after', v_after);
        v_event := tally_append_event(v_stream_id, v_stream.version + 1, v_stream.last_hash, c.event_id,
                                      c.event_type, v_data, c.metadata, v_now);
        UPDATE streams
           SET version = v_stream.version + 1,
               state = jsonb_set(v_stream.state, ARRAY['balances', c.asset], to_jsonb(v_after)),
               last_hash = v_event.o_hash,
               updated_at = v_now
         WHERE stream_id = v_stream_id;
        v_body := v_data || jsonb_build_object('wallet_version', v_stream.version + 1,
                                               'created_at', tally_timestamp_text(v_now),
                                               'consistency_token', v_event.o_token);
        PERFORM tally_record_outcome(c.command_id, 201, v_body, v_stream_id, c.event_id);
        status := 201;
        body := v_body::text;
        RETURN NEXT;
    END LOOP;
END $$;

-- The single-command entry point is now a batch of one: one implementation of the rules.
-- Unlike before, not-found and key-reuse rejections are returned (404, 422) rather than raised;
-- they write nothing either way.
DROP FUNCTION tally_post_transaction(text, bytea, jsonb, uuid, text, text, text, text, bigint, bigint,
                                     jsonb, text, jsonb, bigint);
CREATE FUNCTION tally_post_transaction(
    p_command_id text, p_fingerprint bytea, p_metadata jsonb, p_event_id uuid, p_event_type text,
    p_kind text, p_user_id text, p_asset text, p_amount bigint, p_user_delta bigint,
    p_entries jsonb, p_reference text, p_tx_metadata jsonb, p_expected_version bigint
) RETURNS TABLE (status int, body text, replayed boolean) LANGUAGE sql AS $$
    SELECT t.status, t.body, t.replayed
      FROM tally_post_transactions(
          ARRAY[p_command_id], ARRAY[p_fingerprint], ARRAY[p_metadata], ARRAY[p_event_id],
          ARRAY[p_event_type], ARRAY[p_kind], ARRAY[p_user_id], ARRAY[p_asset], ARRAY[p_amount],
          ARRAY[p_user_delta], ARRAY[p_entries], ARRAY[p_reference], ARRAY[p_tx_metadata],
          ARRAY[p_expected_version]) t
$$;
