-- Batches (POST /v1/batches): the answer a batch's own Idempotency-Key replays. Each command of a
-- batch is recorded under its own key in `commands`, like a command sent alone; a batch's row
-- keeps only what that answer needs beyond them: each command's outcome and, for an outcome its
-- command does not record (a refusal without a record, or every refusal of an atomic batch that
-- applied nothing), its response (commands/sql/tally_record_batch.sql). Batch keys are a namespace
-- of their own, per client: a batch's key never meets a command's.
CREATE TABLE batches (
    client_id uuid NOT NULL REFERENCES clients (client_id),
    batch_key text NOT NULL,
    fingerprint bytea NOT NULL,
    atomic boolean NOT NULL,
    applied boolean NOT NULL,  -- false only for an atomic batch that was rejected
    results jsonb NOT NULL,    -- [{key, outcome, replayed, body?}], in request order
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (client_id, batch_key),
    CHECK (atomic OR applied),
    CHECK (jsonb_typeof(results) = 'array')
);
