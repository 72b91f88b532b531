"""Reversals and holds under real concurrent transactions.

Each contender runs its command function on its own connection, in its own database transaction.
The wallet's row is held first (as an operator's `SELECT … FOR UPDATE` would hold it) until every
contender is seen waiting for it: the race is staged, not hoped for. Then the rules are checked:
reversals never exceed their transaction, holds never exceed the available balance, a capture and
a void of one hold have one winner, and `tally verify` (which replays the holds) is clean."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

import asyncpg
import msgspec

from commands import CommandRecord, EventStore
from commands.event_store import _CAPTURE_HOLD, _PLACE_HOLD, _REVERSE_TRANSACTION, _VOID_HOLD
from commands.expiry import expire_holds
from domain import CaptureHold, LifecycleCommand, PlaceHold, ReverseTransaction, SpendCredits, VoidHold
from projections.as_of import Moment, balances_as_of, wallet_as_of
from projections.rebuild import rebuild
from projections.verify import verify
from tests.helpers import (
    ctx,
    define_asset,
    holding_wallet,
    lock_waits,
    open_wallet,
    projected,
    record,
    run_batch,
    stream_balance,
    top_up,
)

_SQL = {ReverseTransaction: _REVERSE_TRANSACTION, PlaceHold: _PLACE_HOLD, CaptureHold: _CAPTURE_HOLD,
        VoidHold: _VOID_HOLD}  # fmt: skip


async def run(conn: asyncpg.Connection | asyncpg.Pool, command: LifecycleCommand) -> asyncpg.Record:
    """One call of the command's SQL function under a fresh key: (outcome, body, replayed)."""
    payload = msgspec.json.encode(CommandRecord.of(ctx(), command)).decode()
    row = await conn.fetchrow(_SQL[type(command)], payload)
    assert row is not None
    return row


async def race(
    pool: asyncpg.Pool,
    user_id: str,
    contenders: list[Callable[[asyncpg.Connection], Coroutine[Any, Any, str]]],
) -> list[str]:
    """Every contender on its own connection, all queued on the wallet's lock at once, then let go:
    their outcomes."""

    async def contend(task: Callable[[asyncpg.Connection], Coroutine[Any, Any, str]]) -> str:
        async with pool.acquire() as conn:
            return await task(conn)

    async with holding_wallet(pool, user_id) as holder:
        racing = [asyncio.create_task(contend(task)) for task in contenders]
        waits = await lock_waits(pool, lambda w: len(w) >= len(contenders))
        assert holder in {b for w in waits for b in w["blockers"]}
    return list(await asyncio.gather(*racing))


async def _clean(pool: asyncpg.Pool) -> None:
    await projected(pool)
    async with pool.acquire() as conn:
        report = await verify(conn)
    assert report.ok, report.findings


async def _funded(store: EventStore, user_id: str, amount: int) -> str:
    await define_asset(store)
    await open_wallet(store, user_id)
    accepted = await top_up(store, user_id, amount)
    return str(msgspec.json.decode(accepted.body)["transaction_id"])


async def test_twenty_concurrent_half_reversals_exactly_two_succeed(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    original = await _funded(store, "ann", 1000)

    async def reverse(conn: asyncpg.Connection) -> str:
        row = await run(conn, ReverseTransaction(transaction_id=original, amount=500))
        return str(row["outcome"])

    outcomes = await race(pool, "ann", [reverse] * 20)
    assert outcomes.count("accepted") == 2
    assert outcomes.count("reversal_exceeds_remaining") == 18
    assert await stream_balance(pool, "ann") == 0
    reversed_total = await pool.fetchval(
        "SELECT sum((data ->> 'amount')::bigint) FROM events WHERE data ->> 'reverses' = $1", original
    )
    assert reversed_total == 1000
    await _clean(pool)


async def test_n_concurrent_holds_exactly_the_affordable_k_succeed(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    await _funded(store, "bob", 7 * 100 + 40)

    async def hold(conn: asyncpg.Connection) -> str:
        row = await run(conn, PlaceHold(user_id="bob", asset="GOLD", amount=100))
        return str(row["outcome"])

    outcomes = await race(pool, "bob", [hold] * 30)
    assert outcomes.count("accepted") == 7
    assert outcomes.count("insufficient_funds") == 23
    held = await pool.fetchval(
        "SELECT tally_held(state, 'GOLD', now()) FROM streams WHERE stream_id = 'wallet:bob'"
    )
    assert held == 700
    await _clean(pool)


async def test_a_capture_and_a_void_racing_on_one_hold_have_one_winner(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    await _funded(store, "cat", 1000)
    placed = await run(pool, PlaceHold(user_id="cat", asset="GOLD", amount=300))
    hold_id = msgspec.json.decode(placed["body"])["hold_id"]

    async def capture(conn: asyncpg.Connection) -> str:
        return "capture " + str((await run(conn, CaptureHold(hold_id=hold_id, amount=200)))["outcome"])

    async def void(conn: asyncpg.Connection) -> str:
        return "void " + str((await run(conn, VoidHold(hold_id=hold_id)))["outcome"])

    outcomes = await race(pool, "cat", [capture, void] * 5)
    winners = [o for o in outcomes if o.endswith(" accepted")]
    assert len(winners) == 1, outcomes
    assert all(o.endswith(" accepted") or o.endswith(" hold_not_active") for o in outcomes), outcomes
    expected = 800 if winners[0].startswith("capture") else 1000
    assert await stream_balance(pool, "cat") == expected
    await _clean(pool)


async def test_spends_racing_holds_never_take_available_below_zero(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    await _funded(store, "dan", 1000)

    async def hold(conn: asyncpg.Connection) -> str:
        return "hold " + str((await run(conn, PlaceHold(user_id="dan", asset="GOLD", amount=150)))["outcome"])

    async def spend(conn: asyncpg.Connection) -> str:
        [row] = await run_batch(conn, record(SpendCredits(user_id="dan", asset="GOLD", amount=150)))
        return "spend " + str(row["outcome"])

    outcomes = await race(pool, "dan", [hold, spend] * 6)
    accepted = [o for o in outcomes if o.endswith(" accepted")]
    assert len(accepted) == 6, outcomes  # 6 x 150 = 900 of the 1000, whichever kinds won
    spent = sum(1 for o in accepted if o.startswith("spend")) * 150
    held = await pool.fetchval(
        "SELECT tally_held(state, 'GOLD', now()) FROM streams WHERE stream_id = 'wallet:dan'"
    )
    assert await stream_balance(pool, "dan") == 1000 - spent
    assert (1000 - spent) - held == 100
    await _clean(pool)


async def test_expired_holds_are_recorded_by_the_sweep_and_verify_agrees(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    await _funded(store, "eve", 100)
    placed = await run(pool, PlaceHold(user_id="eve", asset="GOLD", amount=60, expires_in_seconds=1))
    hold = msgspec.json.decode(placed["body"])
    await projected(pool)
    # Until the database's clock passes the expiry, the sweep finds nothing to end.
    while await pool.fetchval("SELECT now() < $1::text::timestamptz", hold["expires_at"]):
        assert await expire_holds(pool) == 0
        await asyncio.sleep(0.05)
    assert (await run(pool, CaptureHold(hold_id=hold["hold_id"])))["outcome"] == "hold_expired"
    assert await expire_holds(pool) == 1
    assert await expire_holds(pool) == 0
    expired = await pool.fetchrow(
        "SELECT data, metadata FROM events WHERE event_type = 'HoldExpired' AND data ->> 'hold_id' = $1",
        hold["hold_id"],
    )
    assert msgspec.json.decode(expired["data"])["released"] == 60
    assert await pool.fetchval("SELECT state ? 'holds' FROM streams WHERE stream_id = 'wallet:eve'") is False
    await _clean(pool)
    assert (
        await pool.fetchrow("SELECT status FROM rm_holds WHERE hold_id = $1", uuid.UUID(hold["hold_id"]))
    )["status"] == "expired"


async def test_verify_catches_a_hold_captured_beyond_its_amount(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """Tampering, as someone who controls the database could: a capture rewritten to take more
    than its hold reserved (the events' triggers are set aside for it)."""
    await _funded(store, "fay", 1000)
    placed = await run(pool, PlaceHold(user_id="fay", asset="GOLD", amount=100))
    hold_id = msgspec.json.decode(placed["body"])["hold_id"]
    await run(pool, CaptureHold(hold_id=hold_id, amount=40, final=False))
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            """UPDATE events SET data = jsonb_set(data, '{amount}', '90')
                WHERE event_type = 'HoldCaptured' AND data ->> 'hold_id' = $1""",
            hold_id,
        )
    async with pool.acquire() as conn:
        report = await verify(conn)
    checks = {f.check for f in report.findings}
    assert "holds" in checks, report.findings


async def _tamper(pool: asyncpg.Pool, statement: str, *args: object) -> set[str]:
    """Run ``statement`` behind the triggers' back (as someone who controls the database could),
    then verify: the checks with findings. Verify must finish, whatever the data now holds."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(statement, *args)
    async with pool.acquire() as conn:
        report = await verify(conn)
    return {f.check for f in report.findings}


async def test_verify_catches_a_reversal_beyond_its_transaction(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    original = await _funded(store, "gus", 1000)
    await run(pool, ReverseTransaction(transaction_id=original, amount=400))
    checks = await _tamper(
        pool,
        """UPDATE events SET data = jsonb_set(jsonb_set(data, '{amount}', '1400'), '{entries}',
                  '[{"account": "system:treasury", "amount": 1400},
                    {"account": "user:gus", "amount": -1400}]')
            WHERE event_type = 'CreditsReversed'""",
    )
    assert "reversed_beyond_amount" in checks


async def test_verify_catches_a_reversal_of_a_reversal(pool: asyncpg.Pool, store: EventStore) -> None:
    original = await _funded(store, "hal", 1000)
    first = msgspec.json.decode(
        (await run(pool, ReverseTransaction(transaction_id=original, amount=10)))["body"]
    )
    second = await run(pool, ReverseTransaction(transaction_id=original, amount=10))
    second_id = msgspec.json.decode(second["body"])["transaction_id"]
    checks = await _tamper(
        pool,
        "UPDATE events SET data = jsonb_set(data, '{reverses}', to_jsonb($1::text)) WHERE event_id = $2",
        first["transaction_id"], uuid.UUID(second_id),
    )  # fmt: skip
    assert "reversal_legs" in checks


async def test_verify_names_malformed_lifecycle_data_instead_of_failing(
    pool: asyncpg.Pool, store: EventStore, foreign_events: set[int]
) -> None:
    original = await _funded(store, "ida", 1000)
    await run(pool, ReverseTransaction(transaction_id=original, amount=10))
    await run(pool, PlaceHold(user_id="ida", asset="GOLD", amount=10))
    checks = await _tamper(
        pool,
        """UPDATE events SET data = jsonb_set(data, '{entries}', '"not legs"')
            WHERE event_type = 'CreditsToppedUp' AND stream_id = 'wallet:ida';
           UPDATE events SET data = '[1, 2]' WHERE event_type = 'HoldPlaced' AND stream_id = 'wallet:ida'""",
    )
    assert {"malformed_transaction", "reversal_legs", "holds"} <= checks
    foreign_events.update(await pool.fetchval("SELECT array_agg(global_position) FROM events"))


async def test_verify_compares_the_holds_every_decision_trusts(pool: asyncpg.Pool, store: EventStore) -> None:
    """A hold taken out of the wallet's snapshot would free its credits for spending: verify names it."""
    await _funded(store, "jon", 1000)
    await run(pool, PlaceHold(user_id="jon", asset="GOLD", amount=600))
    checks = await _tamper(pool, "UPDATE streams SET state = state - 'holds' WHERE stream_id = 'wallet:jon'")
    assert "holds" in checks


async def test_as_of_shows_what_holds_reserved_then(pool: asyncpg.Pool, store: EventStore) -> None:
    await _funded(store, "kim", 1000)
    placed = msgspec.json.decode(
        (await run(pool, PlaceHold(user_id="kim", asset="GOLD", amount=300)))["body"]
    )
    at_hold = Moment(position=int(placed["consistency_token"].split(".")[1]))
    captured = await run(pool, CaptureHold(hold_id=placed["hold_id"], amount=100, final=False))
    at_capture = Moment(
        position=int(msgspec.json.decode(captured["body"])["consistency_token"].split(".")[1])
    )
    await run(pool, VoidHold(hold_id=placed["hold_id"]))
    expected = {
        at_hold: (1000, 300),
        at_capture: (900, 200),
        Moment(position=10**12): (900, 0),
        Moment(at=datetime.fromisoformat(placed["created_at"])): (1000, 300),
    }
    for moment, (balance, held) in expected.items():
        wallet = await wallet_as_of(pool, "kim", moment)
        [gold] = wallet.balances
        assert (gold.balance, gold.held, gold.available) == (balance, held, balance - held), moment
        ledger = await balances_as_of(pool, moment)
        [user] = [b for b in ledger if b.account == "user:kim"]
        assert (user.balance, user.held, user.available) == (balance, held, balance - held), moment


async def test_rebuild_replays_the_holds(db_url: str, pool: asyncpg.Pool, store: EventStore) -> None:
    """The holds read model is rebuilt from the events like the rest of `wallets`, in small batches
    (so a hold's events land in different batches, and its row is built up piece by piece)."""
    original = await _funded(store, "lea", 1000)
    place = PlaceHold(user_id="lea", asset="GOLD", amount=100)
    holds = [msgspec.json.decode((await run(pool, place))["body"]) for _ in range(3)]
    await run(pool, CaptureHold(hold_id=holds[0]["hold_id"], amount=30, final=False))
    await run(pool, CaptureHold(hold_id=holds[0]["hold_id"], amount=20))
    await run(pool, VoidHold(hold_id=holds[1]["hold_id"]))
    await run(pool, ReverseTransaction(transaction_id=original, amount=50))
    await projected(pool)
    live = await pool.fetch("SELECT * FROM rm_holds ORDER BY hold_id")
    await pool.execute("UPDATE rm_holds SET captured = 0, status = 'active'")
    await rebuild(db_url, "wallets", batch=2)
    assert await pool.fetch("SELECT * FROM rm_holds ORDER BY hold_id") == live
    assert [(r["status"], r["captured"]) for r in live if str(r["hold_id"]) == holds[0]["hold_id"]] == [
        ("captured", 50)
    ]
    await _clean(pool)


async def test_a_wallet_whose_expiries_fail_does_not_stop_the_others(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """The sweep ends each wallet's expired holds on its own: one it cannot end (a snapshot broken
    behind the functions' back) is logged and left, and the next wallet's are still recorded."""
    await _funded(store, "max", 100)
    await open_wallet(store, "ned")
    await top_up(store, "ned", 100)
    last = None
    for user in ("max", "ned"):
        last = msgspec.json.decode((await run(pool, PlaceHold(user_id=user, asset="GOLD", amount=50,
                                                               expires_in_seconds=1)))["body"])  # fmt: skip
    assert last is not None
    await projected(pool)
    await pool.execute(
        """UPDATE streams
              SET state = jsonb_set(state,
                                    ARRAY['holds', (SELECT k FROM jsonb_object_keys(state -> 'holds') k),
                                          'expires_at'],
                                    '"broken"')
            WHERE stream_id = 'wallet:max'"""
    )
    while await pool.fetchval("SELECT now() < $1::text::timestamptz", last["expires_at"]):
        assert await expire_holds(pool) == 0
        await asyncio.sleep(0.05)
    assert await expire_holds(pool) == 1
    ended = await pool.fetch("SELECT stream_id FROM events WHERE event_type = 'HoldExpired'")
    assert [r["stream_id"] for r in ended] == ["wallet:ned"]
