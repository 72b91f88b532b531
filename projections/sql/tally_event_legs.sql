-- The legs of a transaction event (one whose type is a flow's event type), one row per account.
-- Callers choose the events by type; this only reads their `entries`.
CREATE OR REPLACE FUNCTION tally_event_legs(p_data jsonb)
RETURNS TABLE (account text, amount bigint) LANGUAGE sql IMMUTABLE AS $$
    SELECT leg ->> 'account', (leg ->> 'amount')::bigint
      FROM jsonb_array_elements(p_data -> 'entries') AS leg
$$;
