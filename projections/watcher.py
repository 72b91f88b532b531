"""Read-your-writes: waits until the projections have applied a consistency token.

The projector NOTIFYs its checkpoints on ``tally_projections`` after each round; this watcher keeps
the latest in memory (one dedicated listening connection per API process) and polls the
checkpoint table as a fallback, so a lost notification delays an answer, never falsifies it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
import msgspec

from projections.positions import ORIGIN, Position
from projections.projector import PROGRESS_CHANNEL

log = logging.getLogger("tally.watcher")

_CHECKPOINTS = "SELECT name, last_xid::text AS last_xid, last_position FROM projection_checkpoints"
_FALLBACK_POLL = 0.25


class ProjectionTimeout(Exception):
    code = "projection_timeout"


class ProjectionWatcher:
    def __init__(self, pool: asyncpg.Pool, url: str) -> None:
        self._pool = pool
        self._url = url
        self._positions: dict[str, Position] = {}
        self._changed = asyncio.Event()
        self._listener: asyncpg.Connection | None = None

    async def start(self) -> None:
        self._listener = await asyncpg.connect(
            self._url, server_settings={"application_name": "tally-watcher"}
        )
        await self._listener.add_listener(PROGRESS_CHANNEL, self._on_progress)
        await self._poll()

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()

    def _on_progress(self, _conn: object, _pid: int, _channel: str, payload: object) -> None:
        try:
            update = msgspec.json.decode(str(payload), type=dict[str, str])
            self._advance({name: Position.parse(token) for name, token in update.items()})
        except (msgspec.DecodeError, ValueError):
            log.warning("ignored a malformed progress notification: %r", payload)

    def _advance(self, update: dict[str, Position]) -> None:
        for name, position in update.items():
            if position > self._positions.get(name, ORIGIN):
                self._positions[name] = position
        self._changed.set()
        self._changed = asyncio.Event()

    async def _poll(self) -> None:
        rows = await self._pool.fetch(_CHECKPOINTS)
        self._advance({r["name"]: Position(int(r["last_xid"]), r["last_position"]) for r in rows})

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
            await self._poll()
