"""Per-client rate limits, counted by the ``limits`` library in this process's memory.

A client's limit is its ``--rate-limit`` (requests per second), else ``TALLY_RATE_LIMIT``, else
none. The count is a sliding window per API process: with N processes behind a load balancer a
client gets up to N times its limit in all (README, "Rate limits"). Over the limit the answer is
429 ``rate_limited`` with ``Retry-After``, before the request reaches its handler, so nothing is
recorded under its Idempotency-Key.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import math
import time
from collections.abc import AsyncIterator

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from api.auth import Principal
from commands.errors import Overloaded


class RateLimited(Exception):
    code = "rate_limited"

    def __init__(self, detail: str, retry_after: int) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class RateLimiter:
    def __init__(self, default: int | None) -> None:
        self._default = default
        self._limiter = SlidingWindowCounterRateLimiter(MemoryStorage())
        self._items: dict[int, RateLimitItem] = {}

    async def check(self, principal: Principal) -> None:
        """Count one request of ``principal``'s client; RateLimited when it is over its limit."""
        limit = principal.rate_limit or self._default
        if limit is None:
            return
        item = self._items.get(limit)
        if item is None:
            item = self._items[limit] = RateLimitItemPerSecond(limit)
        if await self._limiter.hit(item, principal.client_id):
            return
        stats = await self._limiter.get_window_stats(item, principal.client_id)
        retry_after = max(1, math.ceil(stats.reset_time - time.time()))
        raise RateLimited(
            f"client {principal.name} is over its limit of {limit} requests per second", retry_after
        )


class ReadLimiter:
    """At most ``concurrency`` queries are handled in this process at once (everything done for
    one: its log line and metrics, its key check, the query, building its answer); others wait
    their turn, no longer than ``timeout`` (then Overloaded). A flood of
    reads then takes a bounded share of the process, and commands, which never wait here, keep the
    rest (tests/integration/test_faults.py, the read flood). A query waiting for the projections
    (``consistent_with``) sets its slot aside meanwhile: waiting costs the process nothing."""

    def __init__(self, concurrency: int, timeout: float) -> None:
        self._slots = asyncio.Semaphore(concurrency)
        self._timeout = timeout
        self._held: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
            "read_slot", default=None
        )

    async def _acquire(self) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._slots.acquire()
        except TimeoutError:
            busy = f"too many queries are waiting in this process (for {self._timeout:g} s)"
            raise Overloaded(busy) from None

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        held = [True]
        token = self._held.set(held)
        try:
            yield
        finally:
            self._held.reset(token)
            if held[0]:
                self._slots.release()

    @contextlib.asynccontextmanager
    async def set_aside(self) -> AsyncIterator[None]:
        """Give this request's slot back while it waits, and take one again after."""
        held = self._held.get()
        if held is None or not held[0]:
            yield
            return
        held[0] = False
        self._slots.release()
        try:
            yield
        finally:
            await self._acquire()
            held[0] = True
