-- The write model gets one source: from here on, every function, trigger function and trigger
-- lives in one file of commands/sql or projections/sql, which `tally migrate` applies right after
-- the numbered files, in the same transaction. This file changes schema and data only.

-- 1. The functions 0001–0005 defined, with the triggers that use them: dropped here, created again
--    from their source files a moment later (a new database, built from 0005_baseline.sql, has
--    none of them: every drop is then a no-op).
DROP FUNCTION IF EXISTS
    tally_reject_change(),
    tally_command_outcome_once(),
    tally_event_bytes(text, bigint, uuid, text, jsonb, jsonb, timestamptz),
    tally_genesis_hash(),
    tally_timestamp_text(timestamptz),
    tally_claim_command(text, bytea, jsonb),
    tally_record_outcome(text, int, jsonb, text, uuid),
    tally_append_event(text, bigint, bytea, uuid, text, jsonb, jsonb, timestamptz),
    tally_define_asset(text, bytea, jsonb, uuid, text, text, int),
    tally_open_wallet(text, bytea, jsonb, uuid, text, jsonb),
    tally_post_transaction(text, bytea, jsonb, uuid, text, text, text, text, bigint, bigint, jsonb, text,
                           jsonb, bigint),
    tally_replay(commands, bytea),
    tally_flow_legs(text, text, bigint),
    tally_post_transactions(text[], bytea[], jsonb[], uuid[], text[], text[], text[], text[], bigint[],
                            bigint[], jsonb[], text[], jsonb[], bigint[]),
    tally_next_events(xid8, bigint, int),
    tally_event_legs(jsonb),
    tally_checkpoint_advance(text, int, xid8, bigint),
    tally_project_wallets(int),
    tally_project_history(int),
    tally_project_system(int),
    tally_projection_lag(text)
    CASCADE;

-- 2. The writing transaction's id, named so that nobody takes it for a ledger transaction id
--    (`data.transaction_id` is the ledger's).
ALTER TABLE events RENAME COLUMN transaction_id TO writer_xid;

-- 3. Commands store the domain outcome (`accepted`, `insufficient_funds`, `version_mismatch`, …),
--    not an HTTP status: the API chooses statuses (api/errors.py). A command row is now written
--    once, complete, so outcome and response are never empty. Stored responses are untouched: a
--    retry keeps getting byte for byte the answer it got before.
ALTER TABLE commands ADD COLUMN outcome text;
UPDATE commands SET outcome = CASE WHEN status = 201 THEN 'accepted' ELSE response ->> 'code' END;
ALTER TABLE commands
    DROP COLUMN status,
    ALTER COLUMN outcome SET NOT NULL,
    ALTER COLUMN response SET NOT NULL;

-- 4. The flows as data: kind -> event type, the system account on the other side, and the sign of
--    the user's leg. `tally migrate` writes domain/flows.py (FLOWS) here and refuses to change a
--    flow that is already written; the decider and `tally verify` read the legs from this table.
CREATE TABLE flows (
    kind           text PRIMARY KEY,
    event_type     text NOT NULL UNIQUE,
    system_account text NOT NULL,
    user_sign      smallint NOT NULL CHECK (user_sign IN (-1, 1))
);

-- 5. The history projection's own account of each wallet: how many of its events it has applied
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
