"""`tally verify` passes a healthy ledger and names every kind of tampering.

Tampering is done the way a superuser would: with triggers disabled for the session
(session_replication_role = replica), straight in the tables."""

from __future__ import annotations

import asyncpg
import pytest

from commands import EventStore
from projections.verify import VerifyReport, verify
from tests.helpers import bonus, define_asset, open_wallet, projected, spend, top_up


async def _ledger(store: EventStore, pool: asyncpg.Pool) -> None:
    await define_asset(store, "GOLD")
    await define_asset(store, "GEMS")
    for user in ("ann", "ben"):
        await open_wallet(store, user)
        await top_up(store, user, 100)
        await bonus(store, user, 5, asset="GEMS")
        await spend(store, user, 30)
    await projected(pool)


async def _verify(pool: asyncpg.Pool) -> VerifyReport:
    async with pool.acquire() as conn:
        return await verify(conn)


async def _tamper(pool: asyncpg.Pool, *statements: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        for statement in statements:
            await conn.execute(statement)


async def _event(pool: asyncpg.Pool, stream_id: str, version: int) -> asyncpg.Record:
    row = await pool.fetchrow(
        "SELECT global_position, data FROM events WHERE stream_id = $1 AND stream_version = $2",
        stream_id,
        version,
    )
    assert row is not None
    return row


def _checks(report: VerifyReport) -> set[str]:
    return {f.check for f in report.findings}


async def test_a_healthy_ledger_passes_every_check(pool: asyncpg.Pool, store: EventStore) -> None:
    await _ledger(store, pool)
    report = await _verify(pool)
    assert report.ok, report.findings
    assert report.events == 2 + 2 * 4
    assert {c.name for c in report.checks} >= {
        "unbalanced_transaction", "negative_balance", "version_gap", "hash_chain_broken",
        "snapshot_mismatch", "read_model_balances", "read_model_history", "read_model_system",
        "command_outcome",
    }  # fmt: skip


async def test_an_altered_event_breaks_its_hash_and_is_named(pool: asyncpg.Pool, store: EventStore) -> None:
    await _ledger(store, pool)
    event = await _event(pool, "wallet:ann", 2)
    await _tamper(pool, "UPDATE events SET data = jsonb_set(data, '{reference}', '\"forged\"') "
                        "WHERE stream_id = 'wallet:ann' AND stream_version = 2")  # fmt: skip
    report = await _verify(pool)
    [broken] = [f for f in report.findings if f.check == "hash_chain_broken"]
    assert (broken.stream_id, broken.stream_version, broken.global_position) == (
        "wallet:ann", 2, event["global_position"],
    )  # fmt: skip
    assert broken.expected != broken.found


async def test_a_removed_event_is_a_gap_and_a_broken_chain(pool: asyncpg.Pool, store: EventStore) -> None:
    await _ledger(store, pool)
    await _tamper(pool, "DELETE FROM events WHERE stream_id = 'wallet:ben' AND stream_version = 2")
    report = await _verify(pool)
    gap = next(f for f in report.findings if f.check == "version_gap")
    assert (gap.stream_id, gap.expected, gap.found) == ("wallet:ben", "2", "3")
    chain = next(f for f in report.findings if f.check == "hash_chain_broken")
    assert (chain.stream_id, chain.stream_version) == ("wallet:ben", 3)
    # A whole transaction went, so the sums still balance; but the recorded balances after it no
    # longer follow from the history, and the snapshot and read models disagree with the replay.
    assert {"balance_after_mismatch", "snapshot_mismatch", "read_model_balances"} <= _checks(report)


async def test_a_removed_last_event_is_caught_by_the_stream_head(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    await _ledger(store, pool)
    await _tamper(pool, "DELETE FROM events WHERE stream_id = 'wallet:ann' AND stream_version = 4")
    report = await _verify(pool)
    head = next(f for f in report.findings if f.check == "stream_head_mismatch")
    assert head.stream_id == "wallet:ann"
    assert head.expected is not None
    assert head.expected.startswith("3:")
    assert head.found is not None
    assert head.found.startswith("4:")


async def test_a_stream_row_behind_its_events_writer_ids_is_found(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """The feed's per-wallet order rests on it (commands/sql/tally_writer_xid.sql)."""
    await _ledger(store, pool)
    await _tamper(pool, "UPDATE streams SET last_writer_xid = '0' WHERE stream_id = 'wallet:ann'")
    report = await _verify(pool)
    [finding] = [f for f in report.findings if f.check == "stream_writer_head"]
    assert (finding.stream_id, finding.found) == ("wallet:ann", "0")


async def test_unbalanced_entries_are_found(pool: asyncpg.Pool, store: EventStore) -> None:
    await _ledger(store, pool)
    event = await _event(pool, "wallet:ann", 2)
    await _tamper(pool, "UPDATE events SET data = jsonb_set(data, '{entries,0,amount}', '-90') "
                        "WHERE stream_id = 'wallet:ann' AND stream_version = 2")  # fmt: skip
    report = await _verify(pool)
    unbalanced = next(f for f in report.findings if f.check == "unbalanced_transaction")
    assert (unbalanced.global_position, unbalanced.expected, unbalanced.found) == (
        event["global_position"],
        "0",
        "10",
    )


async def test_a_rehashed_overdraft_is_still_caught(pool: asyncpg.Pool, store: EventStore) -> None:
    """A forger who rewrites a spend *and* recomputes the whole chain still cannot hide that the
    wallet went below zero."""
    await _ledger(store, pool)
    forged = """
      UPDATE events SET data = data
          || jsonb_build_object('amount', 500, 'balance_after', -400,
                                'entries', jsonb_build_array(
                                    jsonb_build_object('account', 'system:revenue', 'amount', 500),
                                    jsonb_build_object('account', 'user:ann', 'amount', -500)))
       WHERE stream_id = 'wallet:ann' AND stream_version = 4"""
    rechain = """
      DO $$
      DECLARE r record; prev bytea := tally_genesis_hash(); h bytea;
      BEGIN
        FOR r IN SELECT * FROM events WHERE stream_id = 'wallet:ann' ORDER BY stream_version LOOP
          h := sha256(prev || tally_event_bytes(r.stream_id, r.stream_version, r.event_id, r.event_type,
                                                r.data, r.metadata, r.recorded_at));
          UPDATE events SET hash = h WHERE global_position = r.global_position;
          prev := h;
        END LOOP;
        UPDATE streams SET last_hash = prev WHERE stream_id = 'wallet:ann';
      END $$"""
    await _tamper(pool, forged, rechain)
    report = await _verify(pool)
    assert "hash_chain_broken" not in _checks(report)
    negative = next(f for f in report.findings if f.check == "negative_balance")
    assert (negative.stream_id, negative.stream_version, negative.found) == ("wallet:ann", 4, "-400")
    assert {"snapshot_mismatch", "read_model_balances", "read_model_history"} <= _checks(report)


@pytest.mark.parametrize(
    ("statement", "check", "stream"),
    [
        ("UPDATE streams SET state = '{\"balances\": {\"GOLD\": 1000000}}' WHERE stream_id = 'wallet:ben'",
         "snapshot_mismatch", "wallet:ben"),
        ("UPDATE rm_balances SET balance = balance + 1 WHERE user_id = 'ann' AND asset = 'GOLD'",
         "read_model_balances", "wallet:ann"),
        ("UPDATE rm_wallets SET version = 99 WHERE user_id = 'ben'", "read_model_wallets", "wallet:ben"),
        ("DELETE FROM rm_transactions WHERE user_id = 'ann' AND wallet_version = 3",
         "read_model_history", "wallet:ann"),
        ("UPDATE rm_system_balances SET balance = 0 WHERE account = 'revenue'", "read_model_system", None),
        # A top-up relabelled as a spend: balanced, closed-loop, but not a spend's legs.
        ("UPDATE events SET data = jsonb_set(data, '{kind}', '\"spend\"') "
         "WHERE stream_id = 'wallet:ann' AND stream_version = 2", "legs_do_not_match_kind", "wallet:ann"),
        # Fields no transaction can have: verify names them rather than stopping on them.
        ("UPDATE events SET data = jsonb_set(jsonb_set(data, '{entries,0,amount}', '-1.5'), "
         "'{balance_after}', '\"lots\"') WHERE stream_id = 'wallet:ann' AND stream_version = 2",
         "malformed_transaction", "wallet:ann"),
        # A spend of a negative amount, its legs and balances made to agree: only the amount tells.
        ("UPDATE events SET data = data || jsonb_build_object('amount', -5) "
         "WHERE stream_id = 'wallet:ben' AND stream_version = 4", "amount_out_of_range", "wallet:ben"),
        # An accepted command's outcome rewritten as a refusal: its event is still there.
        ("UPDATE commands SET outcome = 'insufficient_funds' WHERE stream_id = 'wallet:ann' "
         "AND event_id = (SELECT event_id FROM events WHERE stream_id = 'wallet:ann' AND stream_version = 3)",
         "command_outcome", "wallet:ann"),
        # A command left without its outcome (rows are written whole: only tampering does this).
        ("UPDATE commands SET outcome = NULL, response = NULL WHERE command_id = (SELECT min(command_id) "
         "FROM commands WHERE stream_id = 'wallet:ben')", "command_outcome", "wallet:ben"),
        # A transaction credited to another caller.
        ("UPDATE events SET metadata = metadata || '{\"created_by\": \"mallory\"}' "
         "WHERE stream_id = 'wallet:ann' AND stream_version = 2", "created_by", "wallet:ann"),
        # A command moved to a client that does not exist.
        ("UPDATE commands SET client_id = gen_random_uuid() WHERE event_id = "
         "(SELECT event_id FROM events WHERE stream_id = 'wallet:ben' AND stream_version = 2)",
         "created_by", "wallet:ben"),
    ],
)  # fmt: skip
async def test_each_disagreement_is_named(
    pool: asyncpg.Pool,
    store: EventStore,
    statement: str,
    check: str,
    stream: str | None,
    foreign_events: set[int],
) -> None:
    await _ledger(store, pool)
    await _tamper(pool, statement)
    # A tampered event need not decode into its domain class: that is what verify is for.
    foreign_events.update(await pool.fetchval("SELECT array_agg(global_position) FROM events"))
    report = await _verify(pool)
    assert not report.ok
    finding = next(f for f in report.findings if f.check == check)
    assert finding.stream_id == stream
    assert finding.expected != finding.found
