"""Batches (EventStore.post_batch, the functions behind POST /v1/batches) under real concurrent
transactions: batches, atomic and not, and single commands on the same wallets never deadlock and
never overdraw; a held wallet is waited for without reordering its commands; an atomic batch is
all or nothing. Races are staged: a wallet is held (as an operator's `SELECT … FOR UPDATE` would
hold it) until the contenders are seen waiting, each in its own transaction."""

from __future__ import annotations

import asyncio
import random

import asyncpg
import msgspec
import pytest

from commands import CommandRecord, EventStore, event_store
from commands.errors import Unavailable
from commands.event_store import UNAVAILABLE, BatchResult
from domain import InsufficientFunds, SpendCredits, TopUpCredits
from projections.verify import verify
from tests.helpers import (
    TEST_CLIENT_ID,
    ctx,
    define_asset,
    event_balance,
    holding_wallet,
    lock_waits,
    open_wallet,
    projected,
    record,
    stream_balance,
    top_up,
)


def outcomes(result: BatchResult) -> list[str]:
    return [outcome for outcome, _, _ in result.outcomes]


async def test_concurrent_batches_and_single_commands_never_deadlock_or_overdraw(pool: asyncpg.Pool) -> None:
    store = EventStore(pool, max_batches=8, lock_wait=20.0, timeout=60.0)
    await define_asset(store)
    users = [f"w{i:02d}" for i in range(12)]
    for user in users:
        await open_wallet(store, user)
        await top_up(store, user, 100)
    rng = random.Random(7)

    def spends(amount: int, order: list[str]) -> list[CommandRecord]:
        return [record(SpendCredits(user_id=u, asset="GOLD", amount=amount)) for u in order]

    batches = [(spends(10, rng.sample(users, len(users)) * 3), False) for _ in range(3)]
    batches += [(spends(25, rng.sample(users, 6)), True) for _ in range(3)]

    singles = [SpendCredits(user_id=rng.choice(users), asset="GOLD", amount=10) for _ in range(24)]

    async def alone(command: SpendCredits) -> tuple[str, str]:
        try:
            await store.post_transaction(ctx(), command)
        except InsufficientFunds:
            return command.user_id, "insufficient_funds"
        return command.user_id, "accepted"

    # Two wallets held while everything starts: the atomic batches that name them wait, the
    # non-atomic ones decide the rest and come back for them; then they are let go.
    async with holding_wallet(pool, users[0]) as first, holding_wallet(pool, users[1]) as second:
        running = [asyncio.create_task(store.post_batch(r, atomic=a)) for r, a in batches]
        lone = [asyncio.create_task(alone(c)) for c in singles]
        waits = await lock_waits(
            pool, lambda w: len({x["pid"] for x in w if {first, second} & set(x["blockers"])}) >= 2
        )
        assert waits
    results = await asyncio.wait_for(asyncio.gather(*running), 120)
    single_outcomes = await asyncio.wait_for(asyncio.gather(*lone), 120)

    spent = dict.fromkeys(users, 0)
    for (records, atomic), result in zip(batches, results, strict=True):
        assert set(outcomes(result)) <= {"accepted", "insufficient_funds"}, outcomes(result)
        if atomic:
            assert result.applied == (set(outcomes(result)) == {"accepted"})
        for rec, (outcome, _, _) in zip(records, result.outcomes, strict=True):
            if outcome == "accepted" and result.applied:
                spent[rec.command.user_id] += rec.command.amount
    for user, outcome in single_outcomes:
        if outcome == "accepted":
            spent[user] += 10
    for user in users:
        balance = await stream_balance(pool, user)
        assert balance >= 0
        assert balance == 100 - spent[user], user
        assert await event_balance(pool, user) == balance
    # Every wallet ran dry or close: the batches really contended for the same credits.
    assert sum(spent.values()) > 100 * len(users) * 0.8
    await projected(pool)
    async with pool.acquire() as conn:
        report = await verify(conn)
    assert report.ok, report.findings


async def test_a_held_wallet_is_waited_for_in_request_order(pool: asyncpg.Pool) -> None:
    """A non-atomic batch decides the wallets it can and waits for a held one; that wallet's
    commands then run in request order (the top-up first, then the spend it pays for)."""
    store = EventStore(pool, lock_wait=30.0, timeout=60.0)
    await define_asset(store)
    for user in ("held", "free"):
        await open_wallet(store, user)
    commands = [
        record(TopUpCredits(user_id="held", asset="GOLD", amount=10)),
        record(TopUpCredits(user_id="free", asset="GOLD", amount=5)),
        record(SpendCredits(user_id="held", asset="GOLD", amount=10)),
    ]
    async with holding_wallet(pool, "held") as holder:
        batch = asyncio.create_task(store.post_batch(commands, atomic=False))
        await lock_waits(pool, lambda w: any(holder in x["blockers"] for x in w))
        assert await stream_balance(pool, "free") == 5  # decided and committed while "held" waits
    result = await asyncio.wait_for(batch, 60)
    assert outcomes(result) == ["accepted", "accepted", "accepted"]
    assert await stream_balance(pool, "held") == 0


async def test_a_wallet_held_past_the_lock_wait(pool: asyncpg.Pool) -> None:
    """Non-atomic: the held wallet's commands are `unavailable` (not decided, nothing recorded) and
    the others decided. Atomic: the whole batch is Unavailable, nothing applied."""
    store = EventStore(pool, lock_wait=0.2)
    await define_asset(store)
    for user in ("held", "free"):
        await open_wallet(store, user)
    held = record(TopUpCredits(user_id="held", asset="GOLD", amount=10), "H")
    free = record(TopUpCredits(user_id="free", asset="GOLD", amount=5), "F")
    async with holding_wallet(pool, "held"):
        result = await asyncio.wait_for(store.post_batch([held, free], atomic=False), 30)
        assert outcomes(result) == [UNAVAILABLE, "accepted"]
        with pytest.raises(Unavailable):
            await asyncio.wait_for(store.post_batch([free, held], atomic=True), 30)
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'H'") == 0
    assert await stream_balance(pool, "free") == 5
    again = await store.post_batch([held, free], atomic=True)
    assert [(o, r) for o, _, r in again.outcomes] == [("accepted", False), ("accepted", True)]
    assert again.applied


async def test_an_atomic_batch_applies_nothing_when_one_is_refused(pool: asyncpg.Pool) -> None:
    store = EventStore(pool)
    await define_asset(store)
    for user in ("a", "b"):
        await open_wallet(store, user)
    await top_up(store, "a", 50)
    before = await pool.fetchval("SELECT count(*) FROM events")
    keys_before = await pool.fetchval("SELECT count(*) FROM commands")
    batch = [
        record(TopUpCredits(user_id="b", asset="GOLD", amount=10)),
        record(SpendCredits(user_id="a", asset="GOLD", amount=60)),
    ]
    result = await store.post_batch(batch, atomic=True)
    assert not result.applied
    assert outcomes(result) == ["accepted", "insufficient_funds"]  # the store's view; the API says 424
    assert await pool.fetchval("SELECT count(*) FROM events") == before
    assert await pool.fetchval("SELECT count(*) FROM commands") == keys_before
    assert (await stream_balance(pool, "a"), await stream_balance(pool, "b")) == (50, 0)
    # Refused by its caller (a scope it lacks): nothing applied either, though every one would be.
    refused = await store.post_batch(batch[:1], atomic=True, reject=True)
    assert not refused.applied
    assert await stream_balance(pool, "b") == 0
    body = msgspec.json.decode(refused.outcomes[0][1])
    assert body["balance_after"] == 10  # what it would have been: the caller answers 424 instead


async def test_a_key_repeated_across_wallets_waits_with_its_first_occurrence(pool: asyncpg.Pool) -> None:
    """Found by review: a repeat of a key on a free wallet was decided alone while its first
    occurrence's wallet stayed held. Wallets that share a key are retried together."""
    store = EventStore(pool, lock_wait=0.3)
    await define_asset(store)
    for user in ("w1", "w2", "w3"):
        await open_wallet(store, user)
    first = record(TopUpCredits(user_id="w1", asset="GOLD", amount=5), "k", request="A")
    second = record(TopUpCredits(user_id="w2", asset="GOLD", amount=7), "k", request="B")
    other = record(TopUpCredits(user_id="w3", asset="GOLD", amount=9))
    async with holding_wallet(pool, "w1"), holding_wallet(pool, "w3"):
        held = asyncio.create_task(store.post_batch([first, second, other], atomic=False))
        result = await asyncio.wait_for(held, 30)
    assert outcomes(result) == [UNAVAILABLE, UNAVAILABLE, UNAVAILABLE]
    assert await stream_balance(pool, "w2") == 0
    # Let go: the first occurrence decides; the repeat, a different request, is refused as reused.
    again = await store.post_batch([first, second, other], atomic=False)
    assert outcomes(again) == ["accepted", "idempotency_key_reused", "accepted"]
    assert (await stream_balance(pool, "w1"), await stream_balance(pool, "w2")) == (5, 0)


async def test_a_wallets_later_commands_wait_for_its_undecided_ones_across_chunks(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: with a wallet held past the lock wait, its top-up in one chunk was
    undecided while its spend in the next chunk was decided (and recorded) before it."""
    monkeypatch.setattr(event_store, "BATCH_CHUNK", 1)
    store = EventStore(pool, lock_wait=0.2)
    await define_asset(store)
    await open_wallet(store, "w")
    commands = [
        record(TopUpCredits(user_id="w", asset="GOLD", amount=5)),
        record(SpendCredits(user_id="w", asset="GOLD", amount=5)),
    ]
    async with holding_wallet(pool, "w"):
        result = await asyncio.wait_for(store.post_batch(commands, atomic=False), 30)
    assert outcomes(result) == [UNAVAILABLE, UNAVAILABLE]
    assert outcomes(await store.post_batch(commands, atomic=False)) == ["accepted", "accepted"]
    assert await stream_balance(pool, "w") == 0


async def _batch_claims(pool: asyncpg.Pool) -> int:
    count: int = await pool.fetchval(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database "
        "WHERE d.datname = current_database() AND l.locktype = 'advisory' "
        "AND l.classid::bigint = tally_batch_lock_class()"
    )
    return count


async def test_a_batch_keys_claim_is_let_go_whatever_happens(pool: asyncpg.Pool) -> None:
    """Found by review: a bug inside a batch came out as 503, and a cancellation was swallowed. A
    bug is itself (a 500), a cancellation goes on, and the claim is let go either way."""
    store = EventStore(pool)
    claims_inside: list[int] = []

    async def fails() -> None:
        async with store.batch(TEST_CLIENT_ID, "k"):
            claims_inside.append(await _batch_claims(pool))
            raise KeyError("a bug")

    async def claim_again() -> None:
        """The claim can be taken again (a closed connection's backend lets go as it exits)."""
        async with asyncio.timeout(30), store.batch(TEST_CLIENT_ID, "k") as session:
            assert await session.answer(TEST_CLIENT_ID, "k", b"x") is None

    with pytest.raises(KeyError):
        await fails()
    assert claims_inside == [1]
    await claim_again()
    entered = asyncio.Event()

    async def hangs() -> None:
        async with store.batch(TEST_CLIENT_ID, "k"):
            entered.set()
            await asyncio.Event().wait()

    task = asyncio.create_task(hangs())
    await asyncio.wait_for(entered.wait(), 30)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await claim_again()
    assert await _batch_claims(pool) == 0  # a normal exit lets go at once
