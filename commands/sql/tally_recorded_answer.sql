-- The stored answer under a command's Idempotency-Key, when the key is recorded (replayed, or
-- idempotency_key_reused for a different request: tally_replay); no row when it is not. The
-- lifecycle commands (tally_reverse_transaction, tally_capture_hold, tally_void_hold,
-- tally_place_hold) ask it, through tally_recorded_or, before refusing a command whose target
-- does not exist, so a retry of a recorded command is answered as recorded, and nothing is
-- claimed for a refusal that records nothing. `p_command` is commands.event_store.CommandRecord as JSON.
CREATE OR REPLACE FUNCTION tally_recorded_answer(p_command jsonb)
RETURNS TABLE (outcome text, body text, replayed boolean) LANGUAGE sql STABLE AS $$
    SELECT r.outcome, r.body, r.replayed
      FROM commands c,
           tally_replay(c, (p_command ->> 'client')::uuid, (p_command ->> 'fingerprint')::bytea,
                        (p_command ->> 'legacy_fingerprint')::bytea) r
     WHERE c.client_id = (p_command ->> 'client')::uuid AND c.command_id = p_command ->> 'key'
$$;

-- Whether the calling client may use `p_asset`: `assets` in the command record lists the assets
-- its key is limited to (absent or null: every asset). The lifecycle commands learn the asset from
-- the transaction or hold they act on, so they check here what the API checks for the others.
CREATE OR REPLACE FUNCTION tally_asset_allowed(p_command jsonb, p_asset text) RETURNS boolean
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_typeof(p_command -> 'assets') IS DISTINCT FROM 'array' OR (p_command -> 'assets') ? p_asset
$$;

-- The refusal of a command on an asset the client's key may not use (not recorded; HTTP 403).
CREATE OR REPLACE FUNCTION tally_asset_forbidden(p_asset text) RETURNS TABLE (outcome text, body text, replayed boolean)
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT 'forbidden', tally_rejection('forbidden', format('this key may not use asset %s', p_asset),
                                        jsonb_build_object('asset', p_asset))::text, false
$$;

-- A lifecycle command whose transaction, hold, wallet or asset does not exist: the answer recorded
-- under its key when there is one (a retry of a recorded command), else `p_refusal` (not recorded).
CREATE OR REPLACE FUNCTION tally_recorded_or(p_command jsonb, p_refusal jsonb)
RETURNS TABLE (outcome text, body text, replayed boolean) LANGUAGE plpgsql STABLE AS $$
BEGIN
    RETURN QUERY SELECT * FROM tally_recorded_answer(p_command);
    IF NOT FOUND THEN
        RETURN QUERY SELECT p_refusal ->> 'code', p_refusal::text, false;
    END IF;
END $$;

-- Steps 1 and 2 of a lifecycle command, in the order every command that waits for a wallet keeps:
-- lock the wallet's row (waiting at most lock_timeout), then claim the key (tally_claim_command).
-- Returns the locked stream row, and the answer to give when the key is recorded (replayed, or
-- idempotency_key_reused), or a NULL outcome when this transaction now owns the key.
CREATE OR REPLACE FUNCTION tally_lock_and_claim(
    p_command jsonb, p_stream_id text,
    OUT o_stream streams, OUT o_outcome text, OUT o_body text, OUT o_replayed boolean
) LANGUAGE plpgsql AS $$
DECLARE
    v_client uuid := (p_command ->> 'client')::uuid;
    v_prior commands;
BEGIN
    SELECT * INTO STRICT o_stream FROM streams WHERE stream_id = p_stream_id FOR UPDATE;
    v_prior := tally_claim_command(v_client, p_command ->> 'key');
    IF v_prior.command_id IS NOT NULL THEN
        SELECT r.outcome, r.body, r.replayed INTO o_outcome, o_body, o_replayed
          FROM tally_replay(v_prior, v_client, (p_command ->> 'fingerprint')::bytea,
                            (p_command ->> 'legacy_fingerprint')::bytea) r;
    END IF;
END $$;
