-- Moves a projection's checkpoint past the batch it just applied, in the same transaction as the
-- read-model rows: each event is applied exactly once, even across crashes.
CREATE OR REPLACE FUNCTION tally_checkpoint_advance(p_name text, p_applied int, p_xid xid8, p_position bigint)
RETURNS void LANGUAGE sql AS $$
    UPDATE projection_checkpoints
       SET last_xid = p_xid, last_position = p_position,
           events_applied = events_applied + p_applied, updated_at = now()
     WHERE name = p_name
$$;
