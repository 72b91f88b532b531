-- Baseline: the schema that 0001_event_store.sql … 0005_wallet_completeness.sql built, folded into
-- one file, without their functions and triggers (those now live in commands/sql and
-- projections/sql, applied by `tally migrate` after the numbered files). A new database gets this
-- file as version 5; a database that applied those five files is already here, and `tally migrate`
-- recognises it by their recorded checksums (api/migrate.py, HISTORY). Later files change this
-- schema: read them in order.

-- One row per stream: a wallet (`wallet:<user_id>`) or an asset definition (`asset:<CODE>`).
-- `state` is the snapshot the write side decides on (a wallet's balances per asset), so a command
-- never replays a stream. `last_hash` is the head of the stream's hash chain.
CREATE TABLE streams (
    stream_id   text PRIMARY KEY,
    stream_type text NOT NULL CHECK (stream_type IN ('asset', 'wallet')),
    version     bigint NOT NULL CHECK (version >= 1),
    state       jsonb NOT NULL,
    last_hash   bytea NOT NULL CHECK (length(last_hash) = 32),
    created_at  timestamptz NOT NULL,
    updated_at  timestamptz NOT NULL
);

-- The immutable history. `transaction_id` (renamed `writer_xid` by 0006) is the writing
-- transaction's id, which the projectors order by.
CREATE TABLE events (
    global_position bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    stream_id       text NOT NULL,
    stream_version  bigint NOT NULL CHECK (stream_version >= 1),
    event_id        uuid NOT NULL UNIQUE,
    event_type      text NOT NULL,
    data            jsonb NOT NULL,
    metadata        jsonb NOT NULL,
    hash            bytea NOT NULL CHECK (length(hash) = 32),
    transaction_id  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    recorded_at     timestamptz NOT NULL,
    -- The last line of defence against two writers appending the same version.
    UNIQUE (stream_id, stream_version)
);
CREATE INDEX events_commit_order ON events (transaction_id, global_position);

-- The idempotency record: one row per Idempotency-Key (`status` becomes `outcome` in 0006).
CREATE TABLE commands (
    command_id  text PRIMARY KEY,
    fingerprint bytea NOT NULL,
    status      smallint,
    response    jsonb,
    stream_id   text,
    event_id    uuid,
    metadata    jsonb NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

-- Where each projection stands, which read-model generation is live (bumped by `tally rebuild`),
-- and the event that stopped it, if any.
CREATE TABLE projection_checkpoints (
    name           text PRIMARY KEY,
    last_xid       xid8 NOT NULL DEFAULT '0',
    last_position  bigint NOT NULL DEFAULT 0,
    events_applied bigint NOT NULL DEFAULT 0,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    generation     int NOT NULL DEFAULT 1,
    rebuilt_at     timestamptz,
    error          text,
    error_position bigint,
    stopped_at     timestamptz
);
INSERT INTO projection_checkpoints (name) VALUES ('wallets'), ('history'), ('system');

-- The read models (projections/sql).
CREATE TABLE rm_assets (
    code       text PRIMARY KEY,
    name       text NOT NULL,
    decimals   int NOT NULL,
    created_at timestamptz NOT NULL
);

CREATE TABLE rm_wallets (
    user_id        text PRIMARY KEY,
    version        bigint NOT NULL,
    metadata       jsonb,
    created_at     timestamptz,
    events_applied bigint NOT NULL DEFAULT 0
);

CREATE TABLE rm_balances (
    user_id text NOT NULL,
    asset   text NOT NULL,
    balance numeric NOT NULL,
    PRIMARY KEY (user_id, asset)
);

CREATE TABLE rm_transactions (
    transaction_id    uuid PRIMARY KEY,
    user_id           text NOT NULL,
    wallet_version    bigint NOT NULL,
    kind              text NOT NULL,
    asset             text NOT NULL,
    amount            bigint NOT NULL,
    entries           jsonb NOT NULL,
    reference         text,
    metadata          jsonb NOT NULL,
    balance_after     numeric NOT NULL,
    created_at        timestamptz NOT NULL,
    consistency_token text NOT NULL,
    UNIQUE (user_id, wallet_version)
);
CREATE INDEX rm_transactions_by_asset ON rm_transactions (user_id, asset, wallet_version);

CREATE TABLE rm_system_balances (
    asset   text NOT NULL,
    account text NOT NULL,
    balance numeric NOT NULL,
    PRIMARY KEY (asset, account)
);
