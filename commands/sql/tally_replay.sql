-- The answer to a command whose Idempotency-Key is already recorded: the stored outcome and
-- response, replayed, when the request is the same (same fingerprint: the request's, bound to its
-- client; or the bare request's, stored by a command recorded before callers had identities and
-- adopted by this client, `tally keys adopt`; or either of those computed the way Tally did before
-- fingerprints sorted the keys of JSON objects, `p_legacy`, given when it differs); otherwise
-- the key was used for a different request, which is refused (and not recorded: the key keeps its
-- first outcome). A committed row always has its outcome; one without (written behind the
-- functions' back) is refused loudly rather than replayed as nothing.
DROP FUNCTION IF EXISTS tally_replay(commands, uuid, bytea);
CREATE OR REPLACE FUNCTION tally_replay(
    p_prior commands, p_client uuid, p_request bytea, p_legacy bytea,
    OUT outcome text, OUT body text, OUT replayed boolean
) LANGUAGE plpgsql STABLE AS $$
BEGIN
    IF p_prior.outcome IS NULL OR p_prior.response IS NULL THEN
        RAISE EXCEPTION 'command % is recorded without its outcome', p_prior.command_id
            USING ERRCODE = 'data_corrupted';
    END IF;
    replayed := p_prior.fingerprint IN (tally_fingerprint(p_client, p_request), p_request)
                OR (p_legacy IS NOT NULL
                    AND p_prior.fingerprint IN (tally_fingerprint(p_client, p_legacy), p_legacy));
    outcome := CASE WHEN replayed THEN p_prior.outcome ELSE 'idempotency_key_reused' END;
    body := CASE WHEN replayed THEN p_prior.response::text ELSE tally_key_reused()::text END;
END $$;

-- The refusal of a key used again for a different request (within a batch too).
CREATE OR REPLACE FUNCTION tally_key_reused() RETURNS jsonb LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT tally_rejection('idempotency_key_reused', 'this Idempotency-Key was used for a different request')
$$;
