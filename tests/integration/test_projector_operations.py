"""The projector survives what production throws at it: a poison event, the death of the active
instance (SIGKILL), and a database restart; and it reports its lag."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest

from api.database import embedded_server
from api.migrate import migrate
from commands import EventStore
from projections.projector import PROJECTOR_LOCK_KEY, Projector, catch_up
from projections.status import ProjectionStatus, projection_status, resume_projection
from tests.helpers import add_test_client, define_asset, open_wallet, projected, top_up


async def _eventually(probe: asyncpg.Pool, sql: str, expected: object, within: float = 30.0) -> None:
    """Poll until ``sql`` returns ``expected`` (a bound on waiting, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + within
    while (found := await probe.fetchval(sql)) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{sql!r} still returns {found!r}, not {expected!r}, after {within} s")
        await asyncio.sleep(0.05)


async def test_a_poison_event_stops_its_projection_loudly(
    pool: asyncpg.Pool, store: EventStore, foreign_events: set[int]
) -> None:
    await define_asset(store)
    await open_wallet(store, "ann")
    await top_up(store, "ann", 10)
    poison = await pool.fetchval(
        """INSERT INTO events (stream_id, stream_version, event_id, event_type, data, metadata, hash,
                                recorded_at)
           VALUES ('wallet:zed', 1, gen_random_uuid(), 'CreditsSpent',
                   '{"transaction_id": "x", "kind": "spend", "user_id": "zed", "asset": "GOLD", "amount": 1,
                     "balance_after": 0, "reference": null, "metadata": {},
                     "entries": [{"account": "user:zed", "amount": "lots"}]}', '{}',
                   tally_genesis_hash(), now())
           RETURNING global_position"""
    )
    foreign_events.add(poison)  # an amount of "lots" decodes into no domain event, on purpose
    await top_up(store, "ann", 5)  # an event after the poison one

    async def settled() -> dict[str, ProjectionStatus]:
        """Run rounds until the projections have gone as far as they can (other transactions in
        the cluster may hold back what they may read for a moment)."""
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            await catch_up(pool, batch_size=100)
            status = {s.name: s for s in await projection_status(pool)}
            if all(s.error is not None or s.events_behind == 0 for s in status.values()):
                return status
            assert asyncio.get_running_loop().time() < deadline, status
            await asyncio.sleep(0.05)

    status = await settled()
    for _ in range(3):  # more rounds neither skip the poison event nor apply anything past it
        later = (await settled())["wallets"]
        assert (later.events_applied, later.error_position) == (
            status["wallets"].events_applied,
            status["wallets"].error_position,
        )

    wallets = status["wallets"]
    assert wallets.error is not None
    assert wallets.error_position == poison
    assert f"position {poison}" in wallets.error
    assert "wallet:zed" in wallets.error
    assert wallets.events_behind == 2  # the poison event and the one after it
    assert int(await pool.fetchval("SELECT balance FROM rm_balances WHERE user_id = 'ann'")) == 10
    assert status["system"].error is not None  # it reads the legs too
    # `history` does not read leg amounts: it applied everything and runs on.
    assert status["history"].error is None
    assert status["history"].events_behind == 0

    assert await resume_projection(pool, "wallets")
    again = (await settled())["wallets"]
    assert again.error_position == poison  # still poison: stopped again, still not skipped


async def test_lag_is_reported(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "ann")
    # The age of the oldest unapplied event, measured before the status is read: the status, read
    # later, must report at least this much (and it is more than nothing: time has passed since
    # that event's transaction).
    age_before = await pool.fetchval(
        "SELECT extract(epoch FROM now() - min(recorded_at))::float8 FROM events"
    )
    assert age_before > 0
    statuses = await projection_status(pool)
    assert {s.name: s.events_behind for s in statuses} == {"wallets": 2, "history": 2, "system": 2}
    # (The status rounds to milliseconds; rounding keeps the order.)
    assert all(s.seconds_behind >= round(age_before, 3) for s in statuses), (age_before, statuses)
    await projected(pool)
    assert {(s.events_behind, s.seconds_behind) for s in await projection_status(pool)} == {(0, 0.0)}


_ACTIVE = f"""
SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.objid = {PROJECTOR_LOCK_KEY} AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def test_a_standby_takes_over_when_the_active_projector_is_killed(
    db_url: str, pool: asyncpg.Pool, store: EventStore
) -> None:
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "TALLY_LOG_LEVEL": "warning",
        "TALLY_PROJECTOR_POLL_INTERVAL": "0.2",
    }
    procs = [
        await asyncio.create_subprocess_exec(sys.executable, "-m", "api.cli", "projector", env=env)
        for _ in range(2)
    ]
    try:
        await define_asset(store)
        await open_wallet(store, "ann")
        await _eventually(pool, "SELECT min(events_applied) FROM projection_checkpoints", 2)
        active = await pool.fetchval(_ACTIVE)
        assert active is not None
        victim = next(p for p in procs if active == f"tally-projector:{p.pid}")
        survivor = next(p for p in procs if p is not victim)

        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        await top_up(store, "ann", 42)

        await _eventually(pool, "SELECT min(events_applied) FROM projection_checkpoints", 3)
        assert await pool.fetchval(_ACTIVE) == f"tally-projector:{survivor.pid}"
        assert int(await pool.fetchval("SELECT balance FROM rm_balances WHERE user_id = 'ann'")) == 42
    finally:
        for proc in procs:
            if proc.returncode is None:
                proc.terminate()
                await proc.wait()


@pytest.fixture
async def own_server(tmp_path: Path) -> AsyncIterator[tuple[str, object]]:
    """A PostgreSQL of this test's own, which it may restart."""
    with embedded_server(tmp_path / "pg") as server:
        url = server.get_uri("postgres")
        conn = await asyncpg.connect(url)
        try:
            await migrate(conn)
            await add_test_client(conn)
        finally:
            await conn.close()
        yield url, server


async def test_the_projector_reconnects_after_a_database_restart(own_server: tuple[str, object]) -> None:
    from pgserver._commands import pg_ctl

    url, server = own_server
    pool = await asyncpg.create_pool(url, min_size=1, max_size=4)
    stop = asyncio.Event()
    task = asyncio.create_task(Projector(pool, url, batch_size=100, poll_interval=0.1).run(stop))
    try:
        store = EventStore(pool)
        await define_asset(store)
        await _eventually(pool, "SELECT min(events_applied) FROM projection_checkpoints", 1)

        await asyncio.to_thread(
            pg_ctl,
            ["-w", "restart", "-m", "fast"],
            pgdata=server.pgdata,
            user=server.system_user,  # type: ignore[attr-defined]
        )
        probe = await asyncpg.create_pool(url, min_size=1, max_size=1)
        try:
            await open_wallet(EventStore(probe), "after-restart")
            await _eventually(probe, "SELECT min(events_applied) FROM projection_checkpoints", 2)
            assert task.done() is False
        finally:
            await probe.close()
    finally:
        stop.set()
        await task
        await pool.close()
