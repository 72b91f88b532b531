-- Why a hold is not active at `p_now`: `hold_expired` when its expiry has passed (recorded or
-- not), `hold_not_active` when a capture or a void ended it; NULL while it is active. `p_entry` is
-- the hold's entry in its wallet's snapshot (NULL once an event ended it), read under the wallet's
-- lock; the event that ended it is then found by index (events_hold_lifecycle).
CREATE OR REPLACE FUNCTION tally_hold_ended(p_hold_id uuid, p_entry jsonb, p_now timestamptz)
RETURNS TABLE (code text, detail text) LANGUAGE sql STABLE AS $$
    SELECT CASE WHEN ended.event_type = 'HoldExpired' OR ended.event_type IS NULL THEN 'hold_expired'
                ELSE 'hold_not_active' END,
           CASE WHEN ended.event_type = 'HoldExpired' OR ended.event_type IS NULL
                THEN format('hold %s expired', p_hold_id)
                WHEN ended.event_type = 'HoldVoided' THEN format('hold %s was voided', p_hold_id)
                ELSE format('hold %s was captured', p_hold_id) END
      FROM (SELECT 1) one
      LEFT JOIN LATERAL (
            SELECT e.event_type FROM events e
             WHERE p_entry IS NULL AND e.data ->> 'hold_id' = p_hold_id::text
               AND e.event_type IN ('HoldCaptured', 'HoldVoided', 'HoldExpired')
             ORDER BY e.stream_version DESC LIMIT 1) ended ON true
     WHERE p_entry IS NULL OR (p_entry ->> 'expires_at')::timestamptz <= p_now
$$;
