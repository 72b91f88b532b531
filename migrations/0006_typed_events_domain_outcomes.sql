-- The write model gets one source: from here on, every function, trigger function and trigger
-- lives in one file of commands/sql or projections/sql, which `tally migrate` applies right after
-- the numbered files, in the same transaction. This file changes schema and data only.
--
-- It replaces the command functions the previous release's API calls: stop that release's API
-- before migrating, or a command sent to it meanwhile fails (its retry, with the same
-- Idempotency-Key, succeeds once this release serves). Its projectors may keep running: the
-- projection functions keep their names, and from the commit on they run this release's.
-- The locks come first, in an order that agrees with that release's (a command: commands, streams,
-- events; a projection batch and `tally verify`: projection_checkpoints first), so whatever still
-- runs finishes first and no projection batch runs while step 6 counts what the history projection
-- has applied. Do not run that release's `tally rebuild` meanwhile (step 5 drops its copies).
LOCK TABLE projection_checkpoints, commands, streams, events IN ACCESS EXCLUSIVE MODE;

-- 1. The functions of 0001–0005 whose signature or result changes, or that go away, and the
--    triggers that are renamed: dropped here. Every other function and trigger is redefined in
--    place (CREATE OR REPLACE, same name and signature, so a projector of the previous release still
--    running calls the new one). A new database, built from 0005_baseline.sql, has none of these:
--    every drop is then a no-op.
DROP FUNCTION IF EXISTS
    tally_record_outcome(text, int, jsonb, text, uuid),
    tally_define_asset(text, bytea, jsonb, uuid, text, text, int),
    tally_open_wallet(text, bytea, jsonb, uuid, text, jsonb),
    tally_post_transaction(text, bytea, jsonb, uuid, text, text, text, text, bigint, bigint, jsonb, text,
                           jsonb, bigint),
    tally_replay(commands, bytea),
    tally_flow_legs(text, text, bigint),
    tally_post_transactions(text[], bytea[], jsonb[], uuid[], text[], text[], text[], text[], bigint[],
                            bigint[], jsonb[], text[], jsonb[], bigint[]);
DROP TRIGGER IF EXISTS commands_no_delete ON commands;     -- now commands_append_only
DROP TRIGGER IF EXISTS commands_outcome_once ON commands;  -- redefined on `outcome` (step 3)

-- 2. The writing transaction's id, named so that nobody takes it for a ledger transaction id
--    (`data.transaction_id` is the ledger's).
ALTER TABLE events RENAME COLUMN transaction_id TO writer_xid;

-- 3. Commands store the domain outcome, not an HTTP status: the API chooses statuses
--    (api/errors.py). Only decisions on the ledger's state are recorded (the rest are refused
--    without writing anything): the check names them, and a release that records a new one adds it
--    here. Stored responses are untouched: a retry keeps getting byte for byte the answer it got
--    before. (The outcome is empty only while the claiming transaction runs; no committed row is
--    without one, which `tally verify` checks.)
ALTER TABLE commands ADD COLUMN outcome text;
UPDATE commands SET outcome = CASE WHEN status = 201 THEN 'accepted' ELSE response ->> 'code' END;
ALTER TABLE commands
    DROP COLUMN status,
    ADD CONSTRAINT commands_outcome_recorded CHECK (
        outcome IN ('accepted', 'insufficient_funds', 'version_mismatch', 'wallet_exists', 'asset_exists'));

-- 4. The flows as data: kind -> event type, the system account on the other side, and the sign of
--    the user's leg. `tally migrate` writes domain/flows.py (FLOWS) here and refuses to change a
--    flow that is already written; the decider and `tally verify` read the legs from this table.
CREATE TABLE flows (
    kind           text PRIMARY KEY,
    event_type     text NOT NULL UNIQUE,
    system_account text NOT NULL,
    user_sign      smallint NOT NULL CHECK (user_sign IN (-1, 1))
);

-- 5. An unfinished `tally rebuild` of the previous release cannot be resumed by this one (its copies
--    lack rm_history_wallets): it starts over.
DROP SCHEMA IF EXISTS rm_rebuild_wallets, rm_rebuild_history, rm_rebuild_system CASCADE;

-- 6. The history projection's own account of each wallet: how many of its events it has applied
--    and up to which version, so a history read knows it is complete without assuming which
--    versions are transactions. Filled for what the history projection had applied (at version 5
--    a wallet's events were WalletOpened and the three transaction types).
CREATE TABLE rm_history_wallets (
    user_id        text PRIMARY KEY,
    version        bigint NOT NULL,
    events_applied bigint NOT NULL,
    opened         boolean NOT NULL
);
INSERT INTO rm_history_wallets (user_id, version, events_applied, opened)
SELECT e.data ->> 'user_id', max(e.stream_version), count(*), bool_or(e.event_type = 'WalletOpened')
  FROM events e, projection_checkpoints cp
 WHERE cp.name = 'history'
   AND e.event_type IN ('WalletOpened', 'CreditsToppedUp', 'BonusGranted', 'CreditsSpent')
   AND (e.writer_xid, e.global_position) <= (cp.last_xid, cp.last_position)
 GROUP BY e.data ->> 'user_id';
