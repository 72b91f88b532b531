"""The commit-order reader (projections/sql/tally_next_events.sql), which the event feed serves,
gives each wallet's events in version order, even when a transaction got its id before the
wallet's previous writer did: a staged race with real concurrent transactions."""

from __future__ import annotations

import asyncio

import asyncpg

from commands import EventStore
from domain import SpendCredits, TopUpCredits
from tests.helpers import define_asset, holding_wallet, lock_waits, open_wallet, record, spend, top_up

_ORDER = """
SELECT stream_version, writer_xid::text::bigint AS writer, global_position
  FROM events WHERE stream_id = $1 ORDER BY writer_xid, global_position
"""


async def test_a_wallets_events_follow_its_versions_when_an_older_transaction_writes_it_last(
    pool: asyncpg.Pool,
) -> None:
    """A (an atomic batch on wallets a, b, c, which locks them in that order) takes its id when it
    locks a, then waits for b, which another session holds. Meanwhile B, a younger transaction,
    spends on c and commits. Then A locks b and c and writes c's next version. A's id is below
    B's, yet c's events must come out of the reader in version order."""
    store = EventStore(pool, lock_wait=30.0, timeout=60.0)
    await define_asset(store)
    for user in ("a", "b", "c"):
        await open_wallet(store, user)
    await top_up(store, "c", 10)
    batch = [
        record(TopUpCredits(user_id="a", asset="GOLD", amount=1)),
        record(TopUpCredits(user_id="b", asset="GOLD", amount=1)),
        record(SpendCredits(user_id="c", asset="GOLD", amount=2)),
    ]
    async with holding_wallet(pool, "b") as holder:
        first = asyncio.create_task(store.post_batch(batch, atomic=True))
        waits = await lock_waits(pool, lambda w: any(holder in x["blockers"] for x in w))
        a_writer = await pool.fetchval(
            "SELECT backend_xid::text::bigint FROM pg_stat_activity WHERE pid = $1", waits[0]["pid"]
        )
        assert a_writer is not None  # A has its id already, while it waits for b
        await spend(store, "c", 3)  # B: a transaction of its own, younger than A
    result = await asyncio.wait_for(first, 60)
    assert result.applied
    rows = await pool.fetch(_ORDER, "wallet:c")
    b_writer = next(r["writer"] for r in rows if r["stream_version"] == 3)
    assert a_writer < b_writer  # the race happened: the older transaction wrote c after the younger
    assert [r["stream_version"] for r in rows] == [1, 2, 3, 4]
    a_rows = await pool.fetch(_ORDER, "wallet:a")
    assert a_rows[-1]["writer"] == a_writer  # A's own id where nothing younger wrote before it
