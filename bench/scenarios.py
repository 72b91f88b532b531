"""The two workloads and the two ways of driving them.

Workloads:

* **many wallets**: every request spends 1 GOLD from a wallet drawn uniformly at random from
  10,000. Wallet row locks almost never collide, so this measures the per-command cost of the
  whole stack: HTTP parsing, Litestar, the idempotency claim, the append, the commit.
* **one hot wallet**: every request spends from the same wallet. Each command holds that wallet's
  row lock only while PostgreSQL runs ``tally_post_transactions`` (one round trip, never across
  the network), so this measures how fast commands serialize on one row.

Transports:

* **HTTP**: ``POST /v1/wallets/{user_id}/spends`` with a unique ``Idempotency-Key`` through the
  running server; success is ``201 Created``.
* **SQL**, the raw-SQL limit: the same command through ``commands.EventStore.post_transaction``
  (the API's own data-access layer, so the same ``tally_post_transactions`` call with the same
  command record the controller would build: the domain command, the request fingerprint, its
  context) over an asyncpg pool of one connection per client, with no HTTP and no Litestar in
  between. It is what PostgreSQL and the driver alone sustain at the same
  concurrency; HTTP divided by it is the share of that limit the API delivers.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

import asyncpg
import msgspec

from api.database import create_pool
from api.dto import MoveCreditsRequest
from api.settings import Settings
from bench.database import ASSET, BENCH_SECRET, bench_context
from bench.httpclient import HttpConnection
from bench.load import Failure, LoadResult, Spender, run_load
from bench.server import HOST
from bench.sysinfo import CpuSampler
from commands import CommandContext, CommandRecord, EventStore
from domain import SpendCredits
from projections import queries

SPEND_AMOUNT = 1
# What a client sends; the API fingerprints its canonical re-encoding (defaults included).
SPEND_BODY = b'{"asset":"%s","amount":%d}' % (ASSET.encode(), SPEND_AMOUNT)
CANONICAL_SPEND_BODY = msgspec.json.encode(MoveCreditsRequest(asset=ASSET, amount=SPEND_AMOUNT))
HOT_WALLET = "hot"


def wallet_ids(count: int) -> list[str]:
    return [f"w{i:05d}" for i in range(count)]


@dataclass(frozen=True, slots=True)
class Workload:
    key: str  # "many", "hot" or "batch"
    title: str
    clients: int
    user_ids: Sequence[str]
    batch: int = 0  # "batch": the spends per request (distinct wallets, POST /v1/batches)
    read: bool = False  # "read": GET /v1/wallets/{user_id} instead of a spend
    processes: int = 1  # API processes the HTTP clients are spread over (round robin)

    @property
    def raw_key(self) -> str:
        """The workload whose raw-SQL run is this one's limit (the same, but for the process count)."""
        return self.key.removesuffix("-2p")


@dataclass(frozen=True, slots=True)
class LoadLimits:
    warmup: float
    duration: float
    max_requests: int


# --- HTTP -----------------------------------------------------------------------------------


class HttpSpender:
    """One HTTP client: a keep-alive connection and request bytes prepared per wallet, so a
    request costs one random pick, one join and one socket write on the generator's side."""

    __slots__ = ("_connection", "_heads", "_key_prefix", "_seq")

    def __init__(self, port: int, heads: Sequence[bytes], key_prefix: str) -> None:
        self._connection = HttpConnection(HOST, port)
        self._heads = heads
        self._key_prefix = key_prefix.encode()
        self._seq = 0

    async def spend(self) -> Failure | None:
        heads = self._heads
        head = heads[random.randrange(len(heads))] if len(heads) > 1 else heads[0]
        self._seq += 1
        status, body = await self._connection.request(
            b"".join((head, self._key_prefix, b"%d" % self._seq, b"\r\n\r\n", SPEND_BODY))
        )
        if status == 201:
            return None
        return f"HTTP {status}", body[:300].decode("utf-8", "replace")

    def close(self) -> None:
        self._connection.close()


class _Status(msgspec.Struct):
    status: int


class _BatchAnswer(msgspec.Struct):
    results: list[_Status]


_BATCH_ANSWER = msgspec.json.Decoder(_BatchAnswer)


def _batch_failure(answer: bytes, size: int) -> Failure | None:
    """None when every one of the batch's ``size`` spends was applied."""
    statuses = [r.status for r in _BATCH_ANSWER.decode(answer).results]
    if len(statuses) == size and all(status == 201 for status in statuses):
        return None
    refused = [status for status in statuses if status != 201]
    return f"{len(refused)} of {size} refused", answer[:300].decode("utf-8", "replace")


class HttpBatcher:
    """One HTTP client sending POST /v1/batches: each request ``size`` spends of 1 over distinct
    wallets drawn at random, each under its own key, the batch under one more."""

    __slots__ = ("_commands", "_connection", "_key_prefix", "_port", "_seq", "_size")

    def __init__(self, port: int, user_ids: Sequence[str], key_prefix: str, size: int) -> None:
        self._connection = HttpConnection(HOST, port)
        self._port = port
        # Each wallet's command up to its key's value.
        self._commands = [
            b'{"kind":"spend","user_id":"%s","asset":"%s","amount":%d,"key":"'
            % (u.encode(), ASSET.encode(), SPEND_AMOUNT)
            for u in user_ids
        ]
        self._key_prefix = key_prefix.encode()
        self._size = size
        self._seq = 0

    async def spend(self) -> Failure | None:
        self._seq += 1
        key = b"%s%d" % (self._key_prefix, self._seq)
        chosen = random.sample(self._commands, self._size)
        body = b'{"commands":[%s]}' % b",".join(b'%s%s-%d"}' % (c, key, i) for i, c in enumerate(chosen))
        head = (
            b"POST /v1/batches HTTP/1.1\r\nHost: %s:%d\r\nContent-Type: application/json\r\n"
            b"Authorization: Bearer %s\r\nContent-Length: %d\r\nIdempotency-Key: %s\r\n\r\n"
        ) % (HOST.encode(), self._port, BENCH_SECRET.encode(), len(body), key)
        status, answer = await self._connection.request(head + body)
        if status != 200:
            return f"HTTP {status}", answer[:300].decode("utf-8", "replace")
        return _batch_failure(answer, self._size)

    def close(self) -> None:
        self._connection.close()


class HttpReader:
    """One HTTP client reading wallets: GET /v1/wallets/{user_id} of a random wallet, 200 expected."""

    __slots__ = ("_connection", "_heads")

    def __init__(self, port: int, user_ids: Sequence[str]) -> None:
        self._connection = HttpConnection(HOST, port)
        self._heads = [
            (
                f"GET /v1/wallets/{user_id} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
                f"Authorization: Bearer {BENCH_SECRET}\r\n\r\n"
            ).encode()
            for user_id in user_ids
        ]

    async def spend(self) -> Failure | None:
        status, body = await self._connection.request(self._heads[random.randrange(len(self._heads))])
        if status == 200:
            return None
        return f"HTTP {status}", body[:300].decode("utf-8", "replace")

    def close(self) -> None:
        self._connection.close()


def _request_heads(port: int, user_ids: Sequence[str]) -> list[bytes]:
    """Everything of a spend request up to the Idempotency-Key's value, per wallet."""
    return [
        (
            f"POST /v1/wallets/{user_id}/spends HTTP/1.1\r\n"
            f"Host: {HOST}:{port}\r\n"
            "Content-Type: application/json\r\n"
            f"Authorization: Bearer {BENCH_SECRET}\r\n"
            f"Content-Length: {len(SPEND_BODY)}\r\n"
            "Idempotency-Key: "
        ).encode()
        for user_id in user_ids
    ]


async def run_http(
    workload: Workload, *, ports: Sequence[int], tag: str, limits: LoadLimits, sampler: CpuSampler | None
) -> LoadResult:
    heads = {port: _request_heads(port, workload.user_ids) for port in ports}

    def make(index: int) -> Spender:
        port = ports[index % len(ports)]
        if workload.read:
            return HttpReader(port, workload.user_ids)
        if workload.batch:
            return HttpBatcher(port, workload.user_ids, f"{tag}-{index}-", workload.batch)
        return HttpSpender(port, heads[port], f"{tag}-{index}-")

    return await run_load(
        make,
        clients=workload.clients,
        warmup=limits.warmup,
        duration=limits.duration,
        max_requests=limits.max_requests,
        sampler=sampler,
        weight=workload.batch or 1,
    )


# --- raw SQL --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpendPlan:
    """What the spend controller would pass to ``EventStore.post_transaction`` for one wallet."""

    command: SpendCredits
    fingerprint: bytes
    metadata: dict[str, str]


def spend_plans(user_ids: Sequence[str]) -> list[SpendPlan]:
    plans = []
    for user_id in user_ids:
        path = f"/v1/wallets/{user_id}/spends"
        plans.append(
            SpendPlan(
                command=SpendCredits(user_id=user_id, asset=ASSET, amount=SPEND_AMOUNT),
                fingerprint=CommandContext.fingerprint_of("POST", path, CANONICAL_SPEND_BODY, ""),
                metadata={"path": path},
            )
        )
    return plans


class SqlSpender:
    """One raw-SQL client: the spend command straight into the event store."""

    __slots__ = ("_key_prefix", "_plans", "_seq", "_store")

    def __init__(self, store: EventStore, plans: Sequence[SpendPlan], key_prefix: str) -> None:
        self._store = store
        self._plans = plans
        self._key_prefix = key_prefix
        self._seq = 0

    async def spend(self) -> Failure | None:
        plans = self._plans
        plan = plans[random.randrange(len(plans))] if len(plans) > 1 else plans[0]
        self._seq += 1
        ctx = bench_context(f"{self._key_prefix}{self._seq}", plan.fingerprint, plan.metadata)
        accepted = await self._store.post_transaction(ctx, plan.command)
        if accepted.replayed:
            return "replayed", ctx.command_id
        return None

    def close(self) -> None:
        pass


class SqlReader:
    """One raw-SQL client reading wallets: the query GET /v1/wallets/{user_id} runs."""

    __slots__ = ("_pool", "_user_ids")

    def __init__(self, pool: asyncpg.Pool, user_ids: Sequence[str]) -> None:
        self._pool = pool
        self._user_ids = user_ids

    async def spend(self) -> Failure | None:
        await queries.get_wallet(self._pool, self._user_ids[random.randrange(len(self._user_ids))])
        return None

    def close(self) -> None:
        pass


class SqlBatcher:
    """One raw-SQL client sending the same batches straight to the event store
    (``EventStore.post_batch``: the records the batch controller would build, one call)."""

    __slots__ = ("_key_prefix", "_plans", "_seq", "_size", "_store")

    def __init__(self, store: EventStore, plans: Sequence[SpendPlan], key_prefix: str, size: int) -> None:
        self._store = store
        self._plans = plans
        self._key_prefix = key_prefix
        self._size = size
        self._seq = 0

    async def spend(self) -> Failure | None:
        self._seq += 1
        prefix = f"{self._key_prefix}{self._seq}-"
        records = [
            CommandRecord.of(bench_context(f"{prefix}{i}", plan.fingerprint, plan.metadata), plan.command)
            for i, plan in enumerate(random.sample(self._plans, self._size))
        ]
        result = await self._store.post_batch(records, atomic=False)
        refused = [outcome for outcome, _, replayed in result.outcomes if outcome != "accepted" or replayed]
        if refused:
            return f"{len(refused)} of {self._size} refused", ", ".join(sorted(set(refused)))
        return None

    def close(self) -> None:
        pass


async def run_sql(
    workload: Workload,
    *,
    url: str,
    settings: Settings,
    tag: str,
    limits: LoadLimits,
    sampler: CpuSampler | None,
    connections: int,
) -> LoadResult:
    """The raw-SQL limit for ``workload``: its clients share a pool of ``connections`` (by
    default one per client), all opened before the clock starts, with the API's session settings."""
    sized = msgspec.structs.replace(settings, pool_min_size=connections, pool_max_size=connections)
    pool = await create_pool(url, sized, "tally-bench-raw")
    try:
        store = EventStore(pool, max_batches=connections)
        plans = spend_plans(workload.user_ids)

        def make(index: int) -> Spender:
            if workload.read:
                return SqlReader(pool, workload.user_ids)
            if workload.batch:
                return SqlBatcher(store, plans, f"{tag}-{index}-", workload.batch)
            return SqlSpender(store, plans, f"{tag}-{index}-")

        return await run_load(
            make,
            clients=workload.clients,
            warmup=limits.warmup,
            duration=limits.duration,
            max_requests=limits.max_requests,
            sampler=sampler,
            weight=workload.batch or 1,
        )
    finally:
        await pool.close()
