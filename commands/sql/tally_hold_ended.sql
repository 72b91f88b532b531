-- Why a hold is not active at `p_now`: `hold_expired` when its expiry has passed (recorded or
-- not), `hold_not_active` when a capture or a void ended it; no row while it is active. `p_entry` is
-- the hold's entry in its wallet's snapshot (NULL once an event ended it), read under the wallet's
-- lock; the event that ended it is then found by index (events_hold_lifecycle). A hold with
-- neither is a broken snapshot: refused loudly, never answered as if it had ended.
CREATE OR REPLACE FUNCTION tally_hold_ended(p_hold_id uuid, p_entry jsonb, p_now timestamptz)
RETURNS TABLE (code text, detail text) LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_end text;
BEGIN
    IF p_entry IS NOT NULL THEN
        IF (p_entry ->> 'expires_at')::timestamptz <= p_now THEN
            RETURN QUERY SELECT 'hold_expired', format('hold %s expired at %s', p_hold_id, p_entry ->> 'expires_at');
        END IF;
        RETURN;
    END IF;
    SELECT e.event_type INTO v_end FROM events e
     WHERE e.data ->> 'hold_id' = p_hold_id::text AND e.event_type IN ('HoldCaptured', 'HoldVoided', 'HoldExpired')
     ORDER BY e.stream_version DESC LIMIT 1;
    IF v_end IS NULL THEN
        RAISE EXCEPTION 'hold % is neither in its wallet''s snapshot nor ended by an event', p_hold_id
            USING ERRCODE = 'data_corrupted';
    END IF;
    RETURN QUERY SELECT CASE v_end WHEN 'HoldExpired' THEN 'hold_expired' ELSE 'hold_not_active' END,
                        format('hold %s was %s', p_hold_id, CASE v_end WHEN 'HoldExpired' THEN 'expired'
                                                                      WHEN 'HoldVoided' THEN 'voided'
                                                                      ELSE 'captured' END);
END $$;
