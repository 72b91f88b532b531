-- A recorded batch, answered again: each command's outcome and replayed flag as first answered,
-- with its response from the batch's row or, for an outcome its command recorded, from that
-- command's row (found by its key: rows are never changed or removed). `same_request` says
-- whether this is the request that recorded it (else the key is refused as reused).
CREATE OR REPLACE FUNCTION tally_batch_answer(p_client uuid, p_key text, p_request bytea)
RETURNS TABLE (same_request boolean, applied boolean, outcome text, body text, replayed boolean)
LANGUAGE sql STABLE SET enable_seqscan = off AS $$
    SELECT b.fingerprint = tally_fingerprint(p_client, p_request), b.applied, r.e ->> 'outcome',
           coalesce(r.e -> 'body', c.response)::text, (r.e ->> 'replayed')::boolean
      FROM batches b
           CROSS JOIN LATERAL jsonb_array_elements(b.results) WITH ORDINALITY AS r(e, i)
           LEFT JOIN commands c ON NOT r.e ? 'body' AND c.client_id = b.client_id
                                   AND c.command_id = r.e ->> 'key'
     WHERE b.client_id = p_client AND b.batch_key = p_key
     ORDER BY r.i
$$;

-- The claim a batch's key holds while the batch is decided and recorded (commands/event_store.py,
-- EventStore.batch): a session advisory lock of its own class, so a batch's key never meets a
-- command's (tally_key_lock_class).
CREATE OR REPLACE FUNCTION tally_batch_lock_class() RETURNS int LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT tally_key_lock_class() + 1
$$;
