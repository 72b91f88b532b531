-- The stored answer under a command's Idempotency-Key, when the key is recorded (replayed, or
-- idempotency_key_reused for a different request: tally_replay); no row when it is not. The
-- lifecycle commands (tally_reverse_transaction, tally_capture_hold, tally_void_hold,
-- tally_place_hold) ask it before refusing a command whose target does not exist, so a retry of a
-- recorded command is answered as recorded, and nothing is claimed for a refusal that records
-- nothing. `p_command` is commands.event_store.CommandRecord as JSON.
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
