"""Exactly-once commands under the Idempotency-Key, with real concurrent duplicates."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from commands import EventStore, handle
from domain import IdempotencyKeyReused, InsufficientFunds, SpendCredits, TopUpCredits, WalletNotFound
from tests.helpers import (
    ctx,
    define_asset,
    holding_wallet,
    lock_waits,
    open_wallet,
    record,
    run_batch,
    stream_balance,
    top_up,
)

DUPLICATES = 30


async def test_concurrent_duplicates_have_one_effect(pool: asyncpg.Pool, store: EventStore) -> None:
    """30 transactions send the same command under one key at once. The first to claim the key
    waits for the wallet (held); the 29 others are seen waiting for the first one's claim, each in a
    transaction of its own. Released, they replay its outcome."""
    await define_asset(store)
    await open_wallet(store, "dup")
    command = TopUpCredits(user_id="dup", asset="GOLD", amount=500)

    async def duplicate() -> asyncpg.Record:
        async with pool.acquire() as conn:
            [row] = await run_batch(conn, record(command, "same-key", "same request"))
            return row

    async with holding_wallet(pool, "dup") as holder:
        racing = [asyncio.create_task(duplicate()) for _ in range(DUPLICATES)]
        waits = await lock_waits(pool, lambda w: len(w) >= DUPLICATES)
    [first] = [w["pid"] for w in waits if w["blockers"] == [holder]]  # it holds the key, waits for the wallet
    on_key = [w for w in waits if w["pid"] != first]  # waiting for the first one's claim of the key
    assert len(on_key) == DUPLICATES - 1
    assert all(first in w["blockers"] for w in on_key)  # (and the waiters queued ahead of each)
    rows = await asyncio.gather(*racing)

    assert sum(not r["replayed"] for r in rows) == 1
    assert {(r["outcome"], r["body"]) for r in rows} == {("accepted", rows[0]["body"])}
    assert await stream_balance(pool, "dup") == 500
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = 'wallet:dup'") == 2


async def test_retry_replays_the_first_outcome(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "retry")
    command = TopUpCredits(user_id="retry", asset="GOLD", amount=5)
    first = await handle(store, command, ctx("k", "r"))
    second = await handle(store, command, ctx("k", "r"))
    assert (first.replayed, second.replayed) == (False, True)
    assert first.body == second.body
    assert await stream_balance(pool, "retry") == 5


async def test_same_key_for_another_request_is_refused(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "reuse")
    await handle(store, TopUpCredits(user_id="reuse", asset="GOLD", amount=5), ctx("k", "a"))
    with pytest.raises(IdempotencyKeyReused):
        await handle(store, TopUpCredits(user_id="reuse", asset="GOLD", amount=6), ctx("k", "b"))
    assert await stream_balance(pool, "reuse") == 5
    assert await pool.fetchval("SELECT outcome FROM commands WHERE command_id = 'k'") == "accepted"


async def test_insufficient_funds_is_recorded_and_replayed(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "poor")
    command = SpendCredits(user_id="poor", asset="GOLD", amount=10)
    with pytest.raises(InsufficientFunds) as first:
        await handle(store, command, ctx("spend-1", "s"))
    assert first.value.replayed is False

    await top_up(store, "poor", 100)  # the wallet could now afford it, but the decision stands
    with pytest.raises(InsufficientFunds) as again:
        await handle(store, command, ctx("spend-1", "s"))
    assert again.value.replayed is True
    assert again.value.detail == first.value.detail
    assert await stream_balance(pool, "poor") == 100
    assert (
        await pool.fetchval("SELECT outcome FROM commands WHERE command_id = 'spend-1'")
        == "insufficient_funds"
    )


async def test_not_found_is_not_recorded(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    command = TopUpCredits(user_id="later", asset="GOLD", amount=10)
    with pytest.raises(WalletNotFound):
        await handle(store, command, ctx("early", "t"))
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'early'") == 0

    await open_wallet(store, "later")
    accepted = await handle(store, command, ctx("early", "t"))
    assert accepted.replayed is False
    assert await stream_balance(pool, "later") == 10


async def test_a_key_recorded_meanwhile_without_a_claim_is_replayed(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """A writer that takes no claim on the key (`tally keys adopt` moving an earlier key to this
    client; a release before this one during an upgrade) records it while a command decides it:
    the command's own record waits on the primary key, is refused, its transaction rolls back, and
    the command sent again replays what the other recorded. Staged: the other writer's row is held
    uncommitted until the command is seen waiting for it."""
    await define_asset(store)
    await open_wallet(store, "adopted")
    await top_up(store, "adopted", 100)
    context = ctx("moved-key", "spend 5")
    stored = {"transaction_id": "recorded-elsewhere", "amount": 5}
    async with pool.acquire() as other, other.transaction():
        await other.execute(
            """INSERT INTO commands (client_id, command_id, fingerprint, metadata, outcome, response)
               VALUES ($1, $2, tally_fingerprint($1, $3), '{}', 'accepted', $4::jsonb)""",
            uuid.UUID(context.client_id), context.command_id, context.fingerprint, json.dumps(stored),
        )  # fmt: skip
        other_pid = await other.fetchval("SELECT pg_backend_pid()")
        spending = asyncio.create_task(
            handle(store, SpendCredits(user_id="adopted", asset="GOLD", amount=5), context)
        )
        await lock_waits(pool, lambda waits: any(other_pid in w["blockers"] for w in waits))
    accepted = await spending
    assert accepted.replayed
    assert json.loads(accepted.body) == stored
    assert await stream_balance(pool, "adopted") == 100  # the spend was not applied as well
