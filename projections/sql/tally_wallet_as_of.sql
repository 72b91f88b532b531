-- One wallet as of a time or a global position, from the events, in time logarithmic in its
-- history (bench/: a wallet of 1,000,000 events against one of ten).
--
-- The cut is a prefix of the wallet's versions. Within one stream both global positions and
-- recorded times grow with the version: positions are drawn by the insert, and a wallet's insert
-- happens under its row lock, after the previous version committed; times are taken after that
-- lock and never before the previous event's (commands/sql/tally_post_transactions.sql). So the
-- version at the cut is found by binary search over the stream's versions (its unique index),
-- and each asset's balance then is the `balance_after` of the newest transaction event of that
-- asset at or before it (events_balance_by_asset): the balances a wallet had, never a mixture.
-- (Events recorded before times were taken under the lock may carry a time earlier than their
-- predecessor's. For such a wallet the search lands on a version recorded at or before the cut,
-- but the prefix up to it may hold a later-recorded event: the cut is then approximate.)
--
-- `held` is, per asset, what the wallet's holds reserved at the cut: every hold placed within it
-- and not ended by an event within it, whose expiry is after the cut's time (as of a position: the
-- time of the newest event at or before it, or of the wallet's own last event in the cut if that
-- is later), by what remained of it then. Holds are read from the
-- wallet's hold events (events_holds_by_wallet): the cost grows with the number of its holds.
--
-- Returns no row when the wallet does not exist; version 0 when it did not exist yet at the cut.
-- `uncounted` counts the events at or before the cut of a type this release has no rule for (their
-- effect, if any, is not in the balances).
DROP FUNCTION IF EXISTS tally_wallet_as_of(text, timestamptz, bigint);
CREATE FUNCTION tally_wallet_as_of(p_user_id text, p_at timestamptz, p_position bigint)
RETURNS TABLE (version bigint, balances jsonb, held jsonb, uncounted bigint) LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_stream_id text := 'wallet:' || p_user_id;
    v_assets jsonb;
    v_low bigint := 0;
    v_high bigint;
    v_mid bigint;
    v_in boolean;
    v_time timestamptz := p_at;
BEGIN
    SELECT s.version, s.state -> 'balances' INTO v_high, v_assets
      FROM streams s WHERE s.stream_id = v_stream_id;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    -- The greatest version inside the cut: v_low is always inside (0: before the wallet), v_high
    -- the greatest that may be.
    WHILE v_low < v_high LOOP
        v_mid := (v_low + v_high + 1) / 2;
        SELECT (p_at IS NOT NULL AND e.recorded_at <= p_at)
               OR (p_position IS NOT NULL AND e.global_position <= p_position)
          INTO v_in
          FROM events e WHERE e.stream_id = v_stream_id AND e.stream_version = v_mid;
        IF v_in THEN
            v_low := v_mid;
        ELSE
            v_high := v_mid - 1;
        END IF;
    END LOOP;
    version := v_low;
    -- Every asset the wallet ever held is in its snapshot (a key, once there, stays).
    SELECT coalesce(jsonb_object_agg(a.asset, b.balance) FILTER (WHERE b.balance IS NOT NULL), '{}')
      INTO balances
      FROM jsonb_object_keys(coalesce(v_assets, '{}')) AS a(asset)
      CROSS JOIN LATERAL (
            SELECT (e.data -> 'balance_after') AS balance
              FROM events e
             WHERE e.stream_id = v_stream_id AND e.data ->> 'asset' = a.asset AND e.data ? 'balance_after'
               AND e.stream_version <= v_low
               AND tally_event_kind(e.event_type, EXISTS (SELECT 1 FROM flows f WHERE f.event_type = e.event_type))
                   = 'transaction'
             ORDER BY e.stream_version DESC
             LIMIT 1) b;
    IF v_time IS NULL THEN
        SELECT e.recorded_at INTO v_time FROM events e
         WHERE e.global_position <= p_position ORDER BY e.global_position DESC LIMIT 1;
    END IF;
    -- Never before the wallet's own last event in the cut: positions and times of different
    -- wallets may disagree by a little, and that event was decided with its holds as of its time.
    IF v_low > 0 THEN
        SELECT greatest(v_time, e.recorded_at) INTO v_time FROM events e
         WHERE e.stream_id = v_stream_id AND e.stream_version = v_low;
    END IF;
    SELECT coalesce(jsonb_object_agg(h.asset, h.held), '{}') INTO held
      FROM (SELECT x.asset, sum(x.remaining) AS held
              FROM (SELECT DISTINCT ON (e.data ->> 'hold_id') e.data ->> 'hold_id' AS hold_id,
                           e.data ->> 'asset' AS asset,
                           CASE e.event_type WHEN 'HoldPlaced' THEN (e.data ->> 'amount')::bigint
                                             WHEN 'HoldCaptured' THEN (e.data ->> 'hold_remaining')::bigint
                                             ELSE 0 END AS remaining
                      FROM events e
                     WHERE e.stream_id = v_stream_id AND e.stream_version <= v_low
                       AND e.event_type IN ('HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired')
                     ORDER BY e.data ->> 'hold_id', e.stream_version DESC) x
              JOIN events p ON p.event_id = x.hold_id::uuid AND p.event_type = 'HoldPlaced'
             WHERE x.remaining > 0 AND (p.data ->> 'expires_at')::timestamptz > v_time
             GROUP BY x.asset) h;
    -- The candidates come from the partial index alone (materialized, so no join can lead the
    -- planner to scan the table: measured at 320 ms on a million events); then those this release
    -- knows after all are dropped.
    WITH candidates AS MATERIALIZED (
        SELECT e.event_type FROM events e
         WHERE e.stream_id = v_stream_id AND e.stream_version <= v_low
           AND e.event_type NOT IN ('AssetDefined', 'WalletOpened', 'CreditsToppedUp', 'BonusGranted', 'CreditsSpent',
                                    'CreditsReversed', 'HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired')
    )
    SELECT count(*) INTO uncounted
      FROM candidates c LEFT JOIN flows f ON f.event_type = c.event_type
     WHERE tally_event_kind(c.event_type, f.kind IS NOT NULL) IS NULL;
    RETURN NEXT;
END $$;
