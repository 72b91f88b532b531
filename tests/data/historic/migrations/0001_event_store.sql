-- Tally event store: streams, append-only events with per-stream hash chains, and the
-- idempotency record of every command. See README "Concurrency and idempotency".

-- One row per stream: a wallet (`wallet:<user_id>`) or an asset definition (`asset:<CODE>`).
-- `state` is the snapshot the write side decides on (a wallet's balances per asset), so a command
-- never replays a stream. `last_hash` is the head of the stream's hash chain.
CREATE TABLE streams (
    stream_id   text PRIMARY KEY,
    stream_type text NOT NULL CHECK (stream_type IN ('asset', 'wallet')),
    version     bigint NOT NULL CHECK (version >= 1),
    state       jsonb NOT NULL,
    last_hash   bytea NOT NULL CHECK (length(last_hash) = 32),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- The immutable history. `transaction_id` is the writing transaction's id: projectors read only
-- transactions that have finished, in (transaction_id, global_position) order, because
-- global_position is drawn at insert time, not commit time (see projections/projector.py).
CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id       text NOT NULL,
    stream_version  bigint NOT NULL CHECK (stream_version >= 1),
    event_id        uuid NOT NULL UNIQUE,
    event_type      text NOT NULL,
    data            jsonb NOT NULL,
    metadata        jsonb NOT NULL,
    hash            bytea NOT NULL CHECK (length(hash) = 32),
    transaction_id  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL,
    -- The last line of defence against two writers appending the same version.
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX events_commit_order ON events (transaction_id, global_position);

-- The idempotency record: one row per Idempotency-Key, inserted first in the command's own
-- transaction (a concurrent duplicate blocks on the primary key until the first commits), and
-- holding the decided outcome that every retry replays. Kept permanently.
CREATE TABLE commands (
    command_id  text PRIMARY KEY,
    fingerprint bytea NOT NULL,
    status      smallint,
    response    jsonb,
    stream_id   text,
    event_id    uuid,
    metadata    jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE FUNCTION tally_reject_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'table % is append-only: % is not allowed', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'restrict_violation';
END $$;

CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON events
    FOR EACH ROW EXECUTE FUNCTION tally_reject_change();
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON events
    FOR EACH STATEMENT EXECUTE FUNCTION tally_reject_change();
CREATE TRIGGER commands_no_delete BEFORE DELETE ON commands
    FOR EACH ROW EXECUTE FUNCTION tally_reject_change();
CREATE TRIGGER commands_no_truncate BEFORE TRUNCATE ON commands
    FOR EACH STATEMENT EXECUTE FUNCTION tally_reject_change();

-- A command's outcome is written once: an in-flight row (status NULL) gets its outcome, and a
-- decided outcome never changes.
CREATE FUNCTION tally_command_outcome_once() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status IS NOT NULL OR NEW.command_id <> OLD.command_id
       OR NEW.fingerprint <> OLD.fingerprint THEN
        RAISE EXCEPTION 'command % already has its outcome', OLD.command_id
            USING ERRCODE = 'restrict_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER commands_outcome_once BEFORE UPDATE ON commands
    FOR EACH ROW EXECUTE FUNCTION tally_command_outcome_once();

-- The canonical bytes of an event, hashed into its stream's chain. jsonb renders a given value
-- to one text, so the verifier can recompute this from the stored row alone.
CREATE FUNCTION tally_event_bytes(
    p_stream_id text, p_stream_version bigint, p_event_id uuid, p_event_type text,
    p_data jsonb, p_metadata jsonb, p_recorded_at timestamptz
) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT convert_to(jsonb_build_object(
        'stream_id', p_stream_id,
        'stream_version', p_stream_version,
        'event_id', p_event_id,
        'event_type', p_event_type,
        'data', p_data,
        'metadata', p_metadata,
        'recorded_at_us', (extract(epoch FROM p_recorded_at) * 1000000)::bigint
    )::text, 'UTF8')
$$;

CREATE FUNCTION tally_genesis_hash() RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT decode(repeat('00', 32), 'hex')
$$;

CREATE FUNCTION tally_timestamp_text(p_at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;

-- Step 1 of every command: claim the Idempotency-Key. Returns the earlier command row when the key
-- was used before (its outcome is replayed), or NULL when this call now owns the key. A concurrent
-- duplicate blocks on the primary key inside INSERT until the owner commits or rolls back; under
-- READ COMMITTED the following SELECT then sees the committed row.
-- Covered by tests/integration/test_idempotency.py::test_concurrent_duplicates_have_one_effect.
CREATE FUNCTION tally_claim_command(p_command_id text, p_fingerprint bytea, p_metadata jsonb)
RETURNS commands LANGUAGE plpgsql AS $$
DECLARE
    v_prior commands;
BEGIN
    INSERT INTO commands (command_id, fingerprint, metadata)
    VALUES (p_command_id, p_fingerprint, p_metadata)
    ON CONFLICT (command_id) DO NOTHING;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    SELECT * INTO STRICT v_prior FROM commands WHERE command_id = p_command_id;
    IF v_prior.fingerprint <> p_fingerprint THEN
        RAISE EXCEPTION 'idempotency_key_reused'
            USING DETAIL = 'this Idempotency-Key was used for a different request';
    END IF;
    RETURN v_prior;
END $$;

CREATE FUNCTION tally_record_outcome(
    p_command_id text, p_status int, p_response jsonb, p_stream_id text, p_event_id uuid
) RETURNS void LANGUAGE sql AS $$
    UPDATE commands
       SET status = p_status, response = p_response, stream_id = p_stream_id, event_id = p_event_id
     WHERE command_id = p_command_id
$$;

-- Appends one event to a stream whose row the caller has locked or just created, chaining its
-- hash. Returns the consistency token "<transaction id>.<global position>" of the event.
CREATE FUNCTION tally_append_event(
    p_stream_id text, p_version bigint, p_prev_hash bytea, p_event_id uuid, p_event_type text,
    p_data jsonb, p_metadata jsonb, p_now timestamptz, OUT o_hash bytea, OUT o_token text
) LANGUAGE plpgsql AS $$
DECLARE
    v_position bigint;
    v_xid xid8;
BEGIN
    o_hash := sha256(p_prev_hash || tally_event_bytes(
        p_stream_id, p_version, p_event_id, p_event_type, p_data, p_metadata, p_now));
    INSERT INTO events (stream_id, stream_version, event_id, event_type, data, metadata, hash,
                        recorded_at)
    VALUES (p_stream_id, p_version, p_event_id, p_event_type, p_data, p_metadata, o_hash, p_now)
    RETURNING global_position, transaction_id INTO v_position, v_xid;
    o_token := v_xid::text || '.' || v_position::text;
END $$;

-- DefineAsset: creates the stream `asset:<code>`. Decided rejection: asset_exists (recorded).
CREATE FUNCTION tally_define_asset(
    p_command_id text, p_fingerprint bytea, p_metadata jsonb, p_event_id uuid,
    p_code text, p_name text, p_decimals int
) RETURNS TABLE (status int, body text, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    v_prior commands;
    v_stream text := 'asset:' || p_code;
    v_now timestamptz := now();
    v_data jsonb := jsonb_build_object('code', p_code, 'name', p_name, 'decimals', p_decimals);
    v_event record;
    v_body jsonb;
BEGIN
    v_prior := tally_claim_command(p_command_id, p_fingerprint, p_metadata);
    IF v_prior.command_id IS NOT NULL THEN
        RETURN QUERY SELECT v_prior.status::int, v_prior.response::text, true;
        RETURN;
    END IF;
    INSERT INTO streams (stream_id, stream_type, version, state, last_hash, created_at, updated_at)
    VALUES (v_stream, 'asset', 1, v_data, tally_genesis_hash(), v_now, v_now)
    ON CONFLICT (stream_id) DO NOTHING;
    IF NOT FOUND THEN
        v_body := jsonb_build_object('code', 'asset_exists',
                                     'detail', format('asset %s is already defined', p_code));
        PERFORM tally_record_outcome(p_command_id, 409, v_body, v_stream, NULL);
        RETURN QUERY SELECT 409, v_body::text, false;
        RETURN;
    END IF;
    v_event := tally_append_event(v_stream, 1, tally_genesis_hash(), p_event_id, 'AssetDefined',
                                  v_data, p_metadata, v_now);
    UPDATE streams SET last_hash = v_event.o_hash WHERE stream_id = v_stream;
    v_body := v_data || jsonb_build_object('created_at', tally_timestamp_text(v_now),
                                           'consistency_token', v_event.o_token);
    PERFORM tally_record_outcome(p_command_id, 201, v_body, v_stream, p_event_id);
    RETURN QUERY SELECT 201, v_body::text, false;
END $$;

-- OpenWallet: creates the stream `wallet:<user_id>`. Decided rejection: wallet_exists (recorded).
CREATE FUNCTION tally_open_wallet(
    p_command_id text, p_fingerprint bytea, p_metadata jsonb, p_event_id uuid,
    p_user_id text, p_wallet_metadata jsonb
) RETURNS TABLE (status int, body text, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    v_prior commands;
    v_stream text := 'wallet:' || p_user_id;
    v_now timestamptz := now();
    v_data jsonb := jsonb_build_object('user_id', p_user_id, 'metadata', p_wallet_metadata);
    v_event record;
    v_body jsonb;
BEGIN
    v_prior := tally_claim_command(p_command_id, p_fingerprint, p_metadata);
    IF v_prior.command_id IS NOT NULL THEN
        RETURN QUERY SELECT v_prior.status::int, v_prior.response::text, true;
        RETURN;
    END IF;
    INSERT INTO streams (stream_id, stream_type, version, state, last_hash, created_at, updated_at)
    VALUES (v_stream, 'wallet', 1, '{"balances": {}}', tally_genesis_hash(), v_now, v_now)
    ON CONFLICT (stream_id) DO NOTHING;
    IF NOT FOUND THEN
        v_body := jsonb_build_object('code', 'wallet_exists',
                                     'detail', format('a wallet for user %s already exists', p_user_id));
        PERFORM tally_record_outcome(p_command_id, 409, v_body, v_stream, NULL);
        RETURN QUERY SELECT 409, v_body::text, false;
        RETURN;
    END IF;
    v_event := tally_append_event(v_stream, 1, tally_genesis_hash(), p_event_id, 'WalletOpened',
                                  v_data, p_metadata, v_now);
    UPDATE streams SET last_hash = v_event.o_hash WHERE stream_id = v_stream;
    v_body := v_data || jsonb_build_object('version', 1, 'balances', '[]'::jsonb,
                                           'created_at', tally_timestamp_text(v_now),
                                           'consistency_token', v_event.o_token);
    PERFORM tally_record_outcome(p_command_id, 201, v_body, v_stream, p_event_id);
    RETURN QUERY SELECT 201, v_body::text, false;
END $$;

-- TopUpCredits, GrantBonus and SpendCredits: one balanced transaction recorded as one event on the
-- user's wallet stream. The legs (p_entries) come from domain.plan_transaction; this function
-- enforces, under the wallet's row lock, what depends on the wallet's current state: the
-- expected version (If-Match) and the floor (a user balance never goes below zero), the same
-- rules as domain.decide (tests/integration/test_decide_agreement.py checks they agree).
--
-- Only the user's wallet row is locked. The system legs (treasury, bonus, revenue) ride in the
-- same event and are totalled by the projections: system accounts have no floor, so nothing
-- needs to be decided on them, and no command ever queues on a hot system row.
--
-- Rejections: wallet_not_found and asset_not_found raise (the transaction rolls back, the key is
-- not recorded, a retry may succeed later); insufficient_funds and version_mismatch are decisions
-- on the ledger's state and are recorded and replayed like a success.
CREATE FUNCTION tally_post_transaction(
    p_command_id text, p_fingerprint bytea, p_metadata jsonb, p_event_id uuid, p_event_type text,
    p_kind text, p_user_id text, p_asset text, p_amount bigint, p_user_delta bigint,
    p_entries jsonb, p_reference text, p_tx_metadata jsonb, p_expected_version bigint
) RETURNS TABLE (status int, body text, replayed boolean) LANGUAGE plpgsql AS $$
DECLARE
    v_prior commands;
    v_stream streams;
    v_stream_id text := 'wallet:' || p_user_id;
    v_now timestamptz := now();
    v_balance numeric;
    v_after numeric;
    v_data jsonb;
    v_event record;
    v_body jsonb;
BEGIN
    v_prior := tally_claim_command(p_command_id, p_fingerprint, p_metadata);
    IF v_prior.command_id IS NOT NULL THEN
        RETURN QUERY SELECT v_prior.status::int, v_prior.response::text, true;
        RETURN;
    END IF;
    -- Asset streams are never removed, so their existence needs no lock.
    PERFORM 1 FROM streams WHERE stream_id = 'asset:' || p_asset;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'asset_not_found' USING DETAIL = format('asset %s is not defined', p_asset);
    END IF;
    SELECT * INTO v_stream FROM streams WHERE stream_id = v_stream_id FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'wallet_not_found'
            USING DETAIL = format('no wallet for user %s', p_user_id);
    END IF;
    IF p_expected_version IS NOT NULL AND v_stream.version <> p_expected_version THEN
        v_body := jsonb_build_object(
            'code', 'version_mismatch',
            'detail', format('wallet %s is at version %s, not %s',
                             p_user_id, v_stream.version, p_expected_version),
            'current_version', v_stream.version);
        PERFORM tally_record_outcome(p_command_id, 412, v_body, v_stream_id, NULL);
        RETURN QUERY SELECT 412, v_body::text, false;
        RETURN;
    END IF;
    v_balance := coalesce((v_stream.state -> 'balances' ->> p_asset)::numeric, 0);
    v_after := v_balance + p_user_delta;
    IF v_after < 0 THEN
        v_body := jsonb_build_object(
            'code', 'insufficient_funds',
            'detail', format('wallet %s holds %s %s, less than the %s requested',
                             p_user_id, v_balance, p_asset, p_amount),
            'balance', v_balance, 'amount', p_amount);
        PERFORM tally_record_outcome(p_command_id, 409, v_body, v_stream_id, NULL);
        RETURN QUERY SELECT 409, v_body::text, false;
        RETURN;
    END IF;
    v_data := jsonb_build_object(
        'transaction_id', p_event_id, 'kind', p_kind, 'user_id', p_user_id, 'asset', p_asset,
        'amount', p_amount, 'entries', p_entries, 'reference', p_reference,
        'metadata', p_tx_metadata, 'balance_after', v_after);
    v_event := tally_append_event(v_stream_id, v_stream.version + 1, v_stream.last_hash, p_event_id,
                                  p_event_type, v_data, p_metadata, v_now);
    UPDATE streams
       SET version = v_stream.version + 1,
           state = jsonb_set(v_stream.state, ARRAY['balances', p_asset], to_jsonb(v_after)),
           last_hash = v_event.o_hash,
           updated_at = v_now
     WHERE stream_id = v_stream_id;
    v_body := v_data || jsonb_build_object('wallet_version', v_stream.version + 1,
                                           'created_at', tally_timestamp_text(v_now),
                                           'consistency_token', v_event.o_token);
    PERFORM tally_record_outcome(p_command_id, 201, v_body, v_stream_id, p_event_id);
    RETURN QUERY SELECT 201, v_body::text, false;
END $$;
