-- Group commit: many transaction commands in one call and one database transaction.
--
-- Measured (bench/): one command per transaction spends most of PostgreSQL's CPU and the hot
-- wallet's lock hold time on the commit itself (the row lock is released only after the WAL
-- flush). The API therefore sends the commands that arrive while others are in flight together
-- (commands/event_store.py); each keeps its own key, decision, event and recorded outcome, and the
-- batch commits once.
--
-- Rules that keep a batch safe:
-- * Two passes. First every key is claimed, in ascending key order; then wallets are locked, in
--   ascending stream order (arrival order within one wallet). Every batch takes its locks in the
--   same two orders, and a batch waiting for a key (pass 1) holds no wallet lock yet, so batches
--   cannot deadlock each other (a review found that claiming keys in wallet order could).
-- * Rejections that are not recorded (asset_not_found, wallet_not_found, idempotency_key_reused)
--   are decided before the key is claimed, without writing: nothing needs undoing, and the rest of
--   the batch proceeds. Streams are never removed, so an existence check stays true.
-- * A key seen before replays its stored outcome; a key repeated within the batch gets the outcome
--   of its first occurrence, marked replayed.
-- * The legs must be exactly the flow's: `user:<user_id>` by the signed amount and the kind's system
--   account by its opposite. A mismatch is a programming error: it raises, and nothing is applied.
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

-- The flows, in SQL: the exact legs, event type and user delta of a top-up, bonus or spend (the same
-- rule as domain.plan_transaction). Used to refuse mismatched legs here, and by `tally verify`.
CREATE FUNCTION tally_flow_legs(p_kind text, p_user_id text, p_amount bigint,
                                OUT legs jsonb, OUT event_type text, OUT user_delta bigint)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_array(jsonb_build_object('account', 'system:' || f.system, 'amount', -f.delta),
                             jsonb_build_object('account', 'user:' || p_user_id, 'amount', f.delta)),
           f.event_type, f.delta
      FROM (SELECT CASE p_kind WHEN 'top_up' THEN 'treasury' WHEN 'bonus' THEN 'bonus'
                               WHEN 'spend' THEN 'revenue' END AS system,
                   CASE p_kind WHEN 'top_up' THEN 'CreditsToppedUp' WHEN 'bonus' THEN 'BonusGranted'
                               WHEN 'spend' THEN 'CreditsSpent' END AS event_type,
                   CASE p_kind WHEN 'spend' THEN -p_amount ELSE p_amount END AS delta) f
$$;

CREATE FUNCTION tally_post_transactions(
    p_command_ids text[], p_fingerprints bytea[], p_metadata jsonb[], p_event_ids uuid[],
    p_event_types text[], p_kinds text[], p_user_ids text[], p_assets text[], p_amounts bigint[],
    p_user_deltas bigint[], p_entries jsonb[], p_references text[], p_tx_metadata jsonb[],
    p_expected_versions bigint[]
) RETURNS TABLE (idx int, status int, body text, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    n int := cardinality(p_command_ids);
    o_status int[] := array_fill(NULL::int, ARRAY[n]);
    o_body text[] := array_fill(NULL::text, ARRAY[n]);
    o_replayed boolean[] := array_fill(false, ARRAY[n]);
    o_first int[] := array_fill(NULL::int, ARRAY[n]);  -- a repeated key: its first occurrence
    claimed int[] := '{}';                              -- the commands whose keys this call claimed
    v_last_key text;                                    -- pass 1 goes in key order: a repeated key
    v_last_claim int;                                   -- follows its first occurrence directly
    i int;
    v_prior commands;
    v_stream streams;
    v_stream_id text;
    v_now timestamptz := now();
    v_balance numeric;
    v_after numeric;
    v_data jsonb;
    v_event record;
    v_body jsonb;
    v_legs jsonb;
    v_event_type text;
    v_delta bigint;
    v_replay record;
BEGIN
    -- Pass 1, in key order: replays, unrecorded rejections, and the claim of every other key.
    FOR i IN SELECT u.i FROM unnest(p_command_ids) WITH ORDINALITY AS u(k, i) ORDER BY u.k COLLATE "C", u.i
    LOOP
        IF p_command_ids[i] = v_last_key AND v_last_claim IS NOT NULL THEN
            o_first[i] := v_last_claim;
            CONTINUE;
        END IF;
        v_last_key := p_command_ids[i];
        v_last_claim := NULL;
        SELECT * INTO v_prior FROM commands WHERE command_id = p_command_ids[i];
        IF FOUND THEN
            v_replay := tally_replay(v_prior, p_fingerprints[i]);
            o_status[i] := v_replay.o_status;
            o_body[i] := v_replay.o_body;
            o_replayed[i] := v_replay.o_replayed;
            CONTINUE;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'asset:' || p_assets[i]) THEN
            o_status[i] := 404;
            o_body[i] := jsonb_build_object('code', 'asset_not_found',
                                            'detail', format('asset %s is not defined', p_assets[i]))::text;
            CONTINUE;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'wallet:' || p_user_ids[i]) THEN
            o_status[i] := 404;
            o_body[i] := jsonb_build_object('code', 'wallet_not_found',
                                            'detail', format('no wallet for user %s', p_user_ids[i]))::text;
            CONTINUE;
        END IF;
        SELECT f.legs, f.event_type, f.user_delta INTO v_legs, v_event_type, v_delta
          FROM tally_flow_legs(p_kinds[i], p_user_ids[i], p_amounts[i]) f;
        IF v_event_type IS NULL OR p_entries[i] IS DISTINCT FROM v_legs OR p_user_deltas[i] IS DISTINCT FROM v_delta
           OR p_event_types[i] IS DISTINCT FROM v_event_type THEN
            RAISE EXCEPTION 'the legs of command % do not match a % of %', p_command_ids[i], p_kinds[i],
                p_amounts[i] USING ERRCODE = 'data_exception';
        END IF;
        INSERT INTO commands (command_id, fingerprint, metadata)
        VALUES (p_command_ids[i], p_fingerprints[i], p_metadata[i])
        ON CONFLICT (command_id) DO NOTHING;
        IF NOT FOUND THEN  -- a concurrent duplicate committed while this INSERT waited for it
            SELECT * INTO STRICT v_prior FROM commands WHERE command_id = p_command_ids[i];
            v_replay := tally_replay(v_prior, p_fingerprints[i]);
            o_status[i] := v_replay.o_status;
            o_body[i] := v_replay.o_body;
            o_replayed[i] := v_replay.o_replayed;
            CONTINUE;
        END IF;
        claimed := claimed || i;
        v_last_claim := i;
    END LOOP;

    -- Pass 2, in wallet order: lock, decide, append, record, for every key claimed in pass 1.
    FOR i IN SELECT c FROM unnest(claimed) c ORDER BY p_user_ids[c] COLLATE "C", c
    LOOP
        v_stream_id := 'wallet:' || p_user_ids[i];
        SELECT * INTO STRICT v_stream FROM streams WHERE stream_id = v_stream_id FOR UPDATE;
        IF p_expected_versions[i] IS NOT NULL AND v_stream.version <> p_expected_versions[i] THEN
            v_body := jsonb_build_object(
                'code', 'version_mismatch',
                'detail', format('wallet %s is at version %s, not %s',
                                 p_user_ids[i], v_stream.version, p_expected_versions[i]),
                'current_version', v_stream.version);
            PERFORM tally_record_outcome(p_command_ids[i], 412, v_body, v_stream_id, NULL);
            o_status[i] := 412;
            o_body[i] := v_body::text;
            CONTINUE;
        END IF;
        v_balance := coalesce((v_stream.state -> 'balances' ->> p_assets[i])::numeric, 0);
        v_after := v_balance + p_user_deltas[i];
        IF v_after < 0 THEN
            v_body := jsonb_build_object(
                'code', 'insufficient_funds',
                'detail', format('wallet %s holds %s %s, less than the %s requested',
                                 p_user_ids[i], v_balance, p_assets[i], p_amounts[i]),
                'balance', v_balance, 'amount', p_amounts[i]);
            PERFORM tally_record_outcome(p_command_ids[i], 409, v_body, v_stream_id, NULL);
            o_status[i] := 409;
            o_body[i] := v_body::text;
            CONTINUE;
        END IF;
        v_data := jsonb_build_object(
            'transaction_id', p_event_ids[i], 'kind', p_kinds[i], 'user_id', p_user_ids[i],
            'asset', p_assets[i], 'amount', p_amounts[i], 'entries', p_entries[i],
            'reference', p_references[i], 'metadata', p_tx_metadata[i], 'balance_after', v_after);
        v_event := tally_append_event(v_stream_id, v_stream.version + 1, v_stream.last_hash, p_event_ids[i],
                                      p_event_types[i], v_data, p_metadata[i], v_now);
        UPDATE streams
           SET version = v_stream.version + 1,
               state = jsonb_set(v_stream.state, ARRAY['balances', p_assets[i]], to_jsonb(v_after)),
               last_hash = v_event.o_hash,
               updated_at = v_now
         WHERE stream_id = v_stream_id;
        v_body := v_data || jsonb_build_object('wallet_version', v_stream.version + 1,
                                               'created_at', tally_timestamp_text(v_now),
                                               'consistency_token', v_event.o_token);
        PERFORM tally_record_outcome(p_command_ids[i], 201, v_body, v_stream_id, p_event_ids[i]);
        o_status[i] := 201;
        o_body[i] := v_body::text;
    END LOOP;

    FOR i IN 1 .. n LOOP
        idx := i;
        IF o_first[i] IS NULL THEN
            status := o_status[i];
            body := o_body[i];
            replayed := o_replayed[i];
        ELSIF p_fingerprints[i] = p_fingerprints[o_first[i]] THEN
            status := o_status[o_first[i]];
            body := o_body[o_first[i]];
            replayed := true;
        ELSE
            status := 422;
            body := jsonb_build_object('code', 'idempotency_key_reused',
                                       'detail', 'this Idempotency-Key was used for a different request')::text;
            replayed := false;
        END IF;
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
