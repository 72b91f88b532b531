-- The legs of a transaction of `kind`, computed once, here, from the flows table (written by
-- `tally migrate` from domain/flows.py): the kind's system account by the opposite of the user's
-- leg, then the user by `user_sign` × amount. Every leg set sums to zero and names exactly one
-- user, so credits stay closed-loop. Used by the decider (tally_post_transactions) and by
-- `tally verify`, which checks every stored transaction against it. An unknown kind gives NULLs.
CREATE OR REPLACE FUNCTION tally_flow_legs(
    p_kind text, p_user_id text, p_amount bigint, OUT legs jsonb, OUT event_type text, OUT user_delta bigint
) LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT jsonb_build_array(
               jsonb_build_object('account', 'system:' || f.system_account, 'amount', -f.user_sign * p_amount),
               jsonb_build_object('account', 'user:' || p_user_id, 'amount', f.user_sign * p_amount)),
           f.event_type,
           f.user_sign * p_amount
      FROM flows f
     WHERE f.kind = p_kind
$$;
