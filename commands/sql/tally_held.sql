-- What a wallet's active holds of one asset reserve at `p_now`: the remaining amounts of the holds in
-- its stream snapshot (`state.holds`: hold id -> {asset, remaining, expires_at}, the holds no event
-- has ended yet) that have not expired by then. A hold stops holding at its `expires_at` by the
-- database's clock, whether or not its HoldExpired is recorded yet (tally_expire_wallet_holds records it
-- later): no decision depends on a sweeper. Available = balance - this. Used by every decision that
-- takes credits from a wallet or reserves them (tally_post_transactions, tally_reverse_transaction,
-- tally_place_hold); a snapshot without holds costs one key test.
CREATE OR REPLACE FUNCTION tally_held(p_state jsonb, p_asset text, p_now timestamptz) RETURNS numeric
LANGUAGE sql STABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN p_state ? 'holds' THEN
               (SELECT coalesce(sum((h.value ->> 'remaining')::numeric), 0)
                  FROM jsonb_each(p_state -> 'holds') h
                 WHERE h.value ->> 'asset' = p_asset AND (h.value ->> 'expires_at')::timestamptz > p_now)
           ELSE 0 END
$$;

-- The snapshot with one hold's entry set (`p_entry`) or, given NULL, removed; `holds` is dropped
-- when it empties, so a wallet without active holds keeps the snapshot it had before holds existed.
CREATE OR REPLACE FUNCTION tally_with_hold(p_state jsonb, p_hold_id uuid, p_entry jsonb) RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE
               WHEN p_entry IS NOT NULL THEN
                   jsonb_set(p_state, '{holds}', coalesce(p_state -> 'holds', '{}') || jsonb_build_object(p_hold_id, p_entry))
               WHEN (p_state -> 'holds') - p_hold_id::text = '{}' THEN p_state - 'holds'
               ELSE jsonb_set(p_state, '{holds}', (p_state -> 'holds') - p_hold_id::text)
           END
$$;
