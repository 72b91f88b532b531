-- Webhooks: subscriptions, their signing secrets, and the dispatcher's deliveries (projections/
-- webhooks.py, projections/dispatcher.py). Operational state, not history: the ledger's events stay
-- the only record of what happened; these tables say who was told, and when.

-- A client's subscription to the event feed. `cursor_*` is where the dispatcher has enqueued the
-- subscription's deliveries to, in the feed's order; `create_key` is the Idempotency-Key of the
-- POST that made it (a namespace of its own per client, as batches' keys are).
CREATE TABLE webhooks (
    webhook_id      uuid PRIMARY KEY,
    client_id       uuid NOT NULL REFERENCES clients (client_id),
    url             text NOT NULL,
    types           text[],  -- NULL: every event type
    description     text,
    create_key      text NOT NULL,
    fingerprint     bytea NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    cursor_xid      xid8 NOT NULL,
    cursor_position bigint NOT NULL,
    attempts        bigint NOT NULL DEFAULT 0,  -- every attempt to deliver, and those that failed
    failures        bigint NOT NULL DEFAULT 0,
    UNIQUE (client_id, create_key)
);

-- A subscription's signing secrets: one, or two while a rotation's grace period lasts. Only a salt
-- is stored; the secret is HMAC-SHA256(TALLY_WEBHOOK_KEY, salt), so the database alone cannot sign.
-- `rotate_key`: the Idempotency-Key of the rotation that made it (NULL for the first).
CREATE TABLE webhook_secrets (
    webhook_id  uuid NOT NULL REFERENCES webhooks (webhook_id),
    salt        bytea NOT NULL CHECK (length(salt) = 32),
    rotate_key  text,
    fingerprint bytea,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,  -- NULL: the current secret; else the end of a rotated one's grace
    PRIMARY KEY (webhook_id, salt),
    UNIQUE (webhook_id, rotate_key)
);

-- One row per (subscription, event) the dispatcher must deliver, in the feed's order. Sent only
-- when it is its wallet's earliest undelivered one for the subscription; `delivered` on a 2xx,
-- `parked` after a failed attempt TALLY_WEBHOOK_RETRY_SECONDS after it was enqueued. A replay sets
-- it pending again with a new `enqueued_at`, which the outcome of an attempt begun before must
-- match to be recorded.
CREATE TABLE webhook_deliveries (
    webhook_id      uuid NOT NULL REFERENCES webhooks (webhook_id),
    writer_xid      xid8 NOT NULL,
    global_position bigint NOT NULL,
    event_id        uuid NOT NULL,
    stream_id       text NOT NULL,
    status          text NOT NULL CHECK (status IN ('pending', 'delivered', 'parked')),
    attempts        int NOT NULL DEFAULT 0,
    enqueued_at     timestamptz NOT NULL DEFAULT now(),
    first_attempt_at timestamptz,
    last_attempt_at timestamptz,
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status     int,  -- the receiver's HTTP status of the last attempt; NULL: no answer
    last_error      text,
    delivered_at    timestamptz,
    PRIMARY KEY (webhook_id, writer_xid, global_position)
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (webhook_id, next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_stream ON webhook_deliveries (webhook_id, stream_id, writer_xid, global_position)
    WHERE status = 'pending';
CREATE INDEX webhook_deliveries_parked ON webhook_deliveries (webhook_id) WHERE status = 'parked';

-- A replay's record: who asked to re-send from where (POST /v1/webhooks/{id}/replay).
CREATE TABLE webhook_replays (
    webhook_id  uuid NOT NULL REFERENCES webhooks (webhook_id),
    replay_key  text NOT NULL,
    fingerprint bytea NOT NULL,
    after_xid   xid8 NOT NULL,
    after_position bigint NOT NULL,
    replayed    bigint NOT NULL,  -- deliveries set pending again
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (webhook_id, replay_key)
);
