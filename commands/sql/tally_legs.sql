-- The legs of a transaction of a flow, computed once, here, from the flow's row in the flows table
-- (written by `tally migrate` from domain/flows.py): the flow's system account by the opposite of
-- the user's leg, then the user by `user_sign` times the amount. Every leg set sums to zero and
-- names exactly one user, so credits stay closed-loop. Used by the decider
-- (tally_post_transactions) and by `tally verify`, which checks every stored transaction against
-- it; tests/integration/test_definitions.py checks it for every flow. A plain expression, so it is
-- inlined where it is called: no query per transaction.
CREATE OR REPLACE FUNCTION tally_legs(p_flow flows, p_user_id text, p_amount bigint) RETURNS jsonb
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_array(
               jsonb_build_object('account', 'system:' || p_flow.system_account,
                                  'amount', -p_flow.user_sign * p_amount),
               jsonb_build_object('account', 'user:' || p_user_id, 'amount', p_flow.user_sign * p_amount))
$$;
