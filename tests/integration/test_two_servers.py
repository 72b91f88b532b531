"""Two API server processes on one database, as behind a load balancer, racing for one wallet and
for one Idempotency-Key. The wallet is held (as an operator's `SELECT … FOR UPDATE` would) until
both processes are seen waiting for it in their own transactions, so the race is staged, not hoped
for; then it is released."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import asyncpg
import httpx

from projections.verify import verify
from tests.conftest import LiveServer
from tests.helpers import AUTH, holding_wallet, lock_waits

SPENDS = 50
AFFORDABLE = 7
DUPLICATES = 20


def _process(wait: asyncpg.Record) -> int | None:
    """The API process a waiting session belongs to (its pool is named ``tally-api:<pid>``)."""
    name: str = wait["application_name"]
    return int(name.split(":")[1]) if name.startswith("tally-api:") else None


async def _setup(url: str, user: str, amount: int) -> None:
    async with httpx.AsyncClient(base_url=url, headers=AUTH) as http:
        for path, body in (
            ("/v1/assets", {"code": "GOLD", "name": "Gold", "decimals": 0}),
            ("/v1/wallets", {"user_id": user}),
            (f"/v1/wallets/{user}/top-ups", {"asset": "GOLD", "amount": amount}),
        ):
            response = await http.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
            assert response.status_code == 201, response.text


async def _send_split(
    servers: tuple[LiveServer, LiveServer],
    count: int,
    request: Callable[[int], tuple[str, dict[str, object], str]],
) -> list[asyncio.Task[httpx.Response]]:
    """``count`` requests, alternating between the two servers, all in flight at once."""
    clients = [httpx.AsyncClient(base_url=s.url, timeout=60, headers=AUTH) for s in servers]

    async def send(i: int) -> httpx.Response:
        path, body, key = request(i)
        return await clients[i % 2].post(path, json=body, headers={"Idempotency-Key": key})

    tasks = [asyncio.create_task(send(i)) for i in range(count)]

    async def close_when_done() -> None:
        await asyncio.gather(*tasks, return_exceptions=True)
        for client in clients:
            await client.aclose()

    asyncio.get_running_loop().create_task(close_when_done())
    return tasks


def _both_processes(servers: tuple[LiveServer, LiveServer]) -> Callable[[list[asyncpg.Record]], bool]:
    pids = {s.process.pid for s in servers}
    return lambda waits: {_process(w) for w in waits} >= pids


async def test_two_processes_spending_one_hot_wallet_never_overdraw_it(
    two_servers: tuple[LiveServer, LiveServer], pool: asyncpg.Pool
) -> None:
    await _setup(two_servers[0].url, "hot", AFFORDABLE * 100 + 40)

    async with holding_wallet(pool, "hot"):
        racing = await _send_split(
            two_servers,
            SPENDS,
            lambda i: ("/v1/wallets/hot/spends", {"asset": "GOLD", "amount": 100}, f"s{i}"),
        )
        waits = await lock_waits(pool, _both_processes(two_servers))
        assert len({w["pid"] for w in waits}) >= 2  # distinct sessions, each in its own transaction
    responses = await asyncio.gather(*racing)

    statuses = [r.status_code for r in responses]
    assert statuses.count(201) == AFFORDABLE
    assert statuses.count(409) == SPENDS - AFFORDABLE
    assert all(r.json()["code"] == "insufficient_funds" for r in responses if r.status_code == 409)
    balance = await pool.fetchval(
        "SELECT state -> 'balances' ->> 'GOLD' FROM streams WHERE stream_id = 'wallet:hot'"
    )
    assert int(balance) == 40
    async with pool.acquire() as conn:
        report = await verify(conn)
    assert report.ok, report.findings


async def test_two_processes_sharing_one_key_apply_it_once(
    two_servers: tuple[LiveServer, LiveServer], pool: asyncpg.Pool
) -> None:
    """The first process to take the key waits for the wallet; the other process's duplicates are
    seen waiting for that one's key, across processes and transactions."""
    await _setup(two_servers[0].url, "dup", 1)
    pids = {s.process.pid for s in two_servers}

    async with holding_wallet(pool, "dup") as holder:

        def one_waits_for_the_other(waits: list[asyncpg.Record]) -> bool:
            claimants = {w["pid"]: _process(w) for w in waits if holder in w["blockers"]}
            return any(
                pid in w["blockers"] and _process(w) in pids - {process}
                for w in waits
                for pid, process in claimants.items()
            )

        racing = await _send_split(
            two_servers,
            DUPLICATES,
            lambda i: ("/v1/wallets/dup/top-ups", {"asset": "GOLD", "amount": 5}, "same-key"),
        )
        await lock_waits(pool, one_waits_for_the_other)
    responses = await asyncio.gather(*racing)

    assert [r.status_code for r in responses] == [201] * DUPLICATES
    assert len({r.content for r in responses}) == 1
    assert sum("idempotent-replayed" not in r.headers for r in responses) == 1
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = 'wallet:dup'") == 3
    balance = await pool.fetchval(
        "SELECT state -> 'balances' ->> 'GOLD' FROM streams WHERE stream_id = 'wallet:dup'"
    )
    assert int(balance) == 6
