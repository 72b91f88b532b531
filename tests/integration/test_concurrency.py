"""The hot-wallet race: real concurrent transactions spending from one wallet.

Each contender runs on its own connection, in its own database transaction. The wallet's row is
held first (as an operator's `SELECT … FOR UPDATE` would hold it) until every contender is seen
waiting for it, so the race is not hoped for: all of them are queued on the same row at once when
it is released."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from commands import EventStore
from domain import InsufficientFunds, SpendCredits
from tests.helpers import (
    define_asset,
    event_balance,
    holding_wallet,
    lock_waits,
    open_wallet,
    projected,
    record,
    run_batch,
    spend,
    stream_balance,
    top_up,
)

CONTENDERS = 50
AFFORDABLE = 7


async def test_fifty_concurrent_spends_exactly_k_succeed(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "hot")
    await top_up(store, "hot", AFFORDABLE * 100 + 40)  # affords k = 7 spends of 100, leaving 40

    async def contender(i: int) -> asyncpg.Record:
        async with pool.acquire() as conn:
            [row] = await run_batch(conn, record(SpendCredits(user_id="hot", asset="GOLD", amount=100)))
            return row

    async with holding_wallet(pool, "hot") as holder:
        racing = [asyncio.create_task(contender(i)) for i in range(CONTENDERS)]
        waits = await lock_waits(pool, lambda w: len(w) >= CONTENDERS)
        assert holder in {b for w in waits for b in w["blockers"]}
    rows = await asyncio.gather(*racing)

    outcomes = [r["outcome"] for r in rows]
    assert outcomes.count("accepted") == AFFORDABLE
    assert outcomes.count("insufficient_funds") == CONTENDERS - AFFORDABLE
    assert await stream_balance(pool, "hot") == 40
    assert await event_balance(pool, "hot") == 40
    # Versions are gapless: open + top-up + 7 spends, each written by its own transaction (the
    # row's xmin: a writer_xid may be an earlier writer's, commands/sql/tally_writer_xid.sql).
    events = await pool.fetch(
        "SELECT stream_version, xmin::text AS xid FROM events WHERE stream_id = 'wallet:hot' ORDER BY 2"
    )
    assert sorted(r["stream_version"] for r in events) == list(range(1, 3 + AFFORDABLE))
    assert len({r["xid"] for r in events}) == len(events)


async def test_balance_never_dips_below_zero_under_mixed_load(pool: asyncpg.Pool) -> None:
    """Three "API processes" (event stores, each group-committing its own batches) top up and spend
    one wallet at once."""
    stores = [EventStore(pool, max_in_flight=2, max_batch=5) for _ in range(3)]
    await define_asset(stores[0])
    await open_wallet(stores[0], "mixed")

    async def worker(i: int) -> None:
        store = stores[i % len(stores)]
        for _ in range(10):
            if i % 3 == 0:
                await top_up(store, "mixed", 30)
            else:
                with contextlib.suppress(InsufficientFunds):
                    await spend(store, "mixed", 20)

    await asyncio.gather(*(worker(i) for i in range(30)))

    # Every recorded balance_after, in version order, is non-negative and follows from the legs.
    rows = await pool.fetch(
        """SELECT (data ->> 'balance_after')::numeric AS after, writer_xid::text AS xid,
                  (SELECT sum((l ->> 'amount')::numeric) FROM jsonb_array_elements(data -> 'entries') l
                    WHERE l ->> 'account' = 'user:mixed') AS delta
             FROM events WHERE stream_id = 'wallet:mixed' AND event_type <> 'WalletOpened'
            ORDER BY stream_version"""
    )
    running = 0
    for row in rows:
        running += int(row["delta"])
        assert running >= 0
        assert int(row["after"]) == running
    assert await stream_balance(pool, "mixed") == running
    assert len({r["xid"] for r in rows}) > 1  # many transactions took turns on the wallet

    await projected(pool)
    total = await pool.fetchval("SELECT sum(balance) FROM rm_system_balances WHERE asset = 'GOLD'")
    assert total == 0
    users = await pool.fetchval(
        "SELECT balance FROM rm_system_balances WHERE asset = 'GOLD' AND account = 'users'"
    )
    assert int(users) == running
