-- Each stream's newest writer_xid (commands/sql/tally_writer_xid.sql, tally_stream_writer_xid): an
-- event appended to a stream never carries a writer_xid below it, so the commit-order reader
-- (projections/sql/tally_next_events.sql), and the event feed it serves (GET /v1/events), give
-- each stream's events in version order. Events written before this migration keep the order they
-- were written in; the first event after it follows every event of its stream.
ALTER TABLE streams ADD COLUMN last_writer_xid xid8 NOT NULL DEFAULT '0';
UPDATE streams s SET last_writer_xid = e.newest
  FROM (SELECT stream_id, max(writer_xid) AS newest FROM events GROUP BY stream_id) e
 WHERE e.stream_id = s.stream_id;
