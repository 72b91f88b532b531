-- Reversals and holds (the purchase lifecycle). New event types: CreditsReversed and HoldCaptured
-- (transactions), HoldPlaced, HoldVoided and HoldExpired (holds: they move no credits). The
-- decisions live in commands/sql (tally_reverse_transaction, tally_place_hold, tally_capture_hold,
-- tally_void_hold, tally_expire_wallet_holds); a wallet's active holds are part of its stream snapshot
-- (`state.holds`), so every decision on a wallet reads one locked row.

-- 1. The outcomes a command now records: the new decisions on the ledger's state.
ALTER TABLE commands DROP CONSTRAINT commands_outcome_recorded;
ALTER TABLE commands ADD CONSTRAINT commands_outcome_recorded CHECK (
    outcome IN ('accepted', 'insufficient_funds', 'version_mismatch', 'wallet_exists', 'asset_exists',
                'reversal_exceeds_remaining', 'not_reversible', 'capture_exceeds_hold', 'hold_expired',
                'hold_not_active'));

-- 2. The reversals of a transaction, found by index: the decider sums them under the wallet's lock
--    (a transaction's reversals live on its wallet's stream), verify and as-of read them.
CREATE INDEX events_reversals ON events ((data ->> 'reverses')) WHERE event_type = 'CreditsReversed';

-- 3. A hold's lifecycle events, found by index: a capture or void of a hold that is no longer
--    active reads its end here; as-of reads the holds of a wallet at a cut.
CREATE INDEX events_hold_lifecycle ON events ((data ->> 'hold_id'), stream_version)
    WHERE event_type IN ('HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired');
CREATE INDEX events_holds_by_wallet ON events (stream_id, stream_version)
    WHERE event_type IN ('HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired');

-- 4. The index of event types this release has no rule for: its list is this release's.
DROP INDEX events_of_unknown_types;
CREATE INDEX events_of_unknown_types ON events (stream_id, stream_version)
    WHERE event_type NOT IN ('AssetDefined', 'WalletOpened', 'CreditsToppedUp', 'BonusGranted', 'CreditsSpent',
                             'CreditsReversed', 'HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired');

-- 5. The history read model names what a transaction reverses, the hold it captured, and why.
ALTER TABLE rm_transactions
    ADD COLUMN reverses uuid,
    ADD COLUMN hold_id uuid,
    ADD COLUMN reason text;
CREATE INDEX rm_transactions_reversals ON rm_transactions (reverses) WHERE reverses IS NOT NULL;

-- 6. The holds read model (projection `wallets`). Events of one wallet may be applied out of
--    version order (projections/sql/tally_next_events.sql), so every column is filled in whatever
--    order its events come: `amount` and the rest from HoldPlaced, `captured` a sum, `released`
--    and `status` from the one event that ends the hold. A hold whose HoldPlaced is not applied yet
--    has no amount; queries wait for the wallet to be complete (rm_wallets.events_applied).
CREATE TABLE rm_holds (
    hold_id           uuid PRIMARY KEY,
    user_id           text NOT NULL,
    asset             text NOT NULL,
    amount            bigint,
    captured          bigint NOT NULL DEFAULT 0,
    released          bigint NOT NULL DEFAULT 0,
    status            text NOT NULL DEFAULT 'active'
                      CHECK (status IN ('active', 'captured', 'voided', 'expired')),
    expires_at        timestamptz,
    reference         text,
    metadata          jsonb,
    wallet_version    bigint,
    created_at        timestamptz,
    ended_at          timestamptz,
    consistency_token text
);
CREATE INDEX rm_holds_by_wallet ON rm_holds (user_id, wallet_version);
-- The holds past their expiry that no HoldExpired records yet: where `tally projector` looks for
-- the expiries to record (commands/expiry.py).
CREATE INDEX rm_holds_expiring ON rm_holds (expires_at) WHERE status = 'active';
