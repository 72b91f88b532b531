"""`tally serve --workers 2`: two API processes on one port (measured in make bench: on two cores
they serve nearly twice the spends of one). Requests are spread over both (each process's database
sessions are named after it), the floor holds across them, and SIGTERM stops the whole group."""

from __future__ import annotations

import asyncio
import signal
import uuid
from pathlib import Path

import asyncpg
import httpx

from projections.verify import verify
from tests.conftest import serving
from tests.helpers import AUTH, holding_wallet, lock_waits, projected, stream_balance

SPENDS = 40  # at most, sent four at a time until both processes are seen waiting
AFFORDABLE = 2  # fewer than the four spends of the first round


def _process(wait: asyncpg.Record) -> int | None:
    name: str = wait["application_name"]
    return int(name.split(":")[1]) if name.startswith("tally-api:") else None


async def test_two_worker_processes_share_one_port(db_url: str, pool: asyncpg.Pool) -> None:
    env = {"TALLY_LOCK_TIMEOUT": "60", "TALLY_COMMAND_TIMEOUT": "90"}
    async with serving(db_url, env=env, args=["--workers", "2"]) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
            for path, body in (
                ("/v1/assets", {"code": "GOLD", "name": "Gold", "decimals": 0}),
                ("/v1/wallets", {"user_id": "w"}),
                ("/v1/wallets/w/top-ups", {"asset": "GOLD", "amount": AFFORDABLE * 10}),
            ):
                response = await http.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
                assert response.status_code == 201, response.text

            # Both workers up: each opens its pool as it starts (sessions named tally-api:<pid>).
            await _sessions_of_processes(pool, 2)

            async def spend() -> int:
                async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as fresh:
                    response = await fresh.post(  # a connection of its own: the kernel picks a worker
                        "/v1/wallets/w/spends", json={"asset": "GOLD", "amount": 10},
                        headers={"Idempotency-Key": uuid.uuid4().hex},
                    )  # fmt: skip
                return response.status_code

            spends: list[asyncio.Task[int]] = []
            async with holding_wallet(pool, "w") as holder:
                # Spends until both processes' sessions queue for the held wallet (behind it, or
                # behind each other; a process queues one session per wallet and parks the rest).
                while len(spends) < SPENDS:
                    spends += [asyncio.create_task(spend()) for _ in range(4)]
                    try:
                        waits = await lock_waits(
                            pool, lambda w: len({_process(x) for x in w} - {None}) >= 2, 2
                        )
                        break
                    except AssertionError:
                        continue
                else:
                    waits = await lock_waits(pool, lambda w: len({_process(x) for x in w} - {None}) >= 2)
                assert any(holder in x["blockers"] for x in waits)
            statuses = await asyncio.wait_for(asyncio.gather(*spends), 120)
        assert sorted(statuses) == [201] * AFFORDABLE + [409] * (len(statuses) - AFFORDABLE)
        assert await stream_balance(pool, "w") == 0
        await projected(pool)
        async with pool.acquire() as conn:
            assert (await verify(conn)).ok
        children = await asyncio.create_subprocess_exec(
            "pgrep", "-P", str(server.process.pid), stdout=asyncio.subprocess.PIPE
        )
        workers = (await children.communicate())[0].split()
        assert len(workers) >= 2
        server.process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(server.process.wait(), 60) == 0
    for pid in workers:
        assert await _exits(int(pid)), f"worker {pid.decode()} outlived its server"


async def _sessions_of_processes(pool: asyncpg.Pool, count: int, within: float = 60.0) -> None:
    """Wait until ``count`` API processes have sessions open on this database (a bound, not a timing
    assertion)."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        names = await pool.fetch(
            "SELECT DISTINCT application_name FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name LIKE 'tally-api:%'"
        )
        if len(names) >= count:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{count} API processes did not connect within {within} s")


def _state(pid: int) -> str | None:
    """The process's state letter from /proc (None: no such process)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


async def _exits(pid: int, within: float = 30.0) -> bool:
    """Whether process ``pid`` ends (or is a zombie nobody reaped yet) within ``within`` seconds: a
    bound on waiting, not a timing assertion."""
    deadline = asyncio.get_running_loop().time() + within
    while asyncio.get_running_loop().time() < deadline:
        state = _state(pid)
        if state is None or state == "Z":
            return True
        await asyncio.sleep(0.1)
    return False
