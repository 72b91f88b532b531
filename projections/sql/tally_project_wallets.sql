-- Projection `wallets`: rm_assets, rm_wallets and rm_balances, one batch per call, its checkpoint
-- advanced in the same transaction. Dispatches on the event's kind (tally_event_kind): an asset
-- event defines an asset; a wallet event opens a wallet; a transaction event adds its user legs to
-- the balances; both count towards the wallet's version and `events_applied` (a wallet is complete
-- when it has applied `version` events; queries wait out a gap). An event of no known kind stops
-- the projection (tally_refuse_event).
CREATE OR REPLACE FUNCTION tally_project_wallets(p_limit int)
RETURNS TABLE (applied int, last_xid text, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cp projection_checkpoints;
    v_n int;
    v_xid xid8;
    v_pos bigint;
    v_unknown bigint;
BEGIN
    -- The row lock makes a second projector wait here and then start after this batch.
    SELECT * INTO STRICT cp FROM projection_checkpoints WHERE name = 'wallets' FOR UPDATE;
    WITH batch AS MATERIALIZED (
        SELECT e.*, tally_event_kind(e.event_type, f.kind IS NOT NULL) AS kind
          FROM tally_next_events(cp.last_xid, cp.last_position, p_limit) e
          LEFT JOIN flows f ON f.event_type = e.event_type
    ), assets AS (
        INSERT INTO rm_assets (code, name, decimals, created_at)
        SELECT data ->> 'code', data ->> 'name', (data ->> 'decimals')::int, recorded_at
          FROM batch WHERE kind = 'asset'
        ON CONFLICT (code) DO NOTHING
    ), wallets AS (
        INSERT INTO rm_wallets (user_id, version, events_applied, metadata, created_at)
        SELECT substr(stream_id, 8), max(stream_version), count(*),
               (array_agg(data -> 'metadata') FILTER (WHERE event_type = 'WalletOpened'))[1],
               min(recorded_at) FILTER (WHERE event_type = 'WalletOpened')
          FROM batch WHERE kind IN ('wallet', 'transaction')
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
         WHERE b.kind = 'transaction' AND leg.account LIKE 'user:%'
         GROUP BY 1, 2
        ON CONFLICT (user_id, asset) DO UPDATE SET balance = rm_balances.balance + excluded.balance
    )
    SELECT count(*)::int,
           (array_agg(writer_xid ORDER BY writer_xid DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY writer_xid DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY writer_xid, global_position) FILTER (WHERE kind IS NULL))[1]
      INTO v_n, v_xid, v_pos, v_unknown FROM batch;
    IF v_unknown IS NOT NULL THEN
        PERFORM tally_refuse_event('wallets', v_unknown);
    END IF;
    IF v_n > 0 THEN
        PERFORM tally_checkpoint_advance('wallets', v_n, v_xid, v_pos);
    ELSE
        v_xid := cp.last_xid; v_pos := cp.last_position;
    END IF;
    RETURN QUERY SELECT v_n, v_xid::text, v_pos;
END $$;
