"""The fault-test infrastructure (tests/faults.py) proven on itself, then used: the TCP proxy stalls
and resumes, an owned cluster survives a crash (immediate stop), and an API process SIGKILLed under
load loses no acknowledged command and applies no command twice."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.faults import (
    LoadRecord,
    TcpProxy,
    check_load,
    open_wallets,
    own_cluster,
    run_load,
    serving,
    sessions_gone,
    sigkill,
)
from tests.helpers import APP_ROLE, TEST_CLIENT, TEST_CLIENT_ID, holding_wallet, lock_waits

TEST_CLIENT_UUID = uuid.UUID(TEST_CLIENT_ID)
USERS = [f"u{i}" for i in range(8)]
WORKERS = 16
ACKNOWLEDGED_BEFORE_THE_KILL = 200
BALANCE = 500


async def test_the_proxy_stalls_without_closing_and_resumes(tmp_path: Path) -> None:
    async with own_cluster(tmp_path) as cluster, TcpProxy.to_url(cluster.url) as proxy:
        url = proxy.url_via(cluster.url)
        assert f":{proxy.port}/" in url
        conn = await asyncpg.connect(url)
        try:
            assert await conn.fetchval("SELECT 1") == 1
            proxy.stall()
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(conn.fetchval("SELECT 2"), 1.0)
            # A new connection is accepted while stalled, and stalled too: it never gets an answer.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(asyncpg.connect(url), 1.0)
            assert proxy.connections >= 2  # nothing was closed
        finally:
            conn.terminate()
        proxy.resume()
        again = await asyncpg.connect(url)
        try:
            assert await again.fetchval("SELECT 3") == 3
            await proxy.reset()
            with pytest.raises((asyncpg.PostgresConnectionError, asyncpg.InterfaceError, ConnectionError)):
                await again.fetchval("SELECT 4")
        finally:
            again.terminate()
        assert proxy.connections == 0
        fresh = await asyncpg.connect(url)  # reset ended connections, not the proxy
        try:
            assert await fresh.fetchval("SELECT 5") == 5
        finally:
            await fresh.close()


async def test_an_owned_cluster_keeps_committed_data_through_a_crash(tmp_path: Path) -> None:
    async with own_cluster(tmp_path) as cluster:
        conn = await asyncpg.connect(cluster.url)
        try:
            await conn.execute("CREATE TABLE kept (n int)")
            await conn.execute("INSERT INTO kept VALUES (42)")
        finally:
            await conn.close()
        before = cluster.postmaster_pid()
        assert before is not None
        await cluster.restart(mode="immediate")
        after = cluster.postmaster_pid()
        assert after is not None
        assert after != before  # a new postmaster, on the same port
        conn = await asyncpg.connect(cluster.url)
        try:
            assert await conn.fetchval("SELECT n FROM kept") == 42
            # The application role can log in, and the test client exists (the API's start-up).
            name = await conn.fetchval("SELECT name FROM clients WHERE client_id = $1", TEST_CLIENT_UUID)
            assert name == TEST_CLIENT
        finally:
            await conn.close()
        app = await asyncpg.connect(cluster.app_url)
        try:
            assert await app.fetchval("SELECT current_user") == APP_ROLE
        finally:
            await app.close()
        await cluster.stop()
        assert not cluster.running
        with pytest.raises(ConnectionRefusedError):  # the postmaster is gone, and its port closed
            await asyncpg.connect(cluster.url)
        await cluster.start()
        assert cluster.running


async def test_an_api_process_sigkilled_mid_load_loses_no_acknowledged_command(
    db_url: str, pool: asyncpg.Pool
) -> None:
    """Phase one: 16 callers load an API process; once it has acknowledged enough, one wallet is held
    (as an operator's `SELECT … FOR UPDATE` would) until the process's commands are seen waiting for
    it in the database, so requests are surely in flight, inside the server and inside PostgreSQL,
    when it is SIGKILLed. Phase two: a new process on the same database; every acknowledged command
    is applied once, every key replays, `tally verify` passes."""
    record = LoadRecord()
    stop = asyncio.Event()
    async with serving(db_url) as first:
        # Small balances, and more spends than top-ups: some spends are refused (409), and those
        # decisions must replay too.
        await open_wallets(first.url, USERS, balance=BALANCE)
        load = asyncio.create_task(
            run_load(first.url, USERS, workers=WORKERS, until=stop, record=record, spend_share=0.6)
        )
        await record.wait_for(lambda r: r.count(201) >= ACKNOWLEDGED_BEFORE_THE_KILL, within=60)
        pid = first.process.pid
        async with holding_wallet(pool, USERS[0]):
            await lock_waits(pool, lambda waits: f"tally-api:{pid}" in {w["application_name"] for w in waits})
            stop.set()  # no new requests; those in flight stay there
            in_flight = record.in_flight
            assert await sigkill(first.process) == -9
        await asyncio.wait_for(load, 60)
        # The dead process's transactions end: those that waited for the wallet commit now (their
        # caller is gone), the rest were rolled back when their connections closed.
        await sessions_gone(db_url, f"tally-api:{pid}")

    died_in_flight = [a for a in record.failed if a.status is None and not a.unsent]
    assert in_flight > 0
    assert died_in_flight, f"no request was in flight at the kill: {dict(record.statuses())}"

    async with serving(db_url) as second:
        report = await check_load(record, base_url=second.url, owner_url=db_url)
    assert report.replays.applied_unanswered or report.replays.applied_on_resend
    print(f"\n{in_flight} in flight at the SIGKILL, {len(died_in_flight)} died with it; {report}")
