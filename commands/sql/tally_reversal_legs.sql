-- The legs of a reversal of `p_amount` of a transaction whose legs are `p_entries`: each leg
-- negated, for that amount (every flow's legs move exactly its amount, one way or the other:
-- tally_legs). Used by the decider (tally_reverse_transaction) and by `tally verify`, which checks
-- every stored reversal against it.
CREATE OR REPLACE FUNCTION tally_reversal_legs(p_entries jsonb, p_amount bigint) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT jsonb_agg(jsonb_build_object('account', l.leg ->> 'account',
                                        'amount', -sign((l.leg ->> 'amount')::bigint)::bigint * p_amount)
                     ORDER BY l.i)
      FROM jsonb_array_elements(p_entries) WITH ORDINALITY AS l(leg, i)
$$;
