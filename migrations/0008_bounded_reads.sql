-- A wallet's balance of one asset after any version, found by index (projections/sql/
-- tally_wallet_as_of.sql): the newest event of that asset at or before the version, which states
-- the balance after it. Without it, "as of" read the wallet's whole history.
CREATE INDEX events_balance_by_asset ON events (stream_id, (data ->> 'asset'), stream_version)
    WHERE data ? 'balance_after';

-- Events of a type this release has no rule for are rare (a newer release wrote them); as-of says
-- how many it left out, and finds them by this index, which holds only them (the list is the
-- release's event types; one it misses is still found, through the function's own check).
CREATE INDEX events_of_unknown_types ON events (stream_id, stream_version)
    WHERE event_type NOT IN ('AssetDefined', 'WalletOpened', 'CreditsToppedUp', 'BonusGranted', 'CreditsSpent');

-- What is added to this cluster's transaction ids to make an event's writer_xid (one row). It is
-- 0 unless the database was restored from a dump (or moved by logical replication) into a cluster
-- whose transaction ids are behind the ones its events carry: new events would then sort before
-- the projections' checkpoints and never be projected. `tally migrate` raises it past every
-- writer_xid in the events (commands/sql/tally_writer_xid.sql); until then commands are refused.
CREATE TABLE writer_xid_offset (
    only_row   boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    offset_by  bigint NOT NULL DEFAULT 0 CHECK (offset_by >= 0),
    changed_at timestamptz
);
INSERT INTO writer_xid_offset DEFAULT VALUES;
