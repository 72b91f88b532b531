"""Balances at a past moment, from the events: the CLI's query and the API's ?as_of."""

from __future__ import annotations

import asyncio

import asyncpg
from litestar.testing import AsyncTestClient

from domain import TopUpCredits
from projections.as_of import Moment, balances_as_of
from tests.helpers import (
    define_asset,
    holding_wallet,
    lock_waits,
    open_wallet,
    record,
    run_batch,
    spend,
    top_up,
)

# When the transaction waiting behind ``holder`` began.
_WAITER_STARTED = """
SELECT xact_start FROM pg_stat_activity
 WHERE datname = current_database() AND $1::int = ANY (pg_blocking_pids(pid))
"""
_STEP_BACK = """
UPDATE streams SET updated_at = clock_timestamp() + interval '1 hour' WHERE stream_id = 'wallet:ann'
RETURNING updated_at
"""


async def test_balances_as_of_a_position_and_a_time(pool: asyncpg.Pool) -> None:
    from commands import EventStore

    store = EventStore(pool)
    await define_asset(store)
    await open_wallet(store, "ann")
    await top_up(store, "ann", 100)
    cut = await pool.fetchrow("SELECT max(global_position) AS p, max(recorded_at) AS t FROM events")
    await spend(store, "ann", 30)

    for moment in (Moment(position=cut["p"]), Moment(at=cut["t"])):
        async with pool.acquire() as conn:
            balances = {(b.account, b.asset): b.balance for b in await balances_as_of(conn, moment)}
        assert balances == {("user:ann", "GOLD"): 100, ("system:treasury", "GOLD"): -100}
    async with pool.acquire() as conn:
        now = {(b.account, b.asset): b.balance for b in await balances_as_of(conn, Moment(position=10**9))}
    assert now == {
        ("user:ann", "GOLD"): 70,
        ("system:treasury", "GOLD"): -100,
        ("system:revenue", "GOLD"): 30,
    }
    assert sum(now.values()) == 0


def test_moments_parse_times_and_positions() -> None:
    assert Moment.parse("42") == Moment(position=42)
    parsed = Moment.parse("2026-01-31T23:59:59Z")
    assert parsed.at is not None
    assert parsed.at.isoformat() == "2026-01-31T23:59:59+00:00"
    naive = Moment.parse("2026-01-31T23:59:59")
    assert naive.at == parsed.at


async def test_api_wallet_as_of(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    async def post(path: str, body: dict[str, object], key: str) -> dict[str, object]:
        response = await client.post(path, json=body, headers={"Idempotency-Key": key})
        assert response.status_code == 201, response.text
        result: dict[str, object] = response.json()
        return result

    await post("/v1/assets", {"code": "GOLD", "name": "Gold", "decimals": 0}, "a")
    await post("/v1/wallets", {"user_id": "ann"}, "w")
    first = await post("/v1/wallets/ann/top-ups", {"asset": "GOLD", "amount": 100}, "t")
    await post("/v1/wallets/ann/spends", {"asset": "GOLD", "amount": 30}, "s")

    position = str(first["consistency_token"]).split(".")[1]
    then = await client.get("/v1/wallets/ann", params={"as_of": position})
    assert then.status_code == 200
    assert then.json()["balances"] == [{"asset": "GOLD", "balance": 100, "held": 0, "available": 100}]
    assert then.json()["version"] == 2
    before_it_existed = await client.get("/v1/wallets/ann", params={"as_of": "2000-01-01T00:00:00Z"})
    assert before_it_existed.status_code == 404
    assert before_it_existed.json()["code"] == "wallet_not_found"
    bad = await client.get("/v1/wallets/ann", params={"as_of": "yesterday"})
    assert (bad.status_code, bad.json()["code"]) == (400, "invalid_request")


async def test_an_event_is_timed_after_its_wallets_lock_and_never_before_its_predecessor(
    pool: asyncpg.Pool,
) -> None:
    """A batch that waited for the wallet records the time it got it, not the time it started: the
    holder's release is seen before the time is taken. And a wallet whose previous event carries a
    later time (a clock stepped back) gets no earlier time: within a stream, times never run
    backwards, so every "as of a time" cut of a wallet is a state it was in."""
    from commands import EventStore

    store = EventStore(pool)
    await define_asset(store)
    await open_wallet(store, "ann")
    async with holding_wallet(pool, "ann") as holder:
        waiting = asyncio.create_task(
            run_batch(pool, record(TopUpCredits(user_id="ann", asset="GOLD", amount=5)), lock_wait_ms=30_000)
        )
        await lock_waits(pool, lambda waits: any(holder in w["blockers"] for w in waits))
        started_waiting = await pool.fetchval(
            "SELECT min(xact_start) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        )
        released_after = await pool.fetchval("SELECT clock_timestamp()")
    [row] = await asyncio.wait_for(waiting, 30)
    assert row["outcome"] == "accepted"
    recorded = await pool.fetchval("SELECT max(recorded_at) FROM events WHERE stream_id = 'wallet:ann'")
    assert started_waiting < released_after < recorded

    # A previous event in the future (as a clock stepped back would leave it): the next is no earlier.
    future = await pool.fetchval(_STEP_BACK)
    await top_up(store, "ann", 1)
    times = [
        r["recorded_at"]
        for r in await pool.fetch(
            "SELECT recorded_at FROM events WHERE stream_id = 'wallet:ann' ORDER BY stream_version"
        )
    ]
    assert times == sorted(times)
    assert times[-1] >= future
