-- What an event is, by its type: 'asset' (AssetDefined), 'wallet' (WalletOpened), 'transaction' (a
-- flow's event type: the caller joins the flows table and says whether it matched; or a reversal,
-- CreditsReversed, or a hold's capture, HoldCaptured: both move credits), 'hold' (HoldPlaced,
-- HoldVoided, HoldExpired: a hold's lifecycle, moving no credits), or NULL for a type this release
-- has no rule for. Every projection dispatches on it and stops at NULL (tally_refuse_event);
-- `tally verify` names such events; as-of leaves them out and says so. domain/events.py
-- (EVENT_TYPES) is the same list in Python. A plain expression, so it is inlined.
CREATE OR REPLACE FUNCTION tally_event_kind(p_event_type text, p_is_flow boolean) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
               WHEN p_event_type = 'AssetDefined' THEN 'asset'
               WHEN p_event_type = 'WalletOpened' THEN 'wallet'
               WHEN p_is_flow OR p_event_type IN ('CreditsReversed', 'HoldCaptured') THEN 'transaction'
               WHEN p_event_type IN ('HoldPlaced', 'HoldVoided', 'HoldExpired') THEN 'hold'
           END
$$;
