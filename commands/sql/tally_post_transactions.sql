-- TopUpCredits, GrantBonus and SpendCredits, group-committed: every command of the batch is decided
-- under its wallet's row lock, in one call and one database transaction (one commit for all).
--
-- Measured (bench/): a commit per command costs most of PostgreSQL's CPU per spend, and on a hot
-- wallet the row lock is held through each commit's WAL flush; the API therefore sends the commands
-- that arrive while others are in flight together (commands/event_store.py).
--
-- `p_commands` is a JSON array of commands.event_store.CommandRecord:
-- {key, client, fingerprint, legacy_fingerprint, context, command: {kind, user_id, asset, amount,
-- reference, metadata, expected_version}}, read by field name (tally_transaction_commands below: adding a field touches
-- its column list and the Python that fills it). Python sends only what the caller asked: the legs
-- come from the kind's row in the flows table (tally_legs).
--
-- Returns one row per command, in request order: the domain outcome (`accepted`,
-- `insufficient_funds`, `version_mismatch`, `wallet_not_found`, `asset_not_found`,
-- `idempotency_key_reused`, or `wallet_locked`: not decided, retry), the response body, and whether
-- it was replayed.
--
-- Rules that keep a batch safe:
-- * Two passes. Pass 1, in ascending order of the keys' locks (tally_key_lock, then client and
--   key), claims every key (tally_claim_command), answers replays and the refusals that are not
--   recorded; pass 2, in ascending wallet order (request order within one wallet), locks each
--   wallet row once, decides each of its commands, and gathers their events, the wallet's new
--   snapshot and the commands' rows, written by one statement per table at the end (each
--   command's row once, whole). No batch can deadlock another: pass 2 never waits for a wallet
--   (SKIP LOCKED, below); a batch waits only for keys, in ascending lock order, or, given
--   p_lock_wait_ms, for its wallets, locked first in one order, before any key. (A review found
--   that claiming keys in wallet order could deadlock.) Proven by
--   tests/integration/test_group_commit.py and tests/integration/test_batches.py.
-- * The amount must be 1 to 10^15 (domain/values.py, MAX_AMOUNT) and every field the caller must
--   give must be there: the HTTP API refuses anything else first, so a command that gets here
--   without them is a programming error, and the whole batch is refused.
-- * A key recorded before replays its stored outcome; a key repeated within the batch gets the
--   outcome of its first claimed occurrence, marked replayed (or idempotency_key_reused if its
--   request differs). Unknown assets and wallets are refused without a record, so the key stays
--   free for a later, valid request; but the refused command claims its key like any other and
--   holds the claim until commit, so no other transaction uses the key meanwhile, and concurrent
--   batches have one serial order (found by tests/integration/test_model_based.py, which stages concurrent
--   batches). The existence checks read what is committed, unlocked: a wallet opened while a batch
--   runs may be seen or not. Streams are never removed, so a wallet seen stays there until commit.
-- * insufficient_funds and version_mismatch are decisions on the ledger's state: recorded and
--   replayed like a success. A user's balance never goes below zero, and a spend never takes what
--   the wallet's active holds reserve (tally_held): available = balance - held stays >= 0.
-- * Only the user's wallet row is locked: the system legs (treasury, bonus, revenue) ride in the
--   user's event and are totalled by the projections; system accounts have no floor, so no command
--   ever queues on a hot system row.
-- * It runs as its owner (SECURITY DEFINER, search path pinned): the application role may call it,
--   and cannot write streams, events or commands itself (api/migrate.py).
-- * Any unexpected error aborts the whole batch (nothing is applied); the caller then answers its
--   commands 503 when the error says the database was away or slow, and otherwise the group commit
--   retries them one by one, while POST /v1/batches answers 500 (it validated every command
--   first: a bug), commands/event_store.py.
-- tests/integration/test_model_based.py drives this function with concurrent batches against a
-- model of these rules (tests/model.py).

-- The batch's commands, read from the JSON by field name, numbered in request order. Its column
-- list is the command record's shape: CREATE OR REPLACE cannot change a function's result columns,
-- so this definition is dropped and made again (nothing in the catalog depends on it).
DROP FUNCTION IF EXISTS tally_transaction_commands(jsonb);
CREATE FUNCTION tally_transaction_commands(p_commands jsonb)
RETURNS TABLE (i int, key text, client uuid, fingerprint bytea, legacy_fingerprint bytea, context jsonb,
               kind text, user_id text, asset text, amount bigint, reference text, metadata jsonb,
               expected_version bigint)
LANGUAGE sql STABLE AS $$
    SELECT a.i::int, x.key, x.client, x.fingerprint, x.legacy_fingerprint,
           x.context || jsonb_build_object('command_id', x.key, 'client_id', x.client), x.kind,
           x.user_id, x.asset, x.amount, x.reference, coalesce(x.metadata, '{}'), x.expected_version
      FROM jsonb_array_elements(p_commands) WITH ORDINALITY AS a(e, i),
           jsonb_to_record((a.e - 'command') || (a.e -> 'command')) AS x(
               key text, client uuid, fingerprint bytea, legacy_fingerprint bytea, context jsonb, kind text,
               user_id text, asset text, amount bigint, reference text, metadata jsonb, expected_version bigint)
$$;

-- (The one-argument form of earlier releases is dropped: a release that calls it must be stopped
-- before this one's migration, README "Upgrading".)
DROP FUNCTION IF EXISTS tally_post_transactions(jsonb);
DROP FUNCTION IF EXISTS tally_post_transactions(jsonb, int);
CREATE FUNCTION tally_post_transactions(p_commands jsonb, p_lock_wait_ms int)
RETURNS TABLE (idx int, outcome text, body text, replayed boolean) LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT AS $$
DECLARE
    n int := jsonb_array_length(p_commands);
    o_outcome text[] := array_fill(NULL::text, ARRAY[n]);
    o_body text[] := array_fill(NULL::text, ARRAY[n]);
    o_replayed boolean[] := array_fill(false, ARRAY[n]);
    o_first int[] := array_fill(NULL::int, ARRAY[n]);  -- a repeated key: its first occurrence
    o_fingerprint bytea[] := array_fill(NULL::bytea, ARRAY[n]);
    claimed int[] := '{}';                              -- the commands whose keys this call claimed
    v_last_client uuid;                                 -- pass 1 goes in key-lock order: a repeated
    v_last_key text;                                    -- key follows its first occurrence directly
    v_last_claim int;
    r record;
    v_prior commands;
    v_replay record;
    v_refusal jsonb;
    v_stream streams;                                   -- pass 2: the wallet's row, as changed so far
    v_user text;                                        -- its user, locked by this call when v_locked
    v_locked boolean;
    v_now timestamptz;
    v_writer xid8;                                      -- this transaction's, once it appends
    v_event_writer xid8;                                -- an event's: never below its wallet's last
    v_sequence regclass;
    v_position bigint;
    v_balance numeric;
    v_held numeric;
    v_after numeric;
    v_data jsonb;
    v_event_id uuid;
    v_body jsonb;
    -- What pass 2 writes, gathered: events (e_), wallets' snapshots (s_), commands' rows (c_).
    e_n int := 0;
    e_position bigint[] := '{}';
    e_stream text[] := '{}';
    e_version bigint[] := '{}';
    e_id uuid[] := '{}';
    e_type text[] := '{}';
    e_data jsonb[] := '{}';
    e_metadata jsonb[] := '{}';
    e_hash bytea[] := '{}';
    e_at timestamptz[] := '{}';
    e_writer xid8[] := '{}';
    s_n int := 0;
    s_id text[] := '{}';
    s_version bigint[] := '{}';
    s_state jsonb[] := '{}';
    s_hash bytea[] := '{}';
    s_at timestamptz[] := '{}';
    s_writer xid8[] := '{}';
    c_n int := 0;
    c_client uuid[] := '{}';
    c_key text[] := '{}';
    c_fingerprint bytea[] := '{}';
    c_metadata jsonb[] := '{}';
    c_outcome text[] := '{}';
    c_response jsonb[] := '{}';
    c_stream text[] := '{}';
    c_event uuid[] := '{}';
BEGIN
    -- A batch that may wait for its wallets (the commands of one wallet another session held,
    -- retried) locks them first, before it claims any key, for at most p_lock_wait_ms: a retry of
    -- one of its keys elsewhere then waits only while this batch runs, never while it waits.
    IF p_lock_wait_ms IS NOT NULL THEN
        PERFORM set_config('lock_timeout', p_lock_wait_ms::text || 'ms', true);
        PERFORM 1 FROM streams
         WHERE stream_id IN (SELECT 'wallet:' || c.user_id FROM tally_transaction_commands(p_commands) c)
         ORDER BY stream_id COLLATE "C" FOR UPDATE;
    END IF;

    -- Pass 1, in key-lock order: replays, and the claim of every other key; refusals of unknown
    -- assets and wallets claim their key too (and write nothing: it is free again at commit).
    FOR r IN SELECT * FROM tally_transaction_commands(p_commands) c
              ORDER BY tally_key_lock(c.client, c.key), c.client, c.key COLLATE "C", c.i
    LOOP
        IF r.key IS NULL OR r.client IS NULL OR r.fingerprint IS NULL OR r.kind IS NULL OR r.user_id IS NULL
           OR r.asset IS NULL OR r.amount IS NULL OR r.amount NOT BETWEEN 1 AND 1000000000000000 THEN
            RAISE EXCEPTION 'command % of the batch is not a valid transaction command', r.i
                USING ERRCODE = 'data_exception';
        END IF;
        o_fingerprint[r.i] := r.fingerprint;
        IF (r.client, r.key) IS DISTINCT FROM (v_last_client, v_last_key) THEN
            v_last_client := r.client;
            v_last_key := r.key;
            v_last_claim := NULL;
            v_prior := tally_claim_command(r.client, r.key);
            IF v_prior.command_id IS NOT NULL THEN  -- recorded before, or by a duplicate that just committed
                v_replay := tally_replay(v_prior, r.client, r.fingerprint, r.legacy_fingerprint);
                o_outcome[r.i] := v_replay.outcome;
                o_body[r.i] := v_replay.body;
                o_replayed[r.i] := v_replay.replayed;
                CONTINUE;
            END IF;
        ELSIF v_last_claim IS NOT NULL THEN  -- a repeat of the claimed key: decided with its first
            o_first[r.i] := v_last_claim;
            CONTINUE;
        ELSIF v_prior.command_id IS NOT NULL THEN  -- a repeat of a recorded key: replays it too
            v_replay := tally_replay(v_prior, r.client, r.fingerprint, r.legacy_fingerprint);
            o_outcome[r.i] := v_replay.outcome;
            o_body[r.i] := v_replay.body;
            o_replayed[r.i] := v_replay.replayed;
            CONTINUE;
        END IF;
        -- This call holds the key: this command claims it, or is refused without a record.
        v_refusal := CASE
            WHEN NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'asset:' || r.asset) THEN
                tally_rejection('asset_not_found', format('asset %s is not defined', r.asset))
            WHEN NOT EXISTS (SELECT 1 FROM streams WHERE stream_id = 'wallet:' || r.user_id) THEN
                tally_rejection('wallet_not_found', format('no wallet for user %s', r.user_id))
        END;
        IF v_refusal IS NOT NULL THEN  -- nothing is written for it: the key stays free
            o_outcome[r.i] := v_refusal ->> 'code';
            o_body[r.i] := v_refusal::text;
            CONTINUE;
        END IF;
        -- (An earlier occurrence of the key, refused, recorded nothing: the key is this command's,
        -- and its outcome is recorded under its own request; the model-based test found a release
        -- that recorded it under the refused request's fingerprint.)
        claimed := claimed || r.i;
        v_last_claim := r.i;
    END LOOP;

    -- Pass 2, in wallet order: lock, decide, append, record, for every key claimed in pass 1. Each
    -- wallet's row is locked once, for all its commands; its events, its new snapshot and the
    -- commands' rows are gathered, and written by one statement each after the loop. (Measured,
    -- issue 11: one INSERT per event and per command, and one UPDATE per command, took half of
    -- PostgreSQL's time per spend in batches of 1,000; one statement per table costs a fraction.)
    v_sequence := pg_get_serial_sequence('events', 'global_position')::regclass;
    FOR r IN SELECT c.*, f AS flow FROM tally_transaction_commands(p_commands) c
                                  LEFT JOIN flows f ON f.kind = c.kind
              WHERE c.i = ANY (claimed) ORDER BY c.user_id COLLATE "C", c.i
    LOOP
        IF r.flow IS NULL THEN
            RAISE EXCEPTION 'command % asks for a transaction of unknown kind %', r.key, r.kind
                USING ERRCODE = 'data_exception';
        END IF;
        IF r.user_id IS DISTINCT FROM v_user THEN  -- the next wallet
            v_user := r.user_id;
            -- A batch never waits for a wallet another transaction holds (an operator's session,
            -- a batch of another API process): it would hold up every other command in it. The
            -- wallet's commands are refused as `wallet_locked` (nothing recorded: their keys are
            -- free at commit), all of them, so that they are decided later in request order (a
            -- batch's top-up, then the spend it pays for), and the API sends them again, waiting
            -- for that wallet with a bound (p_lock_wait_ms, above). Proven by
            -- tests/integration/test_faults.py (a wallet row locked by another session).
            SELECT * INTO v_stream FROM streams WHERE stream_id = 'wallet:' || r.user_id FOR UPDATE SKIP LOCKED;
            v_locked := FOUND;  -- else the wallet exists (pass 1) and streams are never removed: held
        END IF;
        IF NOT v_locked THEN
            o_outcome[r.i] := 'wallet_locked';
            o_body[r.i] := tally_rejection('wallet_locked',
                format('wallet %s is locked by another transaction', r.user_id))::text;
            CONTINUE;
        END IF;
        -- Recorded after the wallet's lock, and never before the wallet's previous event: every
        -- "as of a time" cut of one wallet is a state it was in (projections/as_of.py).
        v_now := greatest(clock_timestamp(), v_stream.updated_at);
        v_event_id := NULL;
        v_balance := coalesce((v_stream.state -> 'balances' ->> r.asset)::numeric, 0);
        v_after := v_balance + (r.flow).user_sign * r.amount;
        -- What the wallet's active holds reserve is not available to a flow that takes credits. (The
        -- key test first, here: a call of tally_held costs a query even for a wallet without holds,
        -- measured at 10-13% of the raw-SQL spend rate.)
        v_held := CASE WHEN (r.flow).user_sign < 0 AND v_stream.state ? 'holds'
                       THEN tally_held(v_stream.state, r.asset, v_now) ELSE 0 END;
        IF r.expected_version IS NOT NULL AND v_stream.version <> r.expected_version THEN
            o_outcome[r.i] := 'version_mismatch';
            v_body := tally_rejection('version_mismatch',
                format('wallet %s is at version %s, not %s', r.user_id, v_stream.version, r.expected_version),
                jsonb_build_object('current_version', v_stream.version));
        ELSIF v_after - v_held < 0 THEN
            o_outcome[r.i] := 'insufficient_funds';
            v_body := tally_rejection('insufficient_funds',
                CASE WHEN v_held = 0
                     THEN format('wallet %s holds %s %s, less than the %s requested', r.user_id, v_balance,
                                 r.asset, r.amount)
                     ELSE format('wallet %s has %s %s available (%s held), less than the %s requested',
                                 r.user_id, v_balance - v_held, r.asset, v_held, r.amount) END,
                jsonb_build_object('balance', v_balance, 'held', v_held, 'available', v_balance - v_held,
                                   'amount', r.amount));
        ELSE
            o_outcome[r.i] := 'accepted';
            v_event_id := gen_random_uuid();
            v_data := jsonb_build_object(
                'transaction_id', v_event_id, 'kind', r.kind, 'user_id', r.user_id, 'asset', r.asset,
                'amount', r.amount, 'entries', tally_legs(r.flow, r.user_id, r.amount), 'reference', r.reference,
                'metadata', r.metadata, 'balance_after', v_after);
            v_writer := coalesce(v_writer, tally_writer_xid());
            -- After the wallet's newest event in the commit order, whichever transaction wrote it
            -- (commands/sql/tally_writer_xid.sql, tally_stream_writer_xid).
            v_event_writer := greatest(v_writer, v_stream.last_writer_xid);
            v_stream.last_writer_xid := v_event_writer;
            -- The event as tally_append_event would write it: its position taken now, so that its
            -- consistency token can be answered before the one INSERT below.
            v_position := nextval(v_sequence);
            v_stream.version := v_stream.version + 1;
            v_stream.last_hash := sha256(v_stream.last_hash || tally_event_bytes(
                v_stream.stream_id, v_stream.version, v_event_id, (r.flow).event_type, v_data, r.context, v_now));
            v_stream.state := jsonb_set(v_stream.state, ARRAY['balances', r.asset], to_jsonb(v_after));
            v_stream.updated_at := v_now;
            -- The wallet's snapshot as of this command (its later commands here overwrite it).
            IF s_n = 0 OR s_id[s_n] <> v_stream.stream_id THEN
                s_n := s_n + 1;
            END IF;
            s_id[s_n] := v_stream.stream_id;
            s_version[s_n] := v_stream.version;
            s_state[s_n] := v_stream.state;
            s_hash[s_n] := v_stream.last_hash;
            s_at[s_n] := v_stream.updated_at;
            s_writer[s_n] := v_event_writer;
            e_n := e_n + 1;
            e_position[e_n] := v_position;
            e_stream[e_n] := v_stream.stream_id;
            e_version[e_n] := v_stream.version;
            e_id[e_n] := v_event_id;
            e_type[e_n] := (r.flow).event_type;
            e_data[e_n] := v_data;
            e_metadata[e_n] := r.context;
            e_hash[e_n] := v_stream.last_hash;
            e_at[e_n] := v_now;
            e_writer[e_n] := v_event_writer;
            v_body := v_data || jsonb_build_object('wallet_version', v_stream.version,
                                                   'created_by', r.context ->> 'created_by',
                                                   'created_at', tally_timestamp_text(v_now),
                                                   'consistency_token', v_event_writer::text || '.' || v_position);
        END IF;
        -- The command's row (tally_record_outcome's), written below with the others.
        c_n := c_n + 1;
        c_client[c_n] := r.client;
        c_key[c_n] := r.key;
        c_fingerprint[c_n] := tally_fingerprint(r.client, r.fingerprint);
        c_metadata[c_n] := r.context;
        c_outcome[c_n] := o_outcome[r.i];
        c_response[c_n] := v_body;
        c_stream[c_n] := v_stream.stream_id;
        c_event[c_n] := v_event_id;
        o_body[r.i] := v_body::text;
    END LOOP;
    IF e_n > 0 THEN
        INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, data, metadata,
                            hash, recorded_at, writer_xid)
        OVERRIDING SYSTEM VALUE
        SELECT * FROM unnest(e_position, e_stream, e_version, e_id, e_type, e_data, e_metadata, e_hash, e_at,
                             e_writer);
        UPDATE streams s
           SET version = u.version, state = u.state, last_hash = u.hash, updated_at = u.at,
               last_writer_xid = u.writer
          FROM unnest(s_id, s_version, s_state, s_hash, s_at, s_writer) AS u(id, version, state, hash, at, writer)
         WHERE s.stream_id = u.id;
    END IF;
    IF c_n > 0 THEN
        INSERT INTO commands (client_id, command_id, fingerprint, metadata, outcome, response, stream_id,
                              event_id)
        SELECT * FROM unnest(c_client, c_key, c_fingerprint, c_metadata, c_outcome, c_response, c_stream,
                             c_event);
    END IF;

    FOR i IN 1 .. n LOOP
        idx := i;
        IF o_first[i] IS NULL THEN
            outcome := o_outcome[i];
            body := o_body[i];
            replayed := o_replayed[i];
        ELSIF o_fingerprint[i] = o_fingerprint[o_first[i]] OR o_outcome[o_first[i]] = 'wallet_locked' THEN
            -- The same request again replays its first occurrence; so does any repeat of a key whose
            -- first occurrence is not decided yet (wallet_locked: both go to the retry together).
            outcome := o_outcome[o_first[i]];
            body := o_body[o_first[i]];
            replayed := true;
        ELSE
            outcome := 'idempotency_key_reused';
            body := tally_key_reused()::text;
            replayed := false;
        END IF;
        RETURN NEXT;
    END LOOP;
END $$;

