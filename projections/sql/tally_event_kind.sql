-- What an event is, by its type alone: 'asset' (AssetDefined), 'wallet' (WalletOpened),
-- 'transaction' (a flow's event type, in the flows table), or NULL for a type this release has no
-- rule for. Every projection dispatches on it and stops at NULL (tally_refuse_event); `tally
-- verify` names such events. domain/events.py (EVENT_TYPES) is the same list in Python.
CREATE OR REPLACE FUNCTION tally_event_kind(p_event_type text) RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE
               WHEN p_event_type = 'AssetDefined' THEN 'asset'
               WHEN p_event_type = 'WalletOpened' THEN 'wallet'
               WHEN EXISTS (SELECT 1 FROM flows f WHERE f.event_type = p_event_type) THEN 'transaction'
           END
$$;
