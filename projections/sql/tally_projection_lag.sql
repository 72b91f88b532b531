-- How far behind a projection is: committed events after its checkpoint, and the age of the oldest
-- of them. Read by `tally projections status` and the API's health data.
CREATE OR REPLACE FUNCTION tally_projection_lag(p_name text)
RETURNS TABLE (events_behind bigint, seconds_behind double precision) LANGUAGE sql STABLE AS $$
    SELECT count(*), coalesce(extract(epoch FROM now() - min(e.recorded_at)), 0)::double precision
      FROM projection_checkpoints cp
      JOIN events e
        ON (e.writer_xid, e.global_position) > (cp.last_xid, cp.last_position)
     WHERE cp.name = p_name
$$;
