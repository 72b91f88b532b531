"""The projector: applies events to the read models, batch by batch, never skipping one.

Each projection is a SQL function (projections/sql/tally_project_*.sql) that reads the next batch
of events of *finished* transactions in (writer_xid, global_position) order, applies it, and
advances its checkpoint in the same transaction. Why not ``global_position > checkpoint``: positions
are drawn at insert and transactions commit in any order, so a reader by position alone would skip
an event committed late, forever. tests/integration/test_projector.py commits two transactions out
of order and checks that nothing is skipped.

One projector instance is active per database: it holds a session advisory lock on its dedicated
listening connection; others stand by and take over when that connection goes away (the process
died, or the database restarted). tests/integration/test_projector_operations.py kills the active
one with SIGKILL and watches a standby take over.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from typing import ClassVar, Final

import asyncpg
import msgspec

from commands.errors import is_transient
from commands.expiry import expire_holds
from projections.positions import Position
from projections.reader import Reader
from projections.status import RESTORED

log = logging.getLogger("tally.projector")

PROJECTIONS: Final = {
    "wallets": "SELECT applied, last_xid, last_position FROM tally_project_wallets($1)",
    "history": "SELECT applied, last_xid, last_position FROM tally_project_history($1)",
    "system": "SELECT applied, last_xid, last_position FROM tally_project_system($1)",
}
EVENTS_CHANNEL: Final = "tally_events"
PROGRESS_CHANNEL: Final = "tally_projections"
PROJECTOR_LOCK_KEY: Final = 0x7A11_0002
PROJECTION_LOCK_BASE: Final = 0x7A11_0010
# Under load, wake-ups arrive far more often than a projection round is worth running: pacing
# rounds (and the NOTIFYs that trigger them) lets each round apply a larger batch for the same
# fixed cost, at the price of at most this much extra lag.
MIN_ROUND_INTERVAL: Final = 0.02
RECONNECT_DELAYS: Final = (0.2, 0.5, 1.0, 2.0, 5.0)

_NOTIFY = "SELECT pg_notify($1, $2)"
_HISTORY_AHEAD = "SELECT tally_history_ahead()"
# How often the active projector records the expiry of holds whose expires_at has passed
# (commands/expiry.py). Nothing waits for it: a hold stops holding at its expires_at whether or not
# its HoldExpired is recorded yet.
EXPIRY_SWEEP_INTERVAL: Final = 5.0
_STOPPED = "SELECT name FROM projection_checkpoints WHERE error IS NOT NULL"
_NEXT_EVENT = """
SELECT e.global_position, e.stream_id, e.stream_version, e.event_type
  FROM projection_checkpoints cp, tally_next_events(cp.last_xid, cp.last_position, 1) e
 WHERE cp.name = $1
"""
_STOP_PROJECTION = """
UPDATE projection_checkpoints SET error = $2, error_position = $3, stopped_at = now() WHERE name = $1
"""


def projection_lock_key(name: str) -> int:
    """The transaction-level advisory lock every live batch of ``name`` takes first, and the rebuild
    swap too: whoever waits for it holds nothing else, so the two cannot deadlock."""
    return PROJECTION_LOCK_BASE + list(PROJECTIONS).index(name)


async def project_batch(pool: asyncpg.Pool, name: str, batch_size: int) -> tuple[int, Position]:
    """Apply at most ``batch_size`` events to projection ``name``; (applied, checkpoint after)."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", projection_lock_key(name))
        row = await conn.fetchrow(PROJECTIONS[name], batch_size)
    assert row is not None
    return row["applied"], Position(int(row["last_xid"]), row["last_position"])


async def _isolate_poison(pool: asyncpg.Pool, name: str, error: asyncpg.PostgresError) -> None:
    """A batch failed: apply what precedes the bad event one by one, then stop the projection with
    the event named. Never skip it (the read model would silently drift) and never retry it in a
    hot loop (it fails the same way every time)."""
    while True:
        try:
            applied, _ = await project_batch(pool, name, 1)
        except asyncpg.PostgresError as exc:
            if is_transient(exc):
                raise
            error = exc
            break
        if applied == 0:  # no event fails on its own: the failure was transient; retry next round
            return
    event = await pool.fetchrow(_NEXT_EVENT, name)
    where = "an unknown event"
    position = None
    if event is not None:
        position = event["global_position"]
        where = (
            f"event at position {position} ({event['event_type']}, "
            f"stream {event['stream_id']} version {event['stream_version']})"
        )
    message = f"{where}: {type(error).__name__}: {error}"
    await pool.execute(_STOP_PROJECTION, name, message, position)
    log.error("projection %s stopped by %s; fix and run `tally projections resume %s`", name, message, name)


async def catch_up(pool: asyncpg.Pool, batch_size: int) -> dict[str, Position]:
    """Apply every event available now to every running projection; their checkpoints when done.
    A projection stopped by a poison event is left alone (see ``tally projections status``)."""
    stopped = {r["name"] for r in await pool.fetch(_STOPPED)}
    checkpoints = {}
    for name in PROJECTIONS:
        if name in stopped:
            continue
        while True:
            try:
                applied, checkpoint = await project_batch(pool, name, batch_size)
            except asyncpg.PostgresError as exc:
                if is_transient(exc):
                    raise
                log.warning("projection %s failed a batch (%s); isolating the event", name, exc)
                await _isolate_poison(pool, name, exc)
                break
            if applied < batch_size:
                checkpoints[name] = checkpoint
                break
    return checkpoints


class SingleActive:
    """A worker of which one instance is active per database (the projector, the webhook
    dispatcher): it holds a session advisory lock on its own listening connection, and the others
    stand by until that connection goes away. ``run`` survives the database going away: it
    reconnects with backoff and competes for the active role again. A subclass names its ``role``
    and ``lock_key`` and implements ``_run_connected``."""

    role: ClassVar[str]
    lock_key: ClassVar[int]

    def __init__(self, url: str, poll_interval: float) -> None:
        self._url = url
        self._poll_interval = poll_interval
        self._failures = 0
        # Operators (and the failover tests) find the active instance by this name in
        # pg_stat_activity, joined to the advisory lock in pg_locks.
        self.application_name = f"tally-{self.role}:{os.getpid()}"

    async def run(self, stop: asyncio.Event) -> None:
        self._failures = 0
        while not stop.is_set():
            try:
                await self._run_connected(stop)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                delay = RECONNECT_DELAYS[min(self._failures, len(RECONNECT_DELAYS) - 1)]
                self._failures += 1
                log.warning("%s interrupted (%s); retrying in %.1f s", self.role, exc, delay)
                await wait_any(asyncio.Event(), stop, delay)
            else:
                return

    async def _run_connected(self, stop: asyncio.Event) -> None:
        raise NotImplementedError

    async def _become_active(self, listener: asyncpg.Connection, stop: asyncio.Event) -> bool:
        """Wait for the active role (True), or for ``stop`` (False)."""
        announced = False
        while not stop.is_set():
            if await listener.fetchval("SELECT pg_try_advisory_lock($1)", self.lock_key):
                log.info("%s active (%s)", self.role, self.application_name)
                self._failures = 0  # back to short pauses once it works again
                return True
            if not announced:
                log.info("another %s is active; standing by", self.role)
                announced = True
            await wait_any(asyncio.Event(), stop, self._poll_interval)
        return False


class Projector(SingleActive):
    """Runs the projections until ``stop`` is set. Woken by NOTIFY on ``tally_events`` (sent by the
    API after commands commit), polling every ``poll_interval`` seconds as the fallback."""

    role = "projector"
    lock_key = PROJECTOR_LOCK_KEY

    def __init__(self, pool: asyncpg.Pool, url: str, *, batch_size: int, poll_interval: float) -> None:
        super().__init__(url, poll_interval)
        self._pool = pool
        self._batch_size = batch_size
        self._wake = asyncio.Event()

    async def _run_connected(self, stop: asyncio.Event) -> None:
        listener = await asyncpg.connect(
            self._url, server_settings={"application_name": self.application_name}
        )
        try:
            await listener.add_listener(EVENTS_CHANNEL, lambda *_: self._wake.set())
            if not await self._become_active(listener, stop):
                return
            last: dict[str, Position] = {}
            warned = 0.0
            swept = 0.0
            while not stop.is_set():
                if listener.is_closed():
                    raise asyncpg.InterfaceError("the listening connection closed")
                self._wake.clear()
                if await self._pool.fetchval(_HISTORY_AHEAD):
                    # Restored from another cluster: nothing new can be read in order until
                    # `tally migrate` rebases the writer_xids (commands/sql/tally_writer_xid.sql).
                    if time.monotonic() - warned > 60:
                        log.error("projections wait: %s", RESTORED)
                        warned = time.monotonic()
                    await wait_any(asyncio.Event(), stop, self._poll_interval)
                    continue
                checkpoints = await catch_up(self._pool, self._batch_size)
                if checkpoints != last:
                    payload = msgspec.json.encode({k: v.token() for k, v in checkpoints.items()}).decode()
                    await self._pool.execute(_NOTIFY, PROGRESS_CHANNEL, payload)
                    last = checkpoints
                if time.monotonic() - swept >= EXPIRY_SWEEP_INTERVAL:
                    swept = time.monotonic()
                    await self._sweep()
                await asyncio.sleep(MIN_ROUND_INTERVAL)
                await wait_any(self._wake, stop, self._poll_interval)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 2)

    async def _sweep(self) -> None:
        """Record the expiries that have passed (holds stop holding at expires_at anyway: this only
        puts them in the history), after the round's catch-up, which therefore never waits for it;
        the next round projects them. A sweep that fails is logged and skipped, whatever the error:
        the projections go on (a database that is away fails their next catch-up instead)."""
        try:
            ended = await expire_holds(self._pool)
        except Exception as exc:
            log.warning("the hold expiry sweep failed (%s); holds still stop holding at their expiry", exc)
            return
        if ended:
            log.info("recorded the expiry of %d holds", ended)
            self._wake.set()


async def wait_any(wake: asyncio.Event, stop: asyncio.Event, seconds: float) -> None:
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

    def __init__(self, pool: Reader) -> None:
        self._pool = pool
        self._pending = asyncio.Event()

    def poke(self) -> None:
        self._pending.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await wait_any(self._pending, stop, 1.0)
            if self._pending.is_set():
                self._pending.clear()
                try:
                    await self._pool.execute(_NOTIFY, EVENTS_CHANNEL, "")
                except Exception as exc:  # the database is away or slow: the projectors poll
                    if not is_transient(exc):
                        raise
                    log.warning("could not notify the projectors (%r); they will poll", exc)
                await asyncio.sleep(MIN_ROUND_INTERVAL)
