-- TopUpCredits, GrantBonus and SpendCredits, group-committed: every command of the batch is decided
-- under its wallet's row lock, in one call and one database transaction (one commit for all).
--
-- Measured (bench/): a commit per command costs most of PostgreSQL's CPU per spend, and on a hot
-- wallet the row lock is held through each commit's WAL flush; the API therefore sends the commands
-- that arrive while others are in flight together (commands/event_store.py).
--
-- `p_commands` is a JSON array of commands.event_store.CommandRecord:
-- {key, fingerprint, context, command: {kind, user_id, asset, amount, reference, metadata,
-- expected_version}}, read by field name into tally_transaction_command (adding a field touches
-- that type and the Python that fills it). Python sends only what the caller asked: the legs come
-- from the flows table (tally_flow_legs).
--
-- Returns one row per command, in request order: the domain outcome (`accepted`,
-- `insufficient_funds`, `version_mismatch`, `wallet_not_found`, `asset_not_found`,
-- `idempotency_key_reused`), the response body, and whether it was replayed.
--
-- Rules that keep a batch safe:
-- * Two passes. Pass 1, in ascending key-hash order, takes each key's advisory lock
--   (tally_lock_command_key) and answers replays and the rejections that are not recorded; pass 2,
--   in ascending wallet order (request order within one wallet), locks each wallet row, decides,
--   appends and records. Every batch takes its locks in these two orders, and a batch waiting for a
--   key (pass 1) holds no wallet lock yet, so batches cannot deadlock each other (a review found
--   that claiming keys in wallet order could). Proven by tests/integration/test_group_commit.py.
-- * A key recorded before replays its stored outcome; a key repeated within the batch gets the
--   outcome of its first occurrence, marked replayed (or idempotency_key_reused if its request
--   differs). Unknown assets and wallets are refused without writing anything, so the key stays
--   free; streams are never removed, so such a check stays true until commit.
-- * insufficient_funds and version_mismatch are decisions on the ledger's state: recorded and
--   replayed like a success. A user's balance never goes below zero.
-- * Only the user's wallet row is locked: the system legs (treasury, bonus, revenue) ride in the
--   user's event and are totalled by the projections; system accounts have no floor, so no command
--   ever queues on a hot system row.
-- * Any unexpected error aborts the whole batch (nothing is applied); the caller then retries its
--   commands one by one.
-- tests/integration/test_model_based.py drives this function with concurrent batches against a
-- model of these rules (tests/model.py).

DROP TYPE IF EXISTS tally_transaction_command;
CREATE TYPE tally_transaction_command AS (
    key              text,
    fingerprint      bytea,
    context          jsonb,
    kind             text,
    user_id          text,
    asset            text,
    amount           bigint,
    reference        text,
    metadata         jsonb,
    expected_version bigint
);

CREATE OR REPLACE FUNCTION tally_post_transactions(p_commands jsonb)
RETURNS TABLE (idx int, outcome text, body text, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    c tally_transaction_command[] := ARRAY(
        SELECT jsonb_populate_record(NULL::tally_transaction_command, (a.e - 'command') || (a.e -> 'command'))
          FROM jsonb_array_elements(p_commands) WITH ORDINALITY AS a(e, i)
         ORDER BY a.i);
    n int := cardinality(c);
    o_outcome text[] := array_fill(NULL::text, ARRAY[n]);
    o_body text[] := array_fill(NULL::text, ARRAY[n]);
    o_replayed boolean[] := array_fill(false, ARRAY[n]);
    o_first int[] := array_fill(NULL::int, ARRAY[n]);  -- a repeated key: its first occurrence
    claimed int[] := '{}';                              -- the commands whose keys this call claimed
    v_last_key text;                                    -- pass 1 goes in key-hash order: a repeated
    v_last_claim int;                                   -- key follows its first occurrence directly
    i int;
    v_prior commands;
    v_replay record;
    v_stream streams;
    v_stream_id text;
    v_flow record;
    v_now timestamptz := now();
    v_balance numeric;
    v_after numeric;
    v_data jsonb;
    v_event record;
    v_event_id uuid;
    v_body jsonb;
BEGIN
    -- Pass 1, in key-hash order: the key's lock, replays, unrecorded rejections, the claims.
    FOR i IN SELECT s FROM generate_subscripts(c, 1) AS s
              ORDER BY tally_command_key_hash(c[s].key), c[s].key COLLATE "C", s
    LOOP
        IF c[i].key = v_last_key AND v_last_claim IS NOT NULL THEN
            o_first[i] := v_last_claim;
            CONTINUE;
        END IF;
        v_last_key := c[i].key;
        v_last_claim := NULL;
        PERFORM tally_lock_command_key(c[i].key);
        SELECT * INTO v_prior FROM commands WHERE command_id = c[i].key;
        IF FOUND THEN
            v_replay := tally_replay(v_prior, c[i].fingerprint);
            o_outcome[i] := v_replay.outcome;
            o_body[i] := v_replay.body;
            o_replayed[i] := v_replay.replayed;
            CONTINUE;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'asset:' || c[i].asset) THEN
            o_outcome[i] := 'asset_not_found';
            o_body[i] := tally_rejection('asset_not_found', format('asset %s is not defined', c[i].asset))::text;
            CONTINUE;
        END IF;
        IF NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'wallet:' || c[i].user_id) THEN
            o_outcome[i] := 'wallet_not_found';
            o_body[i] := tally_rejection('wallet_not_found', format('no wallet for user %s', c[i].user_id))::text;
            CONTINUE;
        END IF;
        claimed := claimed || i;
        v_last_claim := i;
    END LOOP;

    -- Pass 2, in wallet order: lock, decide, append, record, for every key claimed in pass 1.
    FOR i IN SELECT x FROM unnest(claimed) AS x ORDER BY c[x].user_id COLLATE "C", x
    LOOP
        v_stream_id := 'wallet:' || c[i].user_id;
        SELECT * INTO STRICT v_stream FROM streams WHERE stream_id = v_stream_id FOR UPDATE;
        v_event_id := NULL;
        SELECT * INTO v_flow FROM tally_flow_legs(c[i].kind, c[i].user_id, c[i].amount);
        IF v_flow.event_type IS NULL THEN
            RAISE EXCEPTION 'command % asks for a transaction of unknown kind %', c[i].key, c[i].kind
                USING ERRCODE = 'data_exception';
        END IF;
        v_balance := coalesce((v_stream.state -> 'balances' ->> c[i].asset)::numeric, 0);
        v_after := v_balance + v_flow.user_delta;
        IF c[i].expected_version IS NOT NULL AND v_stream.version <> c[i].expected_version THEN
            o_outcome[i] := 'version_mismatch';
            v_body := tally_rejection('version_mismatch',
                format('wallet %s is at version %s, not %s', c[i].user_id, v_stream.version,
                       c[i].expected_version),
                jsonb_build_object('current_version', v_stream.version));
        ELSIF v_after < 0 THEN
            o_outcome[i] := 'insufficient_funds';
            v_body := tally_rejection('insufficient_funds',
                format('wallet %s holds %s %s, less than the %s requested', c[i].user_id, v_balance,
                       c[i].asset, c[i].amount),
                jsonb_build_object('balance', v_balance, 'amount', c[i].amount));
        ELSE
            o_outcome[i] := 'accepted';
            v_event_id := gen_random_uuid();
            v_data := jsonb_build_object(
                'transaction_id', v_event_id, 'kind', c[i].kind, 'user_id', c[i].user_id,
                'asset', c[i].asset, 'amount', c[i].amount, 'entries', v_flow.legs,
                'reference', c[i].reference, 'metadata', coalesce(c[i].metadata, '{}'),
                'balance_after', v_after);
            v_event := tally_append_event(v_stream_id, v_stream.version + 1, v_stream.last_hash, v_event_id,
                                          v_flow.event_type, v_data,
                                          c[i].context || jsonb_build_object('command_id', c[i].key), v_now);
            UPDATE streams
               SET version = v_stream.version + 1,
                   state = jsonb_set(v_stream.state, ARRAY['balances', c[i].asset], to_jsonb(v_after)),
                   last_hash = v_event.o_hash,
                   updated_at = v_now
             WHERE stream_id = v_stream_id;
            v_body := v_data || jsonb_build_object('wallet_version', v_stream.version + 1,
                                                   'created_at', tally_timestamp_text(v_now),
                                                   'consistency_token', v_event.o_token);
        END IF;
        PERFORM tally_record_command(c[i].key, c[i].fingerprint,
                                     c[i].context || jsonb_build_object('command_id', c[i].key),
                                     o_outcome[i], v_body, v_stream_id, v_event_id);
        o_body[i] := v_body::text;
    END LOOP;

    FOR i IN 1 .. n LOOP
        idx := i;
        IF o_first[i] IS NULL THEN
            outcome := o_outcome[i];
            body := o_body[i];
            replayed := o_replayed[i];
        ELSIF c[i].fingerprint = c[o_first[i]].fingerprint THEN
            outcome := o_outcome[o_first[i]];
            body := o_body[o_first[i]];
            replayed := true;
        ELSE
            outcome := 'idempotency_key_reused';
            body := tally_rejection('idempotency_key_reused',
                                    'this Idempotency-Key was used for a different request')::text;
            replayed := false;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;
