-- The next events a projection may apply: only those whose writing transaction has finished
-- (writer_xid below the xmin of the current snapshot, commands/sql/tally_writer_xid.sql), in (writer_xid, global_position) order,
-- after a two-part checkpoint. Reading by global_position alone would skip, forever, an event whose
-- transaction commits after a later-numbered one was read: positions are drawn at insert, not at
-- commit. Proven by tests/integration/test_projector.py.
--
-- Each stream's events come out in version order: an event's writer_xid is never below that of
-- its stream's previous event (tally_stream_writer_xid, commands/sql/tally_writer_xid.sql; the
-- event feed, GET /v1/events, relies on it). Events written before migration 0011 may not be
-- (a transaction's id is assigned at its first write, which may come before it waits for a
-- wallet's lock), so every projection stays order-insensitive: balances add deltas (they commute),
-- versions keep the greatest, history rows are keyed by (user_id, wallet_version), and each wallet
-- row counts the events applied to it so that a read can tell a complete wallet from one with a
-- gap (projections/queries.py).
CREATE OR REPLACE FUNCTION tally_next_events(p_after_xid xid8, p_after_position bigint, p_limit int)
RETURNS SETOF events LANGUAGE sql STABLE AS $$
    SELECT *
      FROM events
     WHERE writer_xid < tally_finished_below()
       AND (writer_xid, global_position) > (p_after_xid, p_after_position)
     ORDER BY writer_xid, global_position
     LIMIT p_limit
$$;
