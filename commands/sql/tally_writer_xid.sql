-- The order the projections read events in is (writer_xid, global_position), with writer_xid the
-- writing transaction's id plus this database's offset (writer_xid_offset). These functions are
-- the only places that turn transaction ids into writer_xids and back; with the offset at 0 (every
-- database that was never restored) they are the plain ids.
--
-- A logical restore (pg_dump, or a move by logical replication) keeps the events' writer_xids but
-- not the cluster's transaction counter, which may be far behind them. Then:
-- * tally_history_ahead() is true: some visible event carries a writer_xid at or past the snapshot's
--   xmax (offset), which no transaction of this history can have: a committed writer's id is
--   below the xmax of every snapshot that sees its events;
-- * tally_writer_xid() refuses to write (55000, object not in prerequisite state: the API answers
--   503), since its events would sort before the projections' checkpoints and never be read;
-- * the projections report it (projections/status.py), and `tally migrate` repairs it
--   (tally_rebase_writer_xids, below) before anything is written.
-- Proven by tests/integration/test_restore.py, with pg_dump and pg_restore between two clusters,
-- and a transaction that got its id before the repair and writes after it.

CREATE OR REPLACE FUNCTION tally_xid_offset() RETURNS bigint LANGUAGE sql STABLE AS $$
    SELECT offset_by FROM writer_xid_offset
$$;

-- The calling transaction's own writer_xid: its events carry it, or their stream's newest writer_xid
-- when that is greater (tally_stream_writer_xid, below). The offset and the check are read
-- in one statement (one snapshot): a repair committing in between could otherwise pair the old
-- offset with a history no longer ahead. The transaction's own events (an earlier call in it) are
-- below its own id + 1, so they never make it look ahead.
CREATE OR REPLACE FUNCTION tally_writer_xid() RETURNS xid8 LANGUAGE plpgsql AS $$
DECLARE
    v_offset bigint;
    v_mine bigint;
    v_ahead boolean;
BEGIN
    SELECT o.offset_by, x.mine,
           coalesce((SELECT max(writer_xid)::text::bigint FROM events)
                    >= greatest(x.xmax, x.mine + 1) + o.offset_by, false)
      INTO v_offset, v_mine, v_ahead
      FROM writer_xid_offset o,
           LATERAL (SELECT pg_current_xact_id()::text::bigint AS mine,
                           pg_snapshot_xmax(pg_current_snapshot())::text::bigint AS xmax) x;
    IF v_ahead THEN
        RAISE EXCEPTION 'this database''s transaction ids are behind the ids its events carry (was it '
                        'restored from another cluster?): run `tally migrate` before writing'
            USING ERRCODE = 'object_not_in_prerequisite_state';
    END IF;
    RETURN (v_mine + v_offset)::text::xid8;
END $$;

-- The writer_xid of an event appended to a stream whose newest event carries p_last (the stream's
-- last_writer_xid): the transaction's own, or p_last when that is greater. A transaction gets its id
-- at its first write, which may be another wallet's lock taken before it waits for this one; a
-- younger transaction may meanwhile append to this stream and commit. With its own id the older
-- one's event would sort before that younger event in the commit order, against the stream's
-- versions (proven by tests/integration/test_feed_order.py). Any writer_xid at or above the
-- transaction's own is safe for the reader: it reads only writer_xids below the xmin of its
-- snapshot, and a transaction's own id is below that only once it has finished; and an event's
-- position, drawn under the stream's lock, follows that of every earlier event of the stream.
CREATE OR REPLACE FUNCTION tally_stream_writer_xid(p_last xid8) RETURNS xid8 LANGUAGE sql AS $$
    SELECT greatest(tally_writer_xid(), p_last)
$$;

-- Events whose writer_xid is below this were written by transactions that have finished (the
-- xmin of the current snapshot, offset): what a projection may read.
CREATE OR REPLACE FUNCTION tally_finished_below() RETURNS xid8 LANGUAGE sql STABLE AS $$
    SELECT (pg_snapshot_xmin(pg_current_snapshot())::text::bigint + tally_xid_offset())::text::xid8
$$;

-- True when some event carries a writer_xid this cluster could not have given it yet. One probe
-- of the events' commit-order index.
CREATE OR REPLACE FUNCTION tally_history_ahead() RETURNS boolean LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT max(writer_xid) FROM events)
            >= (pg_snapshot_xmax(pg_current_snapshot())::text::bigint + tally_xid_offset())::text::xid8,
        false)
$$;

-- Run by `tally migrate` (as the owner, under its lock): raises the offset past every writer_xid
-- in the events when the history is ahead of this cluster. Measured from the snapshot's xmin, the
-- oldest id still running: a transaction that got its id before this repair and writes after it
-- lands past every restored event too (xmax would not do: running transactions may hold ids below
-- it; found in review). Returns the offset before and after.
CREATE OR REPLACE FUNCTION tally_rebase_writer_xids(OUT offset_before bigint, OUT offset_after bigint)
LANGUAGE plpgsql AS $$
BEGIN
    SELECT offset_by INTO STRICT offset_before FROM writer_xid_offset FOR UPDATE;
    offset_after := offset_before;
    IF tally_history_ahead() THEN
        offset_after := greatest(offset_before, (SELECT max(writer_xid)::text::bigint FROM events)
                                 - pg_snapshot_xmin(pg_current_snapshot())::text::bigint + 1);
        UPDATE writer_xid_offset SET offset_by = offset_after, changed_at = now();
    END IF;
END $$;
