-- Projection `system`: rm_system_balances, per asset the total of each system account (the flows'
-- system accounts) and of all users. Dispatches on the event's kind (tally_event_kind): an asset
-- event opens the asset's rows at zero; a transaction event adds its legs; a wallet event moves
-- nothing; an event of no known kind stops the projection.
CREATE OR REPLACE FUNCTION tally_project_system(p_limit int)
RETURNS TABLE (applied int, last_xid text, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cp projection_checkpoints;
    v_n int;
    v_xid xid8;
    v_pos bigint;
    v_unknown bigint;
BEGIN
    SELECT * INTO STRICT cp FROM projection_checkpoints WHERE name = 'system' FOR UPDATE;
    WITH batch AS MATERIALIZED (
        SELECT e.*, tally_event_kind(e.event_type, f.kind IS NOT NULL) AS kind
          FROM tally_next_events(cp.last_xid, cp.last_position, p_limit) e
          LEFT JOIN flows f ON f.event_type = e.event_type
    ), deltas AS (
        SELECT b.data ->> 'code' AS asset, acct.account, 0::numeric AS delta
          FROM batch b, (SELECT system_account FROM flows UNION SELECT 'users') AS acct (account)
         WHERE b.kind = 'asset'
        UNION ALL
        SELECT b.data ->> 'asset',
               CASE WHEN leg.account LIKE 'user:%' THEN 'users' ELSE substr(leg.account, 8) END,
               leg.amount
          FROM batch b, tally_event_legs(b.data) leg
         WHERE b.kind = 'transaction'
    ), totals AS (
        INSERT INTO rm_system_balances (asset, account, balance)
        SELECT asset, account, sum(delta) FROM deltas GROUP BY asset, account
        ON CONFLICT (asset, account) DO UPDATE
           SET balance = rm_system_balances.balance + excluded.balance
    )
    SELECT count(*)::int,
           (array_agg(writer_xid ORDER BY writer_xid DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY writer_xid DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY writer_xid, global_position) FILTER (WHERE kind IS NULL))[1]
      INTO v_n, v_xid, v_pos, v_unknown FROM batch;
    IF v_unknown IS NOT NULL THEN
        PERFORM tally_refuse_event('system', v_unknown);
    END IF;
    IF v_n > 0 THEN
        PERFORM tally_checkpoint_advance('system', v_n, v_xid, v_pos);
    ELSE
        v_xid := cp.last_xid; v_pos := cp.last_position;
    END IF;
    RETURN QUERY SELECT v_n, v_xid::text, v_pos;
END $$;
