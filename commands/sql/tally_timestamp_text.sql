-- Timestamps in command responses: UTC, microseconds, a trailing Z.
CREATE OR REPLACE FUNCTION tally_timestamp_text(p_at timestamptz) RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT to_char(p_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')
$$;
