"""`tally rebuild`: fresh read models from the events, swapped in while the ledger keeps working."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg
import pytest

from commands import EventStore
from domain import InsufficientFunds
from projections.projector import Projector
from projections.rebuild import rebuild
from projections.verify import verify
from tests.helpers import bonus, define_asset, open_wallet, projected, spend, top_up


async def _ledger(store: EventStore, users: int = 5) -> None:
    await define_asset(store)
    for i in range(users):
        await open_wallet(store, f"u{i}")
        await top_up(store, f"u{i}", 100 + i)
        await bonus(store, f"u{i}", 7)
        await spend(store, f"u{i}", 50)


async def _assert_verified(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        report = await verify(conn)
    assert report.ok, report.findings


async def test_rebuild_repairs_a_damaged_read_model(
    db_url: str, pool: asyncpg.Pool, store: EventStore
) -> None:
    await _ledger(store)
    await projected(pool)
    await pool.execute("UPDATE rm_balances SET balance = 999 WHERE user_id = 'u1'")
    await pool.execute("DELETE FROM rm_transactions WHERE user_id = 'u2'")

    results = [await rebuild(db_url, name, batch=7) for name in ("wallets", "history", "system")]

    assert [r.generation for r in results] == [2, 2, 2]
    assert all(r.events == 1 + 5 * 4 and not r.resumed for r in results)
    assert (
        int(await pool.fetchval("SELECT balance FROM rm_balances WHERE user_id = 'u1' AND asset = 'GOLD'"))
        == 58
    )
    assert await pool.fetchval("SELECT count(*) FROM rm_transactions WHERE user_id = 'u2'") == 3
    assert await pool.fetchval("SELECT count(*) FROM pg_namespace WHERE nspname LIKE 'rm_rebuild_%'") == 0
    await _assert_verified(pool)


async def test_an_interrupted_rebuild_resumes(db_url: str, pool: asyncpg.Pool, store: EventStore) -> None:
    await _ledger(store)
    await projected(pool)

    class Interrupted(Exception):
        pass

    def interrupt_after_first_batch(name: str, done: int, total: int) -> None:
        raise Interrupted

    with pytest.raises(Interrupted):
        await rebuild(db_url, "history", batch=4, progress=interrupt_after_first_batch)
    # The first batch (asset, wallet, top-up, bonus) holds two transactions.
    assert await pool.fetchval("SELECT count(*) FROM rm_rebuild_history.rm_transactions") == 2

    result = await rebuild(db_url, "history", batch=4)
    assert result.resumed
    assert result.events == 1 + 5 * 4 - 4  # only what the first run had not applied
    assert await pool.fetchval("SELECT count(*) FROM rm_transactions") == 15
    await _assert_verified(pool)


async def test_rebuild_under_load_corrupts_nothing(
    db_url: str, pool: asyncpg.Pool, store: EventStore
) -> None:
    """Commands keep flowing and the live projector keeps running while all three are rebuilt."""
    await _ledger(store, users=10)
    stop = asyncio.Event()
    projector = asyncio.create_task(Projector(pool, db_url, batch_size=50, poll_interval=0.05).run(stop))

    async def traffic() -> None:
        for round_ in range(15):
            for i in range(10):
                await top_up(store, f"u{i}", 3)
                with contextlib.suppress(InsufficientFunds):
                    await spend(store, f"u{i}", 5 + round_)

    load = asyncio.create_task(traffic())
    try:
        for name in ("wallets", "history", "system"):
            await rebuild(db_url, name, batch=25)
        await load
    finally:
        stop.set()
        await projector
    await projected(pool)
    await _assert_verified(pool)
    generations = await pool.fetch("SELECT generation FROM projection_checkpoints")
    assert {r["generation"] for r in generations} == {2}


async def test_a_swap_waits_for_a_running_verify_without_stalling_anything(
    db_url: str, pool: asyncpg.Pool, store: EventStore
) -> None:
    """Found in review: a swap during verify made verify compare new tables with old checkpoints,
    and a swap queued behind verify held a transaction id that stalled every projection."""
    await _ledger(store)
    await projected(pool)
    reader = await pool.acquire()
    verifying = reader.transaction(isolation="repeatable_read", readonly=True)
    await verifying.start()
    await reader.execute("LOCK TABLE rm_system_balances IN ACCESS SHARE MODE")  # what verify holds
    retries = 0
    gave_way_twice = asyncio.Event()

    def gave_way() -> None:
        nonlocal retries
        retries += 1
        if retries >= 2:
            gave_way_twice.set()

    rebuilding = asyncio.create_task(rebuild(db_url, "system", batch=10, on_swap_retry=gave_way))
    try:
        await asyncio.wait_for(gave_way_twice.wait(), 60)  # the swap tried, and gave way, twice
        assert not rebuilding.done()
        # Meanwhile the ledger moves on and the projections keep up: the waiting swap holds no
        # transaction id, so nothing holds back what they may read.
        await top_up(store, "u1", 5)
        await projected(pool)
    finally:
        await verifying.rollback()
        await pool.release(reader)
    result = await asyncio.wait_for(rebuilding, 60)
    assert result.generation == 2
    await projected(pool)
    await _assert_verified(pool)


async def test_an_interrupted_rebuild_with_stale_copies_starts_over(
    db_url: str, pool: asyncpg.Pool, store: EventStore
) -> None:
    """Found in review: a history rebuild interrupted under a release whose history projection had
    no rm_history_wallets would, resumed, have written that table's rows into the live one (the
    copies' schema comes first in the search path, the live one second). Copies that are not the
    live tables' shape are thrown away and the rebuild starts over."""
    await _ledger(store)
    await projected(pool)
    await pool.execute(
        """CREATE SCHEMA rm_rebuild_history;
           CREATE TABLE rm_rebuild_history.rm_transactions (LIKE public.rm_transactions INCLUDING ALL);
           CREATE TABLE rm_rebuild_history.projection_checkpoints
               (LIKE public.projection_checkpoints INCLUDING ALL);
           INSERT INTO rm_rebuild_history.projection_checkpoints (name) VALUES ('history')"""
    )
    live_heads = await pool.fetch("SELECT * FROM rm_history_wallets ORDER BY user_id")

    result = await rebuild(db_url, "history", batch=4)

    assert not result.resumed
    assert result.events == 1 + 5 * 4
    assert await pool.fetch("SELECT * FROM rm_history_wallets ORDER BY user_id") == live_heads
    await _assert_verified(pool)
