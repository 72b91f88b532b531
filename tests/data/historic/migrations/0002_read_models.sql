-- Read models and the projections that maintain them from the events.
--
-- Every projection reads the next batch with tally_next_events: only events whose writing
-- transaction has finished (transaction_id below the xmin of the current snapshot), in
-- (transaction_id, global_position) order, after a two-part checkpoint. Reading by
-- global_position alone would skip, forever, an event whose transaction commits after a
-- later-numbered one was read. Proven by tests/integration/test_projector.py.
--
-- Consequence: events of one stream may arrive out of version order (a transaction's id is assigned
-- at its first write, before it waits for the wallet lock), so every projection is
-- order-insensitive: balances add deltas (they commute), versions keep the greatest, history rows
-- are keyed by (user_id, stream_version).
--
-- Each projection function applies one batch and advances its checkpoint in the same transaction,
-- so each event is applied exactly once, even across crashes.

CREATE TABLE projection_checkpoints (
    name           text PRIMARY KEY,
    last_xid       xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    events_applied bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
INSERT INTO projection_checkpoints (name) VALUES ('wallets'), ('history'), ('system');

CREATE TABLE rm_assets (
    code       text PRIMARY KEY,
    name       text NOT NULL,
    decimals   int NOT NULL,
    created_at timestamptz NOT NULL
);

-- created_at is NULL until the WalletOpened event is applied (a wallet's first top-up can be read
-- before its WalletOpened, see above); queries treat such a row as not yet there.
CREATE TABLE rm_wallets (
    user_id    text PRIMARY KEY,
    version    bigint NOT NULL,
    metadata   jsonb,
    created_at timestamptz
);

CREATE TABLE rm_balances (
    user_id text NOT NULL,
    asset   text NOT NULL,
    balance numeric NOT NULL,
    PRIMARY KEY (user_id, asset)
);

CREATE TABLE rm_transactions (
    transaction_id    uuid PRIMARY KEY,
    user_id           text NOT NULL,
    wallet_version    bigint NOT NULL,
    kind              text NOT NULL,
    asset             text NOT NULL,
    amount            bigint NOT NULL,
    entries           jsonb NOT NULL,
    reference         text,
    metadata          jsonb NOT NULL,
    balance_after     numeric NOT NULL,
    created_at        timestamptz NOT NULL,
    consistency_token text NOT NULL,
    UNIQUE (user_id, wallet_version)
);
CREATE INDEX rm_transactions_by_asset ON rm_transactions (user_id, asset, wallet_version);

-- Per asset: treasury, bonus, revenue, and `users` (the total of all user wallets).
CREATE TABLE rm_system_balances (
    asset   text NOT NULL,
    account text NOT NULL,
    balance numeric NOT NULL,
    PRIMARY KEY (asset, account)
);

CREATE FUNCTION tally_next_events(p_after_xid xid8, p_after_position bigint, p_limit int)
RETURNS SETOF events LANGUAGE sql STABLE AS $$
    SELECT *
      FROM events
     WHERE transaction_id < pg_snapshot_xmin(pg_current_snapshot())
       AND (transaction_id, global_position) > (p_after_xid, p_after_position)
     ORDER BY transaction_id, global_position
     LIMIT p_limit
$$;

-- The legs of every transaction event, one row per (event, account).
CREATE FUNCTION tally_event_legs(p_data jsonb)
RETURNS TABLE (account text, amount bigint) LANGUAGE sql IMMUTABLE AS $$
    SELECT leg ->> 'account', (leg ->> 'amount')::bigint
      FROM jsonb_array_elements(coalesce(p_data -> 'entries', '[]'::jsonb)) AS leg
$$;

CREATE FUNCTION tally_checkpoint_advance(p_name text, p_applied int, p_xid xid8, p_position bigint)
RETURNS void LANGUAGE sql AS $$
    UPDATE projection_checkpoints
       SET last_xid = p_xid, last_position = p_position,
           events_applied = events_applied + p_applied, updated_at = now()
     WHERE name = p_name
$$;

-- Projection `wallets`: rm_assets, rm_wallets and rm_balances.
CREATE FUNCTION tally_project_wallets(p_limit int)
RETURNS TABLE (applied int, last_xid text, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cp projection_checkpoints;
    v_n int;
    v_xid xid8;
    v_pos bigint;
BEGIN
    -- The row lock makes a second projector wait here and then start after this batch.
    SELECT * INTO STRICT cp FROM projection_checkpoints WHERE name = 'wallets' FOR UPDATE;
    WITH batch AS MATERIALIZED (
        SELECT * FROM tally_next_events(cp.last_xid, cp.last_position, p_limit)
    ), assets AS (
        INSERT INTO rm_assets (code, name, decimals, created_at)
        SELECT data ->> 'code', data ->> 'name', (data ->> 'decimals')::int, recorded_at
          FROM batch WHERE event_type = 'AssetDefined'
        ON CONFLICT (code) DO NOTHING
    ), wallets AS (
        INSERT INTO rm_wallets (user_id, version, metadata, created_at)
        SELECT substr(stream_id, 8), max(stream_version),
               (array_agg(data -> 'metadata') FILTER (WHERE event_type = 'WalletOpened'))[1],
               min(recorded_at) FILTER (WHERE event_type = 'WalletOpened')
          FROM batch WHERE stream_id LIKE 'wallet:%'
         GROUP BY stream_id
        ON CONFLICT (user_id) DO UPDATE
           SET version = greatest(rm_wallets.version, excluded.version),
               metadata = coalesce(rm_wallets.metadata, excluded.metadata),
               created_at = coalesce(rm_wallets.created_at, excluded.created_at)
    ), balances AS (
        INSERT INTO rm_balances (user_id, asset, balance)
        SELECT substr(leg.account, 6), b.data ->> 'asset', sum(leg.amount)
          FROM batch b, tally_event_legs(b.data) leg
         WHERE leg.account LIKE 'user:%'
         GROUP BY 1, 2
        ON CONFLICT (user_id, asset) DO UPDATE SET balance = rm_balances.balance + excluded.balance
    )
    SELECT count(*)::int,
           (array_agg(transaction_id ORDER BY transaction_id DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY transaction_id DESC, global_position DESC))[1]
      INTO v_n, v_xid, v_pos FROM batch;
    IF v_n > 0 THEN
        PERFORM tally_checkpoint_advance('wallets', v_n, v_xid, v_pos);
    ELSE
        v_xid := cp.last_xid; v_pos := cp.last_position;
    END IF;
    RETURN QUERY SELECT v_n, v_xid::text, v_pos;
END $$;

-- Projection `history`: rm_transactions, one row per transaction event.
CREATE FUNCTION tally_project_history(p_limit int)
RETURNS TABLE (applied int, last_xid text, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cp projection_checkpoints;
    v_n int;
    v_xid xid8;
    v_pos bigint;
BEGIN
    SELECT * INTO STRICT cp FROM projection_checkpoints WHERE name = 'history' FOR UPDATE;
    WITH batch AS MATERIALIZED (
        SELECT * FROM tally_next_events(cp.last_xid, cp.last_position, p_limit)
    ), history AS (
        INSERT INTO rm_transactions (transaction_id, user_id, wallet_version, kind, asset, amount,
                                     entries, reference, metadata, balance_after, created_at,
                                     consistency_token)
        SELECT event_id, data ->> 'user_id', stream_version, data ->> 'kind', data ->> 'asset',
               (data ->> 'amount')::bigint, data -> 'entries', data ->> 'reference',
               data -> 'metadata', (data ->> 'balance_after')::numeric, recorded_at,
               transaction_id::text || '.' || global_position::text
          FROM batch WHERE data ? 'entries'
        ON CONFLICT (transaction_id) DO NOTHING
    )
    SELECT count(*)::int,
           (array_agg(transaction_id ORDER BY transaction_id DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY transaction_id DESC, global_position DESC))[1]
      INTO v_n, v_xid, v_pos FROM batch;
    IF v_n > 0 THEN
        PERFORM tally_checkpoint_advance('history', v_n, v_xid, v_pos);
    ELSE
        v_xid := cp.last_xid; v_pos := cp.last_position;
    END IF;
    RETURN QUERY SELECT v_n, v_xid::text, v_pos;
END $$;

-- Projection `system`: rm_system_balances, the per-asset totals of every account kind.
CREATE FUNCTION tally_project_system(p_limit int)
RETURNS TABLE (applied int, last_xid text, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cp projection_checkpoints;
    v_n int;
    v_xid xid8;
    v_pos bigint;
BEGIN
    SELECT * INTO STRICT cp FROM projection_checkpoints WHERE name = 'system' FOR UPDATE;
    WITH batch AS MATERIALIZED (
        SELECT * FROM tally_next_events(cp.last_xid, cp.last_position, p_limit)
    ), deltas AS (
        SELECT b.data ->> 'code' AS asset, acct.account, 0::numeric AS delta
          FROM batch b,
               (VALUES ('treasury'), ('bonus'), ('revenue'), ('users')) AS acct (account)
         WHERE b.event_type = 'AssetDefined'
        UNION ALL
        SELECT b.data ->> 'asset',
               CASE WHEN leg.account LIKE 'user:%' THEN 'users' ELSE substr(leg.account, 8) END,
               leg.amount
          FROM batch b, tally_event_legs(b.data) leg
    ), totals AS (
        INSERT INTO rm_system_balances (asset, account, balance)
        SELECT asset, account, sum(delta) FROM deltas GROUP BY asset, account
        ON CONFLICT (asset, account) DO UPDATE
           SET balance = rm_system_balances.balance + excluded.balance
    )
    SELECT count(*)::int,
           (array_agg(transaction_id ORDER BY transaction_id DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY transaction_id DESC, global_position DESC))[1]
      INTO v_n, v_xid, v_pos FROM batch;
    IF v_n > 0 THEN
        PERFORM tally_checkpoint_advance('system', v_n, v_xid, v_pos);
    ELSE
        v_xid := cp.last_xid; v_pos := cp.last_position;
    END IF;
    RETURN QUERY SELECT v_n, v_xid::text, v_pos;
END $$;
