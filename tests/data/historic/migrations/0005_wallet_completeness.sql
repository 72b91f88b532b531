-- A wallet read model that is complete or says it is not.
--
-- Projections apply events in (transaction id, position) order, and a transaction's id is assigned
-- at its first write, before it waits for a wallet's lock: one wallet's versions can therefore be
-- applied out of order (found in review). Between two batches, rm_wallets could show version N
-- while version N-1's delta is not yet in rm_balances: a state that never existed. Versions are
-- gapless, so a wallet row is complete exactly when it has applied `version` events; queries that
-- find events_applied < version wait for the projection (projections/queries.py).

ALTER TABLE rm_wallets ADD COLUMN events_applied bigint NOT NULL DEFAULT 0;
-- Rows projected before this migration: count what was applied for them.
UPDATE rm_wallets w
   SET events_applied = (SELECT count(*) FROM events e, projection_checkpoints cp
                          WHERE cp.name = 'wallets' AND e.stream_id = 'wallet:' || w.user_id
                            AND (e.transaction_id, e.global_position) <= (cp.last_xid, cp.last_position));

-- Projection `wallets`: rm_assets, rm_wallets and rm_balances.
CREATE OR REPLACE FUNCTION tally_project_wallets(p_limit int)
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
        INSERT INTO rm_wallets (user_id, version, events_applied, metadata, created_at)
        SELECT substr(stream_id, 8), max(stream_version), count(*),
               (array_agg(data -> 'metadata') FILTER (WHERE event_type = 'WalletOpened'))[1],
               min(recorded_at) FILTER (WHERE event_type = 'WalletOpened')
          FROM batch WHERE stream_id LIKE 'wallet:%'
         GROUP BY stream_id
        ON CONFLICT (user_id) DO UPDATE
           SET version = greatest(rm_wallets.version, excluded.version),
               events_applied = rm_wallets.events_applied + excluded.events_applied,
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
