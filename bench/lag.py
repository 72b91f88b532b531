"""Projection lag under load: what operators see (``tally_projection_lag``: the age of the oldest
committed event a projection has not applied), sampled every ``interval`` seconds while the load
runs, worst projection per sample."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import asyncpg

_WORST_LAG = (
    "SELECT max(lag.seconds_behind) FROM projection_checkpoints cp, tally_projection_lag(cp.name) lag"
)


class LagSamples:
    def __init__(self) -> None:
        self.seconds: list[float] = []

    def summary_ms(self) -> dict[str, float | int | None]:
        ordered = sorted(self.seconds)
        if not ordered:
            return {"samples": 0, "p50": None, "p99": None, "max": None}

        def pick(q: float) -> float:
            return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000, 1)

        return {"samples": len(ordered), "p50": pick(0.50), "p99": pick(0.99), "max": pick(1.0)}


@contextlib.asynccontextmanager
async def sample_lag(url: str, interval: float = 0.05) -> AsyncIterator[LagSamples]:
    """Sample the worst projection lag until the block exits (bounded by the block's own bounds)."""
    samples = LagSamples()
    conn = await asyncpg.connect(url, server_settings={"application_name": "tally-bench-lag"})
    stop = asyncio.Event()

    async def loop() -> None:
        while not stop.is_set():
            value = await conn.fetchval(_WORST_LAG)
            samples.seconds.append(float(value or 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    task = asyncio.create_task(loop())
    try:
        yield samples
    finally:
        stop.set()
        await task
        await conn.close()
