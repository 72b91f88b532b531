-- The answer to a command whose Idempotency-Key is already recorded: the stored outcome and
-- response, replayed, when the request is the same (same fingerprint); otherwise the key was used
-- for a different request, which is refused (and not recorded: the key keeps its first outcome).
CREATE OR REPLACE FUNCTION tally_replay(
    p_prior commands, p_fingerprint bytea, OUT outcome text, OUT body text, OUT replayed boolean
) LANGUAGE sql IMMUTABLE AS $$
    SELECT CASE WHEN same THEN p_prior.outcome ELSE 'idempotency_key_reused' END,
           CASE WHEN same THEN p_prior.response::text ELSE tally_key_reused()::text END,
           same
      FROM (SELECT p_prior.fingerprint = p_fingerprint AS same) s
$$;

-- The refusal of a key used again for a different request (within a batch too).
CREATE OR REPLACE FUNCTION tally_key_reused() RETURNS jsonb LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT tally_rejection('idempotency_key_reused', 'this Idempotency-Key was used for a different request')
$$;
