"""Faults, each with real processes and a real PostgreSQL: a wallet row held by another session, a
PostgreSQL restart under load (a cluster the test owns), a network path that stops answering (a
TCP proxy the test controls), and a flood of expensive reads beside commands.

Each asserts what the ledger promises: every acknowledged command present once, every key resent
replays or applies once, `tally verify` clean (tests/faults.py, ``check_load``); that failures are
503 problem+json with Retry-After, never a 500 or a hang; and answer times only by bounds far above
normal (the figures are printed: run with -s to read them)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import msgspec

from domain import TopUpCredits
from tests.faults import (
    Attempt,
    LoadRecord,
    TcpProxy,
    check_load,
    open_wallets,
    own_cluster,
    run_load,
    serving,
    sigkill,
)
from tests.helpers import AUTH, holding_wallet, run_batch
from tests.helpers import record as make_record

USERS = [f"u{i}" for i in range(8)]
# The projector holding the active role (its advisory lock), by its application name.
_ACTIVE_PROJECTOR = """
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a USING (pid)
 WHERE l.locktype = 'advisory' AND l.granted AND a.datname = current_database()
   AND a.application_name LIKE 'tally-projector:%'
"""
HELD = USERS[0]


def _problem(attempt: Attempt) -> dict[str, Any]:
    body: dict[str, Any] = attempt.json()
    return body


def _code(attempt: Attempt) -> str:
    return str(_problem(attempt)["code"])


def _assert_only(record: LoadRecord, allowed: set[str]) -> None:
    """Every attempt ended in one of ``allowed`` (statuses, or transport error names)."""
    assert set(record.statuses()) <= allowed, dict(record.statuses())


def _assert_unavailable(attempt: Attempt) -> None:
    assert attempt.status == 503, attempt
    problem = _problem(attempt)
    assert problem["code"] in {"unavailable", "overloaded"}, problem


async def test_a_held_wallet_delays_only_its_own_commands(db_url: str, pool: asyncpg.Pool) -> None:
    """An operator's session holds one wallet's row (`SELECT … FOR UPDATE`) while 16 callers load
    eight wallets. Commands on the other seven never wait for it: their slowest answer stays far
    below the lock timeout (5 s here), which every one of them would otherwise have waited out.
    The held wallet's own commands answer 503 `unavailable` once the lock timeout passes, and are
    applied exactly once when resent after the session lets go."""
    record = LoadRecord()
    stop = asyncio.Event()
    env = {"TALLY_LOCK_TIMEOUT": "5", "TALLY_COMMAND_TIMEOUT": "8"}
    async with serving(db_url, env=env) as server:
        await open_wallets(server.url, USERS)
        # Two callers on the wallet to be held, fourteen on the others (a caller waits for its answer).
        load = asyncio.gather(
            run_load(server.url, USERS[1:], workers=14, until=stop, record=record),
            run_load(server.url, [HELD], workers=2, until=stop, record=record, seed=1),
        )
        await record.wait_for(lambda r: r.count(201) >= 200, within=60)
        async with holding_wallet(pool, HELD):
            held_since = time.perf_counter()
            before = record.count(201)
            # The held wallet's commands wait for it, in the server's retry, and give up.
            await record.wait_for(lambda r: r.count(503) >= 4 and r.count(201) >= before + 300, within=60)
            held_until = time.perf_counter()
        stop.set()
        await asyncio.wait_for(load, 60)

        during = [
            a for a in record.attempts if held_since <= a.started and a.started + a.latency <= held_until
        ]
        others = [a for a in during if f"/{HELD}/" not in a.path]
        assert others
        assert all(a.status in {201, 409} for a in others), {a.status for a in others}
        slowest_other = max(a.latency for a in others)
        assert slowest_other < 2.5, slowest_other  # 5 s if they had waited for the held wallet
        refused = [a for a in record.attempts if a.status == 503]
        for attempt in refused:
            _assert_unavailable(attempt)
            assert f"/{HELD}/" in attempt.path
            assert 4.0 < attempt.latency < 8 + 5, attempt.latency  # after the lock timeout, bounded
        _assert_only(record, {"201", "409", "503"})
        report = await check_load(record, base_url=server.url, owner_url=db_url)
    print(
        f"\nheld wallet: {len(refused)} answered 503 after {min(a.latency for a in refused):.2f} s or more; "
        f"other wallets while it was held: {len(others)} commands, slowest {slowest_other * 1000:.0f} ms; "
        f"{report}"
    )


async def test_postgres_restarted_under_load_recovers_by_itself(tmp_path: Path) -> None:
    """PostgreSQL goes down (fast shutdown) and comes back under load. Meanwhile commands answer 503
    with Retry-After, never 500; afterwards the API takes commands again, its LISTEN connection and
    its projector are back, with no operator, and nothing acknowledged is lost."""
    record = LoadRecord()
    stop = asyncio.Event()
    async with own_cluster(tmp_path) as cluster, serving(cluster.url) as server:
        await open_wallets(server.url, USERS)
        load = asyncio.create_task(run_load(server.url, USERS, workers=16, until=stop, record=record))
        await record.wait_for(lambda r: r.count(201) >= 200, within=60)
        await cluster.stop(mode="fast")
        await record.wait_for(lambda r: r.count(503) >= 5, within=60)
        await cluster.start()
        before = record.count(201)
        await record.wait_for(lambda r: r.count(201) >= before + 300, within=60)
        stop.set()
        await asyncio.wait_for(load, 60)

        pid = server.process.pid
        admin = await asyncpg.connect(cluster.url)
        try:
            # The watcher listens again (its connection is named after the process).
            async with asyncio.timeout(30):
                # Polled: the database has nothing to wait on for another session's arrival.
                while not await admin.fetchval(  # noqa: ASYNC110
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
                    f"tally-api:{pid}:watcher",
                ):
                    await asyncio.sleep(0.1)
        finally:
            await admin.close()
        # The projector runs again: a read of the newest command's effect is answered (each try
        # waits up to the consistency timeout; the projector may still be in its reconnect pause).
        newest = max((a for a in record.acknowledged), key=lambda a: a.started)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=30) as http:
            user = newest.path.split("/")[3]
            token = newest.json()["consistency_token"]
            for _ in range(6):
                read = await http.get(f"/v1/wallets/{user}/transactions", params={"consistent_with": token})
                if read.status_code != 503:
                    break
            assert read.status_code == 200, read.text
        for attempt in record.attempts:
            if attempt.status == 503:
                _assert_unavailable(attempt)
        assert record.count(500) == 0
        _assert_only(record, {"201", "409", "503"})
        report = await check_load(record, base_url=server.url, owner_url=cluster.url)
    print(f"\nrestart: {report}")


async def test_a_stalled_database_path_is_answered_in_bounded_time(tmp_path: Path) -> None:
    """The network path to PostgreSQL stops forwarding without closing (no reset, no answer).
    Every request is answered anyway: commands 503 within the command timeout (2 s here) plus a
    margin, readiness 503, queries 503. Once the path answers again, so does the API, and every key
    resent replays or applies once."""
    record = LoadRecord()
    stop = asyncio.Event()
    env = {
        "TALLY_COMMAND_TIMEOUT": "2", "TALLY_LOCK_TIMEOUT": "1", "TALLY_READ_TIMEOUT": "2",
        "TALLY_COMMAND_QUEUE": "8",
    }  # fmt: skip
    bound = 2 + 5.0  # far above normal; a hang is minutes
    async with (
        own_cluster(tmp_path) as cluster,
        TcpProxy.to_url(cluster.url) as proxy,
        serving(proxy.url_via(cluster.url), env=env) as server,
    ):
        await open_wallets(server.url, USERS)
        load = asyncio.create_task(run_load(server.url, USERS, workers=16, until=stop, record=record))
        await record.wait_for(lambda r: r.count(201) >= 200, within=60)
        proxy.stall()
        stalled_at = time.perf_counter()
        await record.wait_for(lambda r: r.count(503) >= 20, within=60)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
            started = time.perf_counter()
            ready = await http.get("/health/ready")
            ready_took = time.perf_counter() - started
            started = time.perf_counter()
            wallet = await http.get(f"/v1/wallets/{HELD}/transactions")
            read_took = time.perf_counter() - started
        assert ready.status_code == 503
        assert ready_took < bound
        assert wallet.status_code == 503
        assert read_took < bound
        assert wallet.headers["retry-after"]
        proxy.resume()
        before = record.count(201)
        await record.wait_for(lambda r: r.count(201) >= before + 200, within=60)
        stop.set()
        await asyncio.wait_for(load, 60)

        during = [a for a in record.attempts if a.started >= stalled_at and a.status != 201]
        assert during
        for attempt in record.attempts:
            if attempt.status == 503:
                _assert_unavailable(attempt)
                assert attempt.latency < bound, attempt.latency
        overloaded = sum(
            1 for a in record.attempts if a.status == 503 and _problem(a)["code"] == "overloaded"
        )
        _assert_only(record, {"201", "409", "503"})
        report = await check_load(record, base_url=server.url, owner_url=cluster.url)
    print(
        f"\nstalled path: readiness answered in {ready_took:.2f} s, a query in {read_took:.2f} s, "
        f"{overloaded} commands refused as overloaded; {report}"
    )


async def test_a_read_flood_leaves_commands_alone(db_url: str, pool: asyncpg.Pool) -> None:
    """100 callers (a process of their own) read a wallet of 20,000 events as of the past and deep
    in its history, and ten of them wait for tokens, while 4 callers send commands (more would
    saturate this 2-core machine by themselves: the test and its load share it with the server and
    PostgreSQL). Queries have their own connections and a bounded share of the process
    (TALLY_READ_CONCURRENCY); commands keep theirs. The figures (command latency without and with
    the flood) are printed; the assertion is only a bound far above normal."""
    async with serving(db_url) as server:
        await open_wallets(server.url, [*USERS, "deep"])
        token = await _deepen(pool, "deep", 20_000)
        async with httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http:
            while (await http.get("/v1/wallets/deep", params={"consistent_with": token})).status_code != 200:
                pass  # each try waits for the projections (up to the consistency timeout)
        quiet = await run_load(server.url, USERS, workers=4, until=5.0)
        flood = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tests.read_flood", server.url, "100",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert flood.stdin is not None
        assert flood.stdout is not None
        try:
            assert json.loads(await asyncio.wait_for(flood.stdout.readline(), 60)) == {"ready": True}
            record = await run_load(server.url, USERS, workers=4, until=5.0)
            flood.stdin.close()
            reads = json.loads(await asyncio.wait_for(flood.stdout.readline(), 60))["answers"]
            assert await flood.wait() == 0
        finally:
            if flood.returncode is None:
                flood.kill()
                await flood.wait()
        statuses = {key.split()[1] for key in reads if key != "readers started"}
        assert statuses <= {"200", "404", "503"}, reads
        assert reads["as_of_time 200"], reads
        assert reads["history 200"], reads
        _assert_only(record, {"201", "409"})
        flooded = record.latency(lambda a: a.acknowledged)
        assert flooded.p99 < 1.0, (flooded, quiet.latency(), reads)  # the symptom was 1.4 s
        report = await check_load(record, base_url=server.url, owner_url=db_url)
    print(
        f"\nread flood: commands p99 {quiet.latency(lambda a: a.acknowledged).p99 * 1000:.0f} ms alone, "
        f"{flooded.p99 * 1000:.0f} ms beside 100 readers ({reads}); {report}"
    )


async def _deepen(pool: asyncpg.Pool, user: str, events: int) -> str:
    """``events`` top-ups of ``user``, written straight through the batch function, 1,000 a call;
    the last one's consistency token."""
    for start in range(0, events, 1000):
        records = [
            make_record(TopUpCredits(user_id=user, asset="GOLD", amount=1), f"deep-{start + i}")
            for i in range(1000)
        ]
        rows = await run_batch(pool, *records, lock_wait_ms=None)
        assert all(r["outcome"] == "accepted" for r in rows)
    return str(msgspec.json.decode(rows[-1]["body"])["consistency_token"])


async def test_two_api_processes_and_two_projectors_share_one_database(
    db_url: str, pool: asyncpg.Pool
) -> None:
    """Two API processes, each running a projector (one active, one standing by), take the load
    together; the active projector's process is SIGKILLed midway and the other takes over. Every
    acknowledged command is applied once, every key replays through either process, the read models
    catch up with every command, and `tally verify` is clean."""
    record = LoadRecord()
    stop = asyncio.Event()
    async with serving(db_url) as first, serving(db_url) as second:
        await open_wallets(first.url, USERS)
        load = asyncio.gather(
            run_load(first.url, USERS, workers=8, until=stop, record=record),
            run_load(second.url, USERS, workers=8, until=stop, record=record, seed=1),
        )
        await record.wait_for(lambda r: r.count(201) >= 300, within=60)
        active = await pool.fetchval(_ACTIVE_PROJECTOR)
        assert active is not None
        victim, survivor = (
            (first, second) if active == f"tally-projector:{first.process.pid}" else (second, first)
        )
        assert active == f"tally-projector:{victim.process.pid}"
        assert await sigkill(victim.process) == -9
        before = record.count(201)
        await record.wait_for(lambda r: r.count(201) >= before + 300, within=60)
        stop.set()
        await asyncio.wait_for(load, 60)
        # The survivor's projector took over: it applies everything (a read of the newest answer).
        newest = max(record.acknowledged, key=lambda a: a.started + a.latency)
        async with httpx.AsyncClient(base_url=survivor.url, headers=AUTH, timeout=60) as http:
            user = newest.path.split("/")[3]
            read = await http.get(
                f"/v1/wallets/{user}", params={"consistent_with": newest.json()["consistency_token"]}
            )
        assert read.status_code == 200, read.text
        assert await pool.fetchval(_ACTIVE_PROJECTOR) == f"tally-projector:{survivor.process.pid}"
        _assert_only(record, {"201", "409", "503", "RemoteProtocolError", "ReadError", "ConnectError"})
        report = await check_load(record, base_url=survivor.url, owner_url=db_url)
    print(f"\ntwo processes, the active projector's killed: {report}")
