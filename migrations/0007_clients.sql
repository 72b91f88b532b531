-- Callers have identities: clients with scopes and hashed secrets, idempotency keys in the
-- client's namespace, and the client's name on every transaction. Like 0006, it replaces the
-- command functions the previous release's API calls: stop that release's API before migrating.
LOCK TABLE commands IN ACCESS EXCLUSIVE MODE;

-- The functions whose signature changes (they gain the client); redefined in commands/sql.
DROP FUNCTION IF EXISTS
    tally_claim_command(text, bytea, jsonb),
    tally_record_outcome(text, text, jsonb, text, uuid),
    tally_replay(commands, bytea);

-- A client is a named caller with scopes (api/auth.py); it holds one or two
-- live secrets (two only while rotating), stored as SHA-256 hashes: a secret is 256 random bits, so
-- a fast hash is the right one (nothing to brute-force), and the API checks it in constant time.
-- Clients are written by `tally keys` (the schema owner), read by the API.
CREATE TABLE clients (
    client_id  uuid PRIMARY KEY,
    name       text NOT NULL UNIQUE CHECK (name ~ '^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$'),
    scopes     text[] NOT NULL,
    assets     text[],                          -- NULL: every asset
    rate_limit int CHECK (rate_limit > 0),      -- requests per second; NULL: TALLY_RATE_LIMIT
    created_at timestamptz NOT NULL DEFAULT now(),
    expires_at timestamptz,                     -- every secret of the client fails from then on
    revoked_at timestamptz
);

CREATE TABLE client_secrets (
    secret_id   text PRIMARY KEY,               -- the secret's public part, to find its hash
    client_id   uuid NOT NULL REFERENCES clients,
    secret_hash bytea NOT NULL CHECK (length(secret_hash) = 32),
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz                     -- set by a rotation: the end of its grace period
);
CREATE INDEX client_secrets_by_client ON client_secrets (client_id);

-- Idempotency keys live in the client's namespace. The commands recorded before this release had
-- no caller: they belong to the client `before-identities`, which holds no secret and can never
-- authenticate, so their keys replay to nobody and no new caller collides with them, until an
-- operator gives them to the one client that sent them (`tally keys adopt NAME`: its retries then
-- replay). The demo data's belong to `tally-seed`, the client `tally seed` commands as (so seeding
-- again still replays).
INSERT INTO clients (client_id, name, scopes, revoked_at) VALUES
    ('00000000-0000-0000-0000-000000000000', 'before-identities', '{}', now()),
    ('00000000-0000-0000-0000-000000000001', 'tally-seed', '{}', now());
-- No foreign key to clients: its check would take a KEY SHARE lock on the client's row for every
-- command, and a busy client's row, shared by many concurrent transactions, would cost a MultiXact
-- each time (measured: bench/). The API writes only authenticated clients' ids; `tally verify`
-- checks that every command's client exists.
ALTER TABLE commands ADD COLUMN client_id uuid;
UPDATE commands
   SET client_id = CASE WHEN starts_with(command_id, 'seed:') THEN '00000000-0000-0000-0000-000000000001'::uuid
                        ELSE '00000000-0000-0000-0000-000000000000'::uuid END;
ALTER TABLE commands
    ALTER COLUMN client_id SET NOT NULL,
    DROP CONSTRAINT commands_pkey,
    ADD PRIMARY KEY (client_id, command_id);

-- Who did it: the client's name on every transaction (NULL for those recorded before identities).
ALTER TABLE rm_transactions ADD COLUMN created_by text;
