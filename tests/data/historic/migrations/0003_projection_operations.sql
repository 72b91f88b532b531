-- Operating projections: which read-model generation is live (bumped by `tally rebuild`), and a
-- projection stopped by an event it cannot apply (a "poison" event), named here until an operator
-- resumes it with `tally projections resume NAME`.
ALTER TABLE projection_checkpoints
    ADD COLUMN generation     int NOT NULL DEFAULT 1,
    ADD COLUMN rebuilt_at     timestamptz,
    ADD COLUMN error          text,
    ADD COLUMN error_position bigint,
    ADD COLUMN stopped_at     timestamptz;

-- How far behind each projection is: committed events after its checkpoint, and the age of the
-- oldest of them. Read by `tally projections status` and the API's health data.
CREATE FUNCTION tally_projection_lag(p_name text)
RETURNS TABLE (events_behind bigint, seconds_behind double precision) LANGUAGE sql STABLE AS $$
    SELECT count(*), coalesce(extract(epoch FROM now() - min(e.recorded_at)), 0)::double precision
      FROM projection_checkpoints cp
      JOIN events e
        ON (e.transaction_id, e.global_position) > (cp.last_xid, cp.last_position)
     WHERE cp.name = p_name
$$;
