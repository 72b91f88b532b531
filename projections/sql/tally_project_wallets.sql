-- Projection `wallets`: rm_assets, rm_wallets, rm_balances and rm_holds, one batch per call, its
-- checkpoint advanced in the same transaction. Dispatches on the event's kind (tally_event_kind):
-- an asset event defines an asset; a wallet event opens a wallet; a transaction event adds its user
-- legs to the balances; a hold event (and a HoldCaptured, also a transaction) moves its hold's row;
-- all three count towards the wallet's version and `events_applied` (a wallet is complete when it
-- has applied `version` events; queries wait out a gap). An event of no known kind stops the
-- projection (tally_refuse_event). Events of one wallet may come out of version order, so every
-- update commutes: sums, and the one event that ends a hold setting its status.
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
          FROM batch WHERE kind IN ('wallet', 'transaction', 'hold')
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
    ), hold_events AS (
        SELECT (data ->> 'hold_id')::uuid AS hold_id, max(substr(stream_id, 8)) AS user_id,
               max(data ->> 'asset') AS asset,
               max((data ->> 'amount')::bigint) FILTER (WHERE event_type = 'HoldPlaced') AS amount,
               coalesce(sum((data ->> 'amount')::bigint) FILTER (WHERE event_type = 'HoldCaptured'), 0) AS captured,
               coalesce(sum((data ->> 'released')::bigint) FILTER (WHERE event_type <> 'HoldPlaced'), 0) AS released,
               max(CASE WHEN event_type = 'HoldVoided' THEN 'voided'
                        WHEN event_type = 'HoldExpired' THEN 'expired'
                        WHEN event_type = 'HoldCaptured' AND (data ->> 'hold_remaining')::bigint = 0 THEN 'captured'
                   END) AS status,
               max((data ->> 'expires_at')::timestamptz) FILTER (WHERE event_type = 'HoldPlaced') AS expires_at,
               max(data ->> 'reference') FILTER (WHERE event_type = 'HoldPlaced') AS reference,
               (array_agg(data -> 'metadata') FILTER (WHERE event_type = 'HoldPlaced'))[1] AS metadata,
               max(stream_version) FILTER (WHERE event_type = 'HoldPlaced') AS wallet_version,
               max(recorded_at) FILTER (WHERE event_type = 'HoldPlaced') AS created_at,
               max(recorded_at) FILTER (WHERE event_type IN ('HoldVoided', 'HoldExpired')
                                           OR (data ->> 'hold_remaining')::bigint = 0) AS ended_at,
               max(writer_xid::text || '.' || global_position::text) FILTER (WHERE event_type = 'HoldPlaced')
                   AS consistency_token
          FROM batch WHERE event_type IN ('HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired')
         GROUP BY 1
    ), holds AS (
        INSERT INTO rm_holds (hold_id, user_id, asset, amount, captured, released, status, expires_at, reference,
                              metadata, wallet_version, created_at, ended_at, consistency_token)
        SELECT hold_id, user_id, asset, amount, captured, released, coalesce(status, 'active'), expires_at,
               reference, metadata, wallet_version, created_at, ended_at, consistency_token
          FROM hold_events
        ON CONFLICT (hold_id) DO UPDATE
           SET amount = coalesce(rm_holds.amount, excluded.amount),
               captured = rm_holds.captured + excluded.captured,
               released = rm_holds.released + excluded.released,
               status = CASE WHEN excluded.status = 'active' THEN rm_holds.status ELSE excluded.status END,
               expires_at = coalesce(rm_holds.expires_at, excluded.expires_at),
               reference = coalesce(rm_holds.reference, excluded.reference),
               metadata = coalesce(rm_holds.metadata, excluded.metadata),
               wallet_version = coalesce(rm_holds.wallet_version, excluded.wallet_version),
               created_at = coalesce(rm_holds.created_at, excluded.created_at),
               ended_at = coalesce(rm_holds.ended_at, excluded.ended_at),
               consistency_token = coalesce(rm_holds.consistency_token, excluded.consistency_token)
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
