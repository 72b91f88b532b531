"""The read-cost scenario: what a read costs on a wallet of 1,000,000 events against one of ten.

The open goal: as-of (by time and by position) and a history page are index-bound, so on a wallet
with 1,000,000 events they take about as long as on a wallet with ten. Four requests, on each of
the two wallets of bench.read_wallets (same database, same server):

* **as-of a time**: ``GET /v1/wallets/{user_id}?as_of=<ISO time>``, the ``recorded_at`` of the
  wallet's middle event (its version ``events // 2``);
* **as-of a position**: ``GET /v1/wallets/{user_id}?as_of=<global position>`` of that event;
* **history, first page**: ``GET /v1/wallets/{user_id}/transactions?limit=50``;
* **history, a page in the middle**: the same with ``cursor=v<middle version>`` (cursors are ``v``
  and a wallet version), the page just below the middle of the history.

Each is timed **sequentially** (one client, one keep-alive connection: ``warm-up`` requests, then
``requests`` measured ones, each run stopped after ``max_seconds`` measured, so a slow read does not
take the whole benchmark), then by ``clients`` **concurrent** clients (throughput and latency at
that concurrency), through the running server. The **raw-SQL limit** is the same read through the
API's own query functions (projections.as_of.wallet_as_of, projections.queries.wallet_history) on
an asyncpg pool, without HTTP or Litestar, sequentially.

Before timing a read, one request checks its answer: the version the as-of answers must be the one
the events say (the middle version by position; the last one recorded at or before the time), and
a page must start just below its cursor. A wrong answer is reported, not fatal.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Protocol

import asyncpg
import msgspec

from api.database import create_pool
from api.settings import Settings
from bench.database import BENCH_SECRET
from bench.httpclient import HttpConnection, build_request
from bench.load import MAX_ERROR_SAMPLES, Failure, latency_summary_ms
from bench.read_wallets import ReadWallet
from bench.server import HOST
from projections import queries
from projections.as_of import Moment, WalletAsOf, wallet_as_of
from projections.read_models import TransactionPage

AS_OF_TIME: Final = "as_of_time"
AS_OF_POSITION: Final = "as_of_position"
HISTORY_FIRST: Final = "history_first"
HISTORY_MIDDLE: Final = "history_middle"
KINDS: Final = (AS_OF_TIME, AS_OF_POSITION, HISTORY_FIRST, HISTORY_MIDDLE)
TITLES: Final = {
    AS_OF_TIME: "as-of a time",
    AS_OF_POSITION: "as-of a position",
    HISTORY_FIRST: "history, first page",
    HISTORY_MIDDLE: "history, middle page",
}
HISTORY_LIMIT: Final = 50
WARMUP_REQUESTS: Final = 20  # per client; at least one, then no more once WARMUP_MAX_S have passed
WARMUP_MAX_S: Final = 2.0
CONCURRENT_REQUESTS_PER_CLIENT: Final = 50
REQUEST_TIMEOUT_S: Final = 120.0


@dataclass(frozen=True, slots=True)
class ReadConfig:
    requests: int  # measured sequential requests per wallet and request
    clients: int  # clients of the concurrent run (0: none)
    max_seconds: float  # measured seconds at most per run


@dataclass(slots=True)
class ReadResult:
    """One run: the measured requests' latencies (seconds) and outcomes."""

    clients: int
    latencies: list[float] = field(default_factory=list)
    successes: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    error_samples: list[str] = field(default_factory=list)
    warmup_requests: int = 0
    warmup_errors: int = 0
    elapsed_s: float = 0.0
    time_capped: bool = False  # max_seconds ended it before the requested count

    @property
    def requests(self) -> int:
        return len(self.latencies)

    @property
    def per_s(self) -> float:
        return self.successes / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self) -> dict[str, float | None]:
        return latency_summary_ms(self.latencies)


@dataclass(frozen=True, slots=True)
class Answer:
    """What the first request answered: the version the check looks at, against the expected one."""

    expected_version: int
    found_version: int | None
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.found_version == self.expected_version


@dataclass(frozen=True, slots=True)
class ReadMeasured:
    wallet: ReadWallet
    kind: str
    transport: str  # "http" or "sql"
    mode: str  # "sequential" or "concurrent"
    result: ReadResult
    answer: Answer | None


class ReadClient(Protocol):
    async def read(self) -> Failure | None: ...

    def close(self) -> None: ...


def expected_version(kind: str, wallet: ReadWallet) -> int:
    """The version an as-of answers, or the first item's of a page."""
    return {
        AS_OF_TIME: wallet.version_at_middle_time,
        AS_OF_POSITION: wallet.middle_version,
        HISTORY_FIRST: wallet.events,
        HISTORY_MIDDLE: wallet.middle_version - 1,
    }[kind]


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def http_target(kind: str, wallet: ReadWallet) -> str:
    base = f"/v1/wallets/{wallet.user_id}"
    return {
        AS_OF_TIME: f"{base}?as_of={_iso(wallet.middle_time)}",
        AS_OF_POSITION: f"{base}?as_of={wallet.middle_position}",
        HISTORY_FIRST: f"{base}/transactions?limit={HISTORY_LIMIT}",
        HISTORY_MIDDLE: f"{base}/transactions?limit={HISTORY_LIMIT}&cursor={wallet.cursor}",
    }[kind]


def sql_read(kind: str, wallet: ReadWallet, pool: asyncpg.Pool) -> Callable[[], Awaitable[object]]:
    """The read as the API's handler makes it, minus HTTP: the same query function."""
    user_id = wallet.user_id
    if kind == AS_OF_TIME:
        moment = Moment(at=wallet.middle_time)
        return lambda: wallet_as_of(pool, user_id, moment)
    if kind == AS_OF_POSITION:
        moment = Moment(position=wallet.middle_position)
        return lambda: wallet_as_of(pool, user_id, moment)
    cursor = wallet.cursor if kind == HISTORY_MIDDLE else None
    return lambda: queries.wallet_history(pool, user_id, asset=None, limit=HISTORY_LIMIT, cursor=cursor)


def _version_of(answer: object) -> int | None:
    """The version an answer shows: an as-of's, or a page's first item's (None when empty)."""
    if isinstance(answer, WalletAsOf):
        return answer.version
    if isinstance(answer, TransactionPage):
        return answer.items[0].wallet_version if answer.items else None
    if isinstance(answer, dict):  # decoded JSON
        if "items" in answer:
            items = answer["items"]
            return int(items[0]["wallet_version"]) if items else None
        version = answer.get("version")
        return int(version) if version is not None else None
    return None


class HttpReadClient:
    __slots__ = ("_connection", "_request")

    def __init__(self, port: int, request: bytes) -> None:
        self._connection = HttpConnection(HOST, port)
        self._request = request

    async def read(self) -> Failure | None:
        status, body = await self._connection.request(self._request)
        if status == 200:
            return None
        return f"HTTP {status}", body[:300].decode("utf-8", "replace")

    async def answer(self) -> tuple[int, bytes]:
        return await self._connection.request(self._request)

    def close(self) -> None:
        self._connection.close()


class SqlReadClient:
    __slots__ = ("_call",)

    def __init__(self, call: Callable[[], Awaitable[object]]) -> None:
        self._call = call

    async def read(self) -> Failure | None:
        await self._call()
        return None

    def close(self) -> None:
        pass


async def _attempt(client: ReadClient) -> Failure | None:
    try:
        return await asyncio.wait_for(client.read(), REQUEST_TIMEOUT_S)
    except Exception as exc:
        return type(exc).__name__, str(exc)[:300]


async def measure(
    make_client: Callable[[int], ReadClient], *, clients: int, warmup: int, requests: int, max_seconds: float
) -> ReadResult:
    """``clients`` closed-loop clients: ``warmup`` requests each (at least one; no more once
    WARMUP_MAX_S have passed), then ``requests`` measured ones in all, no more started after
    ``max_seconds`` (but at least one per client)."""
    result = ReadResult(clients=clients)
    readers = [make_client(i) for i in range(clients)]
    perf = time.perf_counter
    try:
        warm_until = perf() + WARMUP_MAX_S

        async def warm(reader: ReadClient) -> None:
            for i in range(max(1, warmup)):
                if i and perf() >= warm_until:
                    return
                failure = await _attempt(reader)
                result.warmup_requests += 1
                result.warmup_errors += failure is not None

        await asyncio.gather(*(warm(r) for r in readers))
        start = perf()
        deadline = start + max_seconds
        issued = 0

        async def run(reader: ReadClient) -> None:
            nonlocal issued
            first = True
            while issued < requests and (first or perf() < deadline):
                first = False
                issued += 1
                began = perf()
                failure = await _attempt(reader)
                result.latencies.append(perf() - began)
                if failure is None:
                    result.successes += 1
                else:
                    result.errors[failure[0]] += 1
                    if len(result.error_samples) < MAX_ERROR_SAMPLES:
                        result.error_samples.append(f"{failure[0]}: {failure[1]}")

        await asyncio.gather(*(run(r) for r in readers))
        result.elapsed_s = perf() - start
        result.time_capped = issued < requests
    finally:
        for reader in readers:
            reader.close()
    return result


def _describe(result: ReadResult) -> str:
    lat = result.latency_ms()
    text = f"p50 {lat['p50']:,.2f} ms, p99 {lat['p99']:,.2f} ms" if lat["p50"] is not None else "no requests"
    text += f", {result.requests} requests"
    if result.clients > 1:
        text += f", {result.per_s:,.0f}/s"
    if result.errors:
        text += f", {sum(result.errors.values())} errors"
    return text


async def run_http(
    port: int, wallets: Sequence[ReadWallet], config: ReadConfig, progress: Callable[[str], None]
) -> list[ReadMeasured]:
    """Every read on every wallet through the server on ``port``: sequential, then concurrent."""
    measured: list[ReadMeasured] = []
    host = f"{HOST}:{port}"
    headers = {"Authorization": f"Bearer {BENCH_SECRET}"}
    for kind in KINDS:
        for wallet in wallets:
            request = build_request("GET", http_target(kind, wallet), host=host, headers=headers, body=b"")
            answer = await _http_answer(port, request, expected_version(kind, wallet))

            def make(_: int, request: bytes = request) -> ReadClient:
                return HttpReadClient(port, request)

            sequential = await measure(
                make,
                clients=1,
                warmup=WARMUP_REQUESTS,
                requests=config.requests,
                max_seconds=config.max_seconds,
            )
            measured.append(ReadMeasured(wallet, kind, "http", "sequential", sequential, answer))
            progress(f"  HTTP {TITLES[kind]}, {wallet.events:,} events: {_describe(sequential)}")
            if config.clients:
                concurrent = await measure(
                    make,
                    clients=config.clients,
                    warmup=WARMUP_REQUESTS,
                    requests=config.clients * CONCURRENT_REQUESTS_PER_CLIENT,
                    max_seconds=config.max_seconds,
                )
                measured.append(ReadMeasured(wallet, kind, "http", "concurrent", concurrent, None))
                progress(f"    {config.clients} clients: {_describe(concurrent)}")
    return measured


async def _http_answer(port: int, request: bytes, expected: int) -> Answer:
    client = HttpReadClient(port, request)
    try:
        status, body = await asyncio.wait_for(client.answer(), REQUEST_TIMEOUT_S)
    except Exception as exc:
        return Answer(expected, None, f"{type(exc).__name__}: {exc}"[:300])
    finally:
        client.close()
    if status != 200:
        return Answer(expected, None, f"HTTP {status}: {body[:300].decode('utf-8', 'replace')}")
    try:
        return Answer(expected, _version_of(msgspec.json.decode(body)))
    except (msgspec.DecodeError, KeyError, TypeError, ValueError, IndexError) as exc:
        return Answer(expected, None, f"unexpected body ({exc}): {body[:300].decode('utf-8', 'replace')}")


async def run_sql(
    url: str,
    settings: Settings,
    wallets: Sequence[ReadWallet],
    config: ReadConfig,
    progress: Callable[[str], None],
) -> list[ReadMeasured]:
    """Every read on every wallet through the query functions, sequentially, on a pool of one
    connection with the API's session settings."""
    sized = msgspec.structs.replace(settings, pool_min_size=1, pool_max_size=1)
    pool = await create_pool(url, sized, "tally-bench-raw-reads")
    measured: list[ReadMeasured] = []
    try:
        for kind in KINDS:
            for wallet in wallets:
                call = sql_read(kind, wallet, pool)
                answer = await _sql_answer(call, expected_version(kind, wallet))

                def make(_: int, call: Callable[[], Awaitable[object]] = call) -> ReadClient:
                    return SqlReadClient(call)

                result = await measure(
                    make,
                    clients=1,
                    warmup=WARMUP_REQUESTS,
                    requests=config.requests,
                    max_seconds=config.max_seconds,
                )
                measured.append(ReadMeasured(wallet, kind, "sql", "sequential", result, answer))
                progress(f"  SQL  {TITLES[kind]}, {wallet.events:,} events: {_describe(result)}")
    finally:
        await pool.close()
    return measured


async def _sql_answer(call: Callable[[], Awaitable[object]], expected: int) -> Answer:
    try:
        found = await asyncio.wait_for(call(), REQUEST_TIMEOUT_S)
    except Exception as exc:
        return Answer(expected, None, f"{type(exc).__name__}: {exc}"[:300])
    return Answer(expected, _version_of(found))


def wallet_json(wallet: ReadWallet) -> dict[str, Any]:
    return {
        "key": wallet.key,
        "user_id": wallet.user_id,
        "events": wallet.events,
        "middle_version": wallet.middle_version,
        "middle_position": wallet.middle_position,
        "middle_time": _iso(wallet.middle_time),
        "version_at_middle_time": wallet.version_at_middle_time,
        "cursor": wallet.cursor,
    }
