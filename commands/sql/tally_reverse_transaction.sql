-- ReverseTransaction: a new transaction on the original's wallet whose legs negate the original's
-- for `amount` (default: all that remains), linked to it by `reverses`, exactly once per client's
-- Idempotency-Key. `p_command` is commands.event_store.CommandRecord as JSON: {key, client,
-- fingerprint, legacy_fingerprint, context, assets, command: {transaction_id, amount, reason,
-- reference, metadata}}.
--
-- Outcomes: `accepted`; `reversal_exceeds_remaining` (the reversals of one transaction never add up
-- to more than its amount), `not_reversible` (a reversal is not reversed), `insufficient_funds`
-- (taking credits back would leave less than the wallet's holds reserve): recorded and replayed;
-- `transaction_not_found` and `forbidden` (an asset the key may not use): refused without a record.
--
-- Order: the original is found first, unlocked (events never change); then its wallet's row is
-- locked (waiting at most lock_timeout), and only then is the key claimed. Every command that waits
-- for a wallet takes the wallet before the key (so do the retried batches of
-- tally_post_transactions), so no two of them can wait for each other. All reversals of a
-- transaction are on its wallet's stream: under that lock their sum (events_reversals) is the
-- whole of it. Proven by tests/integration/test_lifecycle.py (twenty concurrent reversals).
CREATE OR REPLACE FUNCTION tally_reverse_transaction(p_command jsonb)
RETURNS TABLE (outcome text, body text, replayed boolean) LANGUAGE plpgsql
SECURITY DEFINER SET search_path FROM CURRENT
-- Every lookup here is by an index; planned with sequential scans off, so statistics far behind
-- the tables' sizes cannot turn them into scans (measured on the key lookup: tally_claim_command).
SET enable_seqscan = off AS $$
DECLARE
    v_key text := p_command ->> 'key';
    v_client uuid := (p_command ->> 'client')::uuid;
    v_context jsonb := (p_command -> 'context') || jsonb_build_object('command_id', v_key, 'client_id', v_client);
    v_cmd jsonb := p_command -> 'command';
    v_target uuid := (v_cmd ->> 'transaction_id')::uuid;
    v_original events;
    v_stream streams;
    v_writer xid8;
    v_claim record;
    v_asset text;
    v_user_id text;
    v_now timestamptz;
    v_reversed bigint;
    v_remaining bigint;
    v_amount bigint;
    v_entries jsonb;
    v_delta bigint;
    v_balance numeric;
    v_held numeric;
    v_after numeric;
    v_event_id uuid;
    v_data jsonb;
    v_event record;
    v_body jsonb;
BEGIN
    SELECT e.* INTO v_original FROM events e LEFT JOIN flows f ON f.event_type = e.event_type
     WHERE e.event_id = v_target AND tally_event_kind(e.event_type, f.kind IS NOT NULL) = 'transaction';
    IF NOT FOUND THEN
        RETURN QUERY SELECT * FROM tally_recorded_or(p_command, tally_rejection('transaction_not_found', format('no transaction %s', v_target)));
        RETURN;
    END IF;
    v_asset := v_original.data ->> 'asset';
    v_user_id := v_original.data ->> 'user_id';
    IF NOT tally_asset_allowed(p_command, v_asset) THEN
        RETURN QUERY SELECT * FROM tally_asset_forbidden(v_asset);
        RETURN;
    END IF;
    SELECT * INTO v_claim FROM tally_lock_and_claim(p_command, v_original.stream_id);
    IF v_claim.o_outcome IS NOT NULL THEN
        RETURN QUERY SELECT v_claim.o_outcome, v_claim.o_body, v_claim.o_replayed;
        RETURN;
    END IF;
    v_stream := v_claim.o_stream;
    v_now := greatest(clock_timestamp(), v_stream.updated_at);
    IF v_original.event_type = 'CreditsReversed' THEN
        outcome := 'not_reversible';
        v_body := tally_rejection('not_reversible', format('transaction %s is a reversal: it cannot be reversed', v_target),
                                  jsonb_build_object('reverses', v_original.data -> 'reverses'));
    ELSE
        SELECT coalesce(sum((e.data ->> 'amount')::bigint), 0) INTO v_reversed
          FROM events e WHERE e.data ->> 'reverses' = v_target::text AND e.event_type = 'CreditsReversed';
        v_remaining := (v_original.data ->> 'amount')::bigint - v_reversed;
        v_amount := coalesce((v_cmd ->> 'amount')::bigint, v_remaining);
        v_entries := tally_reversal_legs(v_original.data -> 'entries', v_amount);
        SELECT coalesce(sum((l ->> 'amount')::bigint), 0) INTO v_delta
          FROM jsonb_array_elements(v_entries) l WHERE l ->> 'account' = 'user:' || v_user_id;
        v_balance := coalesce((v_stream.state -> 'balances' ->> v_asset)::numeric, 0);
        v_after := v_balance + v_delta;
        v_held := tally_held(v_stream.state, v_asset, v_now);
        IF v_amount > v_remaining OR v_amount < 1 THEN
            outcome := 'reversal_exceeds_remaining';
            v_body := tally_rejection('reversal_exceeds_remaining',
                CASE WHEN v_remaining = 0 THEN format('transaction %s is reversed in full', v_target)
                     ELSE format('transaction %s has %s left to reverse, less than the %s requested', v_target,
                                 v_remaining, v_amount) END,
                jsonb_build_object('remaining', v_remaining, 'amount', v_amount));
        ELSIF v_delta < 0 AND v_after - v_held < 0 THEN
            outcome := 'insufficient_funds';
            v_body := tally_rejection('insufficient_funds',
                format('wallet %s has %s %s available, less than the %s to take back', v_user_id,
                       v_balance - v_held, v_asset, -v_delta),
                jsonb_build_object('balance', v_balance, 'held', v_held, 'available', v_balance - v_held,
                                   'amount', v_amount));
        ELSE
            outcome := 'accepted';
            v_event_id := gen_random_uuid();
            v_data := jsonb_build_object(
                'transaction_id', v_event_id, 'kind', 'reversal', 'user_id', v_user_id, 'asset', v_asset,
                'amount', v_amount, 'entries', v_entries, 'reference', v_cmd ->> 'reference',
                'metadata', coalesce(v_cmd -> 'metadata', '{}'), 'balance_after', v_after,
                'reverses', v_target, 'reason', v_cmd ->> 'reason');
            v_writer := tally_stream_writer_xid(v_stream.last_writer_xid);
            v_event := tally_append_event(v_stream.stream_id, v_stream.version + 1, v_stream.last_hash, v_event_id,
                                          'CreditsReversed', v_data, v_context, v_now, v_writer);
            UPDATE streams
               SET version = v_stream.version + 1,
                   state = jsonb_set(v_stream.state, ARRAY['balances', v_asset], to_jsonb(v_after)),
                   last_hash = v_event.o_hash,
                   last_writer_xid = v_writer,
                   updated_at = v_now
             WHERE stream_id = v_stream.stream_id;
            v_body := v_data || jsonb_build_object('wallet_version', v_stream.version + 1,
                                                   'created_by', v_context ->> 'created_by',
                                                   'created_at', tally_timestamp_text(v_now),
                                                   'consistency_token', v_event.o_token);
        END IF;
    END IF;
    PERFORM tally_record_outcome(v_client, v_key, (p_command ->> 'fingerprint')::bytea, v_context, outcome, v_body, v_stream.stream_id, v_event_id);
    body := v_body::text;
    replayed := false;
    RETURN NEXT;
END $$;
