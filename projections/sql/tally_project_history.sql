-- Projection `history`: rm_transactions (one row per transaction event, keyed by its wallet
-- version) and rm_history_wallets (per wallet: the greatest version applied, how many of its events
-- were applied, whether it was opened). A history read is complete when `events_applied` equals
-- `version`: it never has to assume which versions are transactions. Dispatches on the event's
-- kind (tally_event_kind): wallet, transaction and hold events count; a transaction event (a
-- reversal and a hold's capture too, with what they reverse or capture) also gets its row; an
-- asset event has nothing here; an event of no known kind stops the projection.
CREATE OR REPLACE FUNCTION tally_project_history(p_limit int)
RETURNS TABLE (applied int, last_xid text, last_position bigint) LANGUAGE plpgsql AS $$
DECLARE
    cp projection_checkpoints;
    v_n int;
    v_xid xid8;
    v_pos bigint;
    v_unknown bigint;
BEGIN
    SELECT * INTO STRICT cp FROM projection_checkpoints WHERE name = 'history' FOR UPDATE;
    WITH batch AS MATERIALIZED (
        SELECT e.*, tally_event_kind(e.event_type, f.kind IS NOT NULL) AS kind
          FROM tally_next_events(cp.last_xid, cp.last_position, p_limit) e
          LEFT JOIN flows f ON f.event_type = e.event_type
    ), history AS (
        INSERT INTO rm_transactions (transaction_id, user_id, wallet_version, kind, asset, amount,
                                     entries, reference, metadata, balance_after, created_at,
                                     consistency_token, created_by, reverses, hold_id, reason)
        SELECT event_id, data ->> 'user_id', stream_version, data ->> 'kind', data ->> 'asset',
               (data ->> 'amount')::bigint, data -> 'entries', data ->> 'reference',
               data -> 'metadata', (data ->> 'balance_after')::numeric, recorded_at,
               writer_xid::text || '.' || global_position::text, metadata ->> 'created_by',
               (data ->> 'reverses')::uuid, (data ->> 'hold_id')::uuid, data ->> 'reason'
          FROM batch WHERE kind = 'transaction'
        ON CONFLICT (transaction_id) DO NOTHING
    ), heads AS (
        INSERT INTO rm_history_wallets (user_id, version, events_applied, opened)
        SELECT substr(stream_id, 8), max(stream_version), count(*), bool_or(event_type = 'WalletOpened')
          FROM batch WHERE kind IN ('wallet', 'transaction', 'hold')
         GROUP BY stream_id
        ON CONFLICT (user_id) DO UPDATE
           SET version = greatest(rm_history_wallets.version, excluded.version),
               events_applied = rm_history_wallets.events_applied + excluded.events_applied,
               opened = rm_history_wallets.opened OR excluded.opened
    )
    SELECT count(*)::int,
           (array_agg(writer_xid ORDER BY writer_xid DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY writer_xid DESC, global_position DESC))[1],
           (array_agg(global_position ORDER BY writer_xid, global_position) FILTER (WHERE kind IS NULL))[1]
      INTO v_n, v_xid, v_pos, v_unknown FROM batch;
    IF v_unknown IS NOT NULL THEN
        PERFORM tally_refuse_event('history', v_unknown);
    END IF;
    IF v_n > 0 THEN
        PERFORM tally_checkpoint_advance('history', v_n, v_xid, v_pos);
    ELSE
        v_xid := cp.last_xid; v_pos := cp.last_position;
    END IF;
    RETURN QUERY SELECT v_n, v_xid::text, v_pos;
END $$;
