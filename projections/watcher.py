"""Read-your-writes: waits until the projections have applied a consistency token; and the event
feed's long polls: wakes them when events may have been appended.

The projector NOTIFYs its checkpoints on ``tally_projections`` after each round; this watcher keeps
the latest in memory (one dedicated listening connection per API process) and polls the
checkpoint table as a fallback, so a lost notification delays an answer, never falsifies it. The
same connection listens on ``tally_events``, which the API processes notify after commands commit
(projections.projector.ProjectorWaker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

import asyncpg
import msgspec

from projections.positions import ORIGIN, Position
from projections.projector import EVENTS_CHANNEL, PROGRESS_CHANNEL, RECONNECT_DELAYS
from projections.reader import Reader

log = logging.getLogger("tally.watcher")

_CHECKPOINTS = "SELECT name, last_xid::text AS last_xid, last_position FROM projection_checkpoints"
_FALLBACK_POLL = 0.25


class ProjectionTimeout(Exception):
    code = "projection_timeout"


class ProjectionWatcher:
    """``connect`` opens the dedicated listening connection; ``reader`` polls the checkpoints.

    The listening connection is watched and opened again (with backoff) whenever it is lost, as
    when the database restarts: until then waiters poll, so a lost connection delays answers,
    never falsifies them. Polls are shared: however many requests wait, one poll runs at a time."""

    def __init__(self, reader: Reader, connect: Callable[[], Awaitable[asyncpg.Connection]]) -> None:
        self._reader = reader
        self._connect = connect
        self._positions: dict[str, Position] = {}
        self._changed = asyncio.Event()
        self._appended = asyncio.Event()
        self._listener: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._poll_task: asyncio.Task[None] | None = None
        self._keeper: asyncio.Task[None] | None = None
        self.reconnects = 0

    @property
    def listening(self) -> bool:
        return self._listener is not None and not self._listener.is_closed()

    async def start(self) -> None:
        """Listen, and keep listening; a database that is down now is retried in the background."""
        with contextlib.suppress(Exception):
            await self._listen()
            await self._poll()
        self._keeper = asyncio.create_task(self._keep_listening(), name="watcher-listener")

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(BaseException):
                await self._keeper
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._listener.close(), 2)

    async def _listen(self) -> None:
        self._lost.clear()
        listener = await self._connect()
        listener.add_termination_listener(lambda _conn: self._lost.set())
        await listener.add_listener(PROGRESS_CHANNEL, self._on_progress)
        await listener.add_listener(EVENTS_CHANNEL, self._on_append)
        self._listener = listener

    async def _keep_listening(self) -> None:
        failures = 0
        while True:
            if self.listening:
                # Woken when asyncpg sees the connection end; the timeout also catches a path
                # that went silent (the keepalives close it within about half a minute).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._lost.wait(), 5.0)
                if self.listening:
                    continue
                log.warning("the listening connection was lost; listening again")
            try:
                await self._listen()
            except Exception as exc:  # the database is away: try again, more slowly each time
                delay = RECONNECT_DELAYS[min(failures, len(RECONNECT_DELAYS) - 1)]
                failures += 1
                log.warning("could not listen for projection progress (%r); retrying in %.1f s", exc, delay)
                await asyncio.sleep(delay)
                continue
            failures = 0
            self.reconnects += 1
            with contextlib.suppress(Exception):
                await self._poll()  # whatever was notified while nobody listened

    def _on_progress(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            update = msgspec.json.decode(str(payload), type=dict[str, str])
            self._advance({name: Position.parse(token) for name, token in update.items()})
        except (msgspec.DecodeError, ValueError):
            log.warning("ignored a malformed progress notification: %r", payload)

    def _on_append(self, *_: object) -> None:
        self._appended.set()
        self._appended = asyncio.Event()

    def _advance(self, update: dict[str, Position]) -> None:
        for name, position in update.items():
            if position > self._positions.get(name, ORIGIN):
                self._positions[name] = position
        self._changed.set()
        self._changed = asyncio.Event()

    async def _poll_once(self) -> None:
        rows = await self._reader.fetch(_CHECKPOINTS)
        self._advance({r["name"]: Position(int(r["last_xid"]), r["last_position"]) for r in rows})

    async def _poll(self) -> None:
        """Read the checkpoints, or wait for the read already running."""
        if self._poll_task is None or self._poll_task.done():
            self._poll_task = asyncio.create_task(self._poll_once())
        await asyncio.shield(self._poll_task)

    async def next_progress(self, seconds: float) -> None:
        """Return when the projections next report progress, or after ``seconds``."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), seconds)

    async def next_events(self, seconds: float) -> None:
        """Return when events may have been appended (an API process says commands committed, or the
        projections moved: the events of any other writer), or after ``seconds``."""
        waiters = [asyncio.ensure_future(self._appended.wait()), asyncio.ensure_future(self._changed.wait())]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def wait_for(self, projection: str, token: Position, seconds: float) -> None:
        """Return once ``projection`` has applied ``token``; ProjectionTimeout after ``seconds``."""
        deadline = time.monotonic() + seconds
        while self._positions.get(projection, ORIGIN) < token:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProjectionTimeout(
                    f"projection {projection} has not applied {token.token()} within {seconds:g} s"
                )
            changed = self._changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), min(remaining, _FALLBACK_POLL))
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poll(), max(0.01, deadline - time.monotonic()))
