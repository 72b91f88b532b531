-- A hold as the API answers it, from its HoldPlaced event's data and where it stands now.
CREATE OR REPLACE FUNCTION tally_hold_body(
    p_placed jsonb, p_captured bigint, p_remaining bigint, p_status text, p_created_at timestamptz, p_token text
) RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_object(
        'hold_id', p_placed -> 'hold_id', 'user_id', p_placed -> 'user_id', 'asset', p_placed -> 'asset',
        'amount', p_placed -> 'amount', 'captured', p_captured, 'remaining', p_remaining, 'status', p_status,
        'expires_at', p_placed -> 'expires_at', 'reference', p_placed -> 'reference',
        'metadata', p_placed -> 'metadata', 'created_at', tally_timestamp_text(p_created_at),
        'consistency_token', p_token)
$$;
