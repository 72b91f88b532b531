"""Per-client rate limits, counted by the ``limits`` library in this process's memory.

A client's limit is its ``--rate-limit`` (requests per second), else ``TALLY_RATE_LIMIT``, else
none. The count is a sliding window per API process: with N processes behind a load balancer a
client gets up to N times its limit in all (README, "Rate limits"). Over the limit the answer is
429 ``rate_limited`` with ``Retry-After``, before the request reaches its handler, so nothing is
recorded under its Idempotency-Key.
"""

from __future__ import annotations

import math
import time

from limits import RateLimitItem, RateLimitItemPerSecond
from limits.aio.storage import MemoryStorage
from limits.aio.strategies import SlidingWindowCounterRateLimiter

from api.auth import Principal


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
