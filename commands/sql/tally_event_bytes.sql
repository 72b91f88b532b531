-- The canonical bytes of an event, hashed into its stream's chain. jsonb renders a given value to
-- one text, so the verifier recomputes this from the stored row alone. Changing this function
-- breaks every stored chain: it must stay exactly as it is.
CREATE OR REPLACE FUNCTION tally_event_bytes(
    p_stream_id text, p_stream_version bigint, p_event_id uuid, p_event_type text,
    p_data jsonb, p_metadata jsonb, p_recorded_at timestamptz
) RETURNS bytea LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT convert_to(jsonb_build_object(
        'stream_id', p_stream_id,
        'stream_version', p_stream_version,
        'event_id', p_event_id,
        'event_type', p_event_type,
        'data', p_data,
        'metadata', p_metadata,
        'recorded_at_us', (extract(epoch FROM p_recorded_at) * 1000000)::bigint
    )::text, 'UTF8')
$$;
