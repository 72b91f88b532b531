"""The projector: applies events to the read models, batch by batch, never skipping one.

Each projection is a SQL function (migrations/0002_read_models.sql) that reads the next batch of
events of *finished* transactions in (transaction_id, global_position) order, applies it, and
advances its checkpoint in the same transaction. Why not ``global_position > checkpoint``: positions
are drawn at insert and transactions commit in any order, so a reader by position alone would skip
an event committed late, forever. tests/integration/test_projector.py commits two transactions out
of order and checks that nothing is skipped.

One projector instance is active per database: it holds a session advisory lock on its dedicated
listening connection; others stand by and take over when that connection goes away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

import asyncpg
import msgspec

from projections.positions import Position

log = logging.getLogger("tally.projector")

PROJECTIONS: Final = {
    "wallets": "SELECT applied, last_xid, last_position FROM tally_project_wallets($1)",
    "history": "SELECT applied, last_xid, last_position FROM tally_project_history($1)",
    "system": "SELECT applied, last_xid, last_position FROM tally_project_system($1)",
}
EVENTS_CHANNEL: Final = "tally_events"
PROGRESS_CHANNEL: Final = "tally_projections"
PROJECTOR_LOCK_KEY: Final = 0x7A11_0002
# Under load, wake-ups arrive far more often than a projection round is worth running: pacing
# rounds (and the NOTIFYs that trigger them) lets each round apply a larger batch for the same
# fixed cost, at the price of at most this much extra lag.
MIN_ROUND_INTERVAL: Final = 0.005
_NOTIFY = "SELECT pg_notify($1, $2)"


async def project_batch(pool: asyncpg.Pool, name: str, batch_size: int) -> tuple[int, Position]:
    """Apply at most ``batch_size`` events to projection ``name``; (applied, checkpoint after)."""
    row = await pool.fetchrow(PROJECTIONS[name], batch_size)
    assert row is not None
    return row["applied"], Position(int(row["last_xid"]), row["last_position"])


async def catch_up(pool: asyncpg.Pool, batch_size: int) -> dict[str, Position]:
    """Apply every event available now to every projection; their checkpoints when done."""
    checkpoints = {}
    for name in PROJECTIONS:
        while True:
            applied, checkpoint = await project_batch(pool, name, batch_size)
            if applied < batch_size:
                break
        checkpoints[name] = checkpoint
    return checkpoints


class Projector:
    """Runs the projections until ``stop`` is set. Woken by NOTIFY on ``tally_events`` (sent by the
    API after commands commit), polling every ``poll_interval`` seconds as the fallback."""

    def __init__(self, pool: asyncpg.Pool, url: str, *, batch_size: int, poll_interval: float) -> None:
        self._pool = pool
        self._url = url
        self._batch_size = batch_size
        self._poll_interval = poll_interval
        self._wake = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        listener = await asyncpg.connect(self._url, server_settings={"application_name": "tally-projector"})
        try:
            await listener.add_listener(EVENTS_CHANNEL, lambda *_: self._wake.set())
            if not await self._become_active(listener, stop):
                return
            log.info("projector active")
            last: dict[str, Position] = {}
            while not stop.is_set():
                self._wake.clear()
                checkpoints = await catch_up(self._pool, self._batch_size)
                if checkpoints != last:
                    payload = msgspec.json.encode({k: v.token() for k, v in checkpoints.items()}).decode()
                    await self._pool.execute(_NOTIFY, PROGRESS_CHANNEL, payload)
                    last = checkpoints
                await asyncio.sleep(MIN_ROUND_INTERVAL)
                await _wait_any(self._wake, stop, self._poll_interval)
        finally:
            with contextlib.suppress(Exception):
                await listener.close()

    async def _become_active(self, listener: asyncpg.Connection, stop: asyncio.Event) -> bool:
        while not stop.is_set():
            if await listener.fetchval("SELECT pg_try_advisory_lock($1)", PROJECTOR_LOCK_KEY):
                return True
            log.info("another projector is active; standing by")
            await _wait_any(asyncio.Event(), stop, self._poll_interval)
        return False


async def _wait_any(wake: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
    waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
    try:
        await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class ProjectorWaker:
    """Coalesces "events were appended" into NOTIFYs to the projectors, outside any command's
    transaction: a NOTIFY inside the command would take PostgreSQL's global notify lock at commit
    and serialise every commit behind it. At most one NOTIFY is in flight; pokes meanwhile fold
    into the next one."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self._pool = pool
        self._pending = asyncio.Event()

    def poke(self) -> None:
        self._pending.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await _wait_any(self._pending, stop, 1.0)
            if self._pending.is_set():
                self._pending.clear()
                try:
                    await self._pool.execute(_NOTIFY, EVENTS_CHANNEL, "")
                except (asyncpg.PostgresError, OSError):
                    log.warning("could not notify the projectors; they will poll", exc_info=True)
                await asyncio.sleep(MIN_ROUND_INTERVAL)
