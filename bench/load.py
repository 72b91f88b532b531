"""The closed-loop load driver shared by the HTTP and the raw-SQL scenarios.

Each simulated client is one coroutine with one connection that sends a spend, waits for the
answer, and immediately sends the next: a *closed* loop, so ``clients`` is the concurrency the
server sees, and the throughput is what the system sustains at that concurrency (not an offered
rate). The run has two phases on one clock:

* warm-up (``warmup`` seconds): connections open, the server's pool grows, PostgreSQL's buffer
  cache and each session's cached plans warm up; only requests and errors are counted;
* measurement (``duration`` seconds): every request *started* in the window is recorded, with its
  latency from just before the request is written to just after the whole response is read.

Every loop is bounded: a client stops starting requests at the deadline or when ``max_requests``
(warm-up included, all clients together) have been issued, and any client still blocked
``grace`` seconds after the deadline is cancelled and counted. Throughput is the number of
measured requests that succeeded divided by the time from the start of the window to the last
measured completion, so the in-flight tail at the deadline is neither lost nor double-counted.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from bench.sysinfo import CpuSampler

Failure = tuple[str, str]
"""(label counted in the error breakdown, detail kept as a sample), e.g. ("HTTP 409", body)."""

MAX_ERROR_SAMPLES = 5


class Spender(Protocol):
    """One simulated client: ``spend`` performs one spend and returns None on success (HTTP 201 or
    an accepted command) or the failure; it may raise, which is counted as a failure too."""

    async def spend(self) -> Failure | None: ...

    def close(self) -> None: ...


@dataclass(slots=True)
class _Window:
    measure_start: float
    deadline: float
    max_requests: int
    issued: int = 0


@dataclass(slots=True)
class LoadResult:
    """What one scenario measured; latencies are in seconds, for measured requests only."""

    clients: int
    warmup_s: float
    duration_s: float
    latencies: list[float] = field(default_factory=list)
    successes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    warmup_requests: int = 0
    warmup_errors: int = 0
    measured_elapsed_s: float = 0.0
    capped: bool = False
    cancelled_clients: int = 0
    cpu: dict[str, float | None] = field(default_factory=dict)
    weight: int = 1  # spends per request: 1, or a batch's size

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def spends_per_s(self) -> float:
        """Spends (transactions) decided per second: successful requests times their weight."""
        if self.measured_elapsed_s <= 0:
            return 0.0
        return self.successes * self.weight / self.measured_elapsed_s

    def latency_ms(self) -> dict[str, float | None]:
        """p50/p90/p99/max/mean in milliseconds (nearest-rank percentiles), None when empty."""
        return latency_summary_ms(self.latencies)


def latency_summary_ms(latencies: Sequence[float]) -> dict[str, float | None]:
    """p50/p90/p99/max/mean of ``latencies`` (seconds) in milliseconds (nearest-rank percentiles),
    None when empty."""
    ordered = sorted(latencies)
    return {
        "p50": _ms(_percentile(ordered, 0.50)),
        "p90": _ms(_percentile(ordered, 0.90)),
        "p99": _ms(_percentile(ordered, 0.99)),
        "max": _ms(ordered[-1] if ordered else None),
        "mean": _ms(sum(ordered) / len(ordered) if ordered else None),
    }


def _percentile(ordered: Sequence[float], q: float) -> float | None:
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


async def _client(spender: Spender, window: _Window, result: LoadResult) -> None:
    perf = time.perf_counter
    latencies = result.latencies
    last_end = 0.0
    try:
        while True:
            start = perf()
            if start >= window.deadline or window.issued >= window.max_requests:
                break
            window.issued += 1
            failure: Failure | None
            backoff = False
            try:
                failure = await spender.spend()
            except Exception as exc:
                failure = (type(exc).__name__, str(exc)[:300])
                backoff = isinstance(exc, OSError | asyncio.IncompleteReadError)
            end = perf()
            if start >= window.measure_start:
                latencies.append(end - start)
                last_end = max(last_end, end)
                if failure is None:
                    result.successes += 1
                else:
                    result.errors[failure[0]] += 1
                    if len(result.error_samples) < MAX_ERROR_SAMPLES:
                        result.error_samples.append(f"{failure[0]}: {failure[1]}")
            else:
                result.warmup_requests += 1
                if failure is not None:
                    result.warmup_errors += 1
            if backoff:  # refused or reset: wait a little rather than spin on reconnecting
                await asyncio.sleep(0.01)
    finally:
        if last_end:
            result.measured_elapsed_s = max(result.measured_elapsed_s, last_end - window.measure_start)
        spender.close()


async def run_load(
    make_spender: Callable[[int], Spender],
    *,
    clients: int,
    warmup: float,
    duration: float,
    max_requests: int,
    grace: float = 15.0,
    sampler: CpuSampler | None = None,
    weight: int = 1,
) -> LoadResult:
    """Run ``clients`` closed-loop clients for ``warmup`` + ``duration`` seconds (see module doc);
    each request is ``weight`` spends (a batch's size)."""
    result = LoadResult(clients=clients, warmup_s=warmup, duration_s=duration, weight=weight)
    spenders = [make_spender(i) for i in range(clients)]
    now = time.perf_counter()
    window = _Window(measure_start=now + warmup, deadline=now + warmup + duration, max_requests=max_requests)
    tasks = [asyncio.create_task(_client(s, window, result)) for s in spenders]

    async def sample() -> None:
        if sampler is None:
            return
        await asyncio.sleep(max(0.0, window.measure_start - time.perf_counter()))
        sampler.mark_start()
        await asyncio.sleep(max(0.0, window.deadline - time.perf_counter()))
        sampler.mark_end()

    sampling = asyncio.create_task(sample())
    _, pending = await asyncio.wait(tasks, timeout=warmup + duration + grace)
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if not sampling.done():  # every client stopped early (request cap): take the window so far
        sampling.cancel()
        await asyncio.gather(sampling, return_exceptions=True)
        if sampler is not None:
            sampler.mark_end()
    result.cancelled_clients = len(pending)
    result.capped = window.issued >= max_requests
    if sampler is not None:
        result.cpu = sampler.report()
    return result
