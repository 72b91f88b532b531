"""The hot-wallet race: real concurrent connections spending from one wallet."""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from commands import EventStore
from domain import InsufficientFunds
from tests.helpers import define_asset, event_balance, open_wallet, projected, spend, stream_balance, top_up


async def test_fifty_concurrent_spends_exactly_k_succeed(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "hot")
    await top_up(store, "hot", 7 * 100 + 40)  # affords k = 7 spends of 100, leaving 40

    results = await asyncio.gather(*(spend(store, "hot", 100) for _ in range(50)), return_exceptions=True)

    accepted = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, InsufficientFunds)]
    assert len(accepted) == 7
    assert len(refused) == 43
    assert await stream_balance(pool, "hot") == 40
    assert await event_balance(pool, "hot") == 40
    # Versions are gapless: open + top-up + 7 spends.
    versions = await pool.fetch(
        "SELECT stream_version FROM events WHERE stream_id = 'wallet:hot' ORDER BY stream_version"
    )
    assert [r["stream_version"] for r in versions] == list(range(1, 10))


async def test_balance_never_dips_below_zero_under_mixed_load(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "mixed")

    async def worker(i: int) -> None:
        for _ in range(10):
            if i % 3 == 0:
                await top_up(store, "mixed", 30)
            else:
                with contextlib.suppress(InsufficientFunds):
                    await spend(store, "mixed", 20)

    await asyncio.gather(*(worker(i) for i in range(30)))

    # Every recorded balance_after, in version order, is non-negative and follows from the legs.
    rows = await pool.fetch(
        """SELECT (data ->> 'balance_after')::numeric AS after,
                  (SELECT sum((l ->> 'amount')::numeric) FROM jsonb_array_elements(data -> 'entries') l
                    WHERE l ->> 'account' = 'user:mixed') AS delta
             FROM events WHERE stream_id = 'wallet:mixed' AND stream_version > 1
            ORDER BY stream_version"""
    )
    running = 0
    for row in rows:
        running += int(row["delta"])
        assert running >= 0
        assert int(row["after"]) == running
    assert await stream_balance(pool, "mixed") == running

    await projected(pool)
    total = await pool.fetchval("SELECT sum(balance) FROM rm_system_balances WHERE asset = 'GOLD'")
    assert total == 0
    users = await pool.fetchval(
        "SELECT balance FROM rm_system_balances WHERE asset = 'GOLD' AND account = 'users'"
    )
    assert int(users) == running
