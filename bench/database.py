"""The benchmark's own database: where it is, how it is filled, and when the projector is idle.

Every run starts from a fresh database ``tally_bench`` (dropped and created), so figures never
depend on what an earlier run or the demo left behind. With ``DATABASE_URL`` unset it lives in an
embedded PostgreSQL under ``.data/bench-pg``, separate from the demo's ``.data/pg`` and the tests'
``.data/test-pg``; with ``DATABASE_URL`` set, ``tally_bench`` is created on that server.

The wallets are opened and topped up with the event store's own SQL functions (the ones every
command goes through), set-based: a statement calls ``tally_open_wallet`` once per wallet of a
chunk, and ``tally_post_transactions`` takes a chunk's top-ups as one batch, so setting up 10,000
wallets takes seconds, not the 20,000 HTTP round trips it would take through the API. The rows
written are exactly those the API would write (same functions, same command records), and the
projector's backlog is applied before the server starts, so the first scenario is not competing
with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import msgspec

from api.auth import secret_hash, secret_id_of
from api.database import embedded_server
from api.migrate import migrate
from commands import CommandContext, CommandRecord, EventStore
from domain import MAX_AMOUNT, DefineAsset, OpenWallet, TopUpCredits
from projections.projector import catch_up

log = logging.getLogger("bench")

BENCH_DATABASE = "tally_bench"
# The benchmark's client (every scope) and its secret, made in the benchmark's own database.
BENCH_CLIENT_ID = "be7c0000-0000-4000-8000-000000000001"
BENCH_SECRET = "tally_sk_be7cbe7cbe7cbe7c_" + "B" * 43
ASSET = "GOLD"
TOP_UP_AMOUNT = MAX_AMOUNT  # one top-up per wallet; a spend of 1 never runs a wallet dry
SETUP_CHUNK = 1000

_OPEN_WALLETS = """
SELECT count(*) FILTER (WHERE o.outcome = 'accepted')::int
  FROM jsonb_array_elements($1::jsonb) AS a(record), LATERAL tally_open_wallet(a.record) AS o
"""
_TOP_UP_WALLETS = (
    "SELECT count(*) FILTER (WHERE outcome = 'accepted')::int FROM tally_post_transactions($1::jsonb, 60000)"
)
_LAST_EVENT = "SELECT writer_xid::text::bigint, global_position FROM events ORDER BY 1 DESC, 2 DESC LIMIT 1"
_CHECKPOINTS = "SELECT last_xid::text::bigint, last_position FROM projection_checkpoints"


@dataclass(frozen=True, slots=True)
class Target:
    """The PostgreSQL server the benchmark uses; ``postmaster_pid`` when it runs on this machine."""

    admin_url: str
    bench_url: str
    embedded: bool
    postmaster_pid: int | None


def with_database(url: str, name: str) -> str:
    """``url`` with its database replaced by ``name``."""
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


@contextlib.contextmanager
def bench_postgres(root: Path) -> Iterator[Target]:
    """``DATABASE_URL``'s server, or an embedded one under ``<root>/.data/bench-pg`` for the run."""
    url = os.environ.get("DATABASE_URL")
    if url:
        yield Target(with_database(url, "postgres"), with_database(url, BENCH_DATABASE), False, None)
        return
    logging.getLogger("pgserver").setLevel(logging.WARNING)
    with embedded_server(root / ".data" / "bench-pg") as server:
        pid = server.get_pid()
        yield Target(
            server.get_uri("postgres"),
            server.get_uri(BENCH_DATABASE),
            True,
            int(pid) if pid is not None else None,
        )


async def local_postmaster_pid(conn: asyncpg.Connection) -> int | None:
    """The postmaster's pid when PostgreSQL runs here and its data directory is readable."""
    with contextlib.suppress(asyncpg.PostgresError):
        data_dir = await conn.fetchval("SELECT current_setting('data_directory')")
        return _running_postmaster(Path(data_dir))
    return None


def _running_postmaster(data_dir: Path) -> int | None:
    with contextlib.suppress(OSError, ValueError):
        pid = int((data_dir / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
        return pid
    return None


async def recreate(target: Target) -> None:
    """Drop and create ``tally_bench``, then apply the migrations."""
    admin = await asyncpg.connect(target.admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{BENCH_DATABASE}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{BENCH_DATABASE}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(target.bench_url)
    try:
        await migrate(conn)
        await ensure_bench_client(conn)
    finally:
        await conn.close()


async def ensure_bench_client(conn: asyncpg.Connection) -> None:
    """The benchmark's client (every scope) and its secret, made or made valid again (a database
    the benchmark keeps, bench.read_wallets, has them from an earlier run)."""
    await conn.execute(
        """INSERT INTO clients (client_id, name, scopes) VALUES ($1, 'bench', '{admin}')
           ON CONFLICT (client_id) DO UPDATE SET scopes = '{admin}', expires_at = NULL, revoked_at = NULL""",
        uuid.UUID(BENCH_CLIENT_ID),
    )
    await conn.execute(
        """INSERT INTO client_secrets (secret_id, client_id, secret_hash) VALUES ($1, $2, $3)
           ON CONFLICT (secret_id) DO UPDATE
              SET client_id = EXCLUDED.client_id, secret_hash = EXCLUDED.secret_hash, expires_at = NULL""",
        secret_id_of(BENCH_SECRET), uuid.UUID(BENCH_CLIENT_ID), secret_hash(BENCH_SECRET),
    )  # fmt: skip


def _fingerprint(path: str, body: bytes) -> bytes:
    return CommandContext.fingerprint_of("POST", path, body, "")


def bench_context(
    command_id: str, fingerprint: bytes, metadata: dict[str, str] | None = None
) -> CommandContext:
    """A command's context as the API would make it for the benchmark's client."""
    return CommandContext(
        command_id=command_id, client_id=BENCH_CLIENT_ID, created_by="bench", fingerprint=fingerprint,
        metadata=metadata or {},
    )  # fmt: skip


async def populate(url: str, user_ids: Sequence[str], *, parallel: int = 2) -> dict[str, float]:
    """Define the asset, open ``user_ids`` and top each up by TOP_UP_AMOUNT; project everything.

    Returns the seconds each step took. Raises RuntimeError when anything was not accepted.
    """
    timings: dict[str, float] = {}
    pool = await asyncpg.create_pool(url, min_size=parallel, max_size=parallel)
    try:
        started = time.perf_counter()
        ctx = bench_context(f"bench-asset-{uuid.uuid4().hex}", b"bench")
        await EventStore(pool).define_asset(
            ctx, DefineAsset(code=ASSET, name="Gold coins (benchmark)", decimals=0)
        )

        chunks = [list(user_ids[i : i + SETUP_CHUNK]) for i in range(0, len(user_ids), SETUP_CHUNK)]
        opened = await _run_chunks(pool, parallel, [_open_args(chunk) for chunk in chunks], _OPEN_WALLETS)
        if opened != len(user_ids):
            raise RuntimeError(f"setup opened {opened} of {len(user_ids)} wallets")
        timings["open_wallets_s"] = round(time.perf_counter() - started, 2)

        started = time.perf_counter()
        topped = await _run_chunks(pool, parallel, [_top_up_args(chunk) for chunk in chunks], _TOP_UP_WALLETS)
        if topped != len(user_ids):
            raise RuntimeError(f"setup topped up {topped} of {len(user_ids)} wallets")
        timings["top_up_wallets_s"] = round(time.perf_counter() - started, 2)

        started = time.perf_counter()
        await catch_up(pool, batch_size=5000)
        timings["project_backlog_s"] = round(time.perf_counter() - started, 2)
        async with pool.acquire() as conn:
            await conn.execute("VACUUM ANALYZE")
    finally:
        await pool.close()
    return timings


_SETUP_CONTEXT = {"user_agent": "bench-setup"}


def _records(records: list[CommandRecord]) -> tuple[object, ...]:
    return (msgspec.json.encode(records).decode(),)


def _open_args(chunk: list[str]) -> tuple[object, ...]:
    return _records([
        CommandRecord.of(bench_context(
            f"bench-open-{user_id}",
            _fingerprint("/v1/wallets", msgspec.json.encode(OpenWallet(user_id=user_id))),
            _SETUP_CONTEXT,
        ), OpenWallet(user_id=user_id))
        for user_id in chunk
    ])  # fmt: skip


def _top_up_args(chunk: list[str]) -> tuple[object, ...]:
    body = msgspec.json.encode({"asset": ASSET, "amount": TOP_UP_AMOUNT})
    return _records([
        CommandRecord.of(bench_context(
            f"bench-top-up-{user_id}", _fingerprint(f"/v1/wallets/{user_id}/top-ups", body), _SETUP_CONTEXT,
        ), TopUpCredits(user_id=user_id, asset=ASSET, amount=TOP_UP_AMOUNT))
        for user_id in chunk
    ])  # fmt: skip


async def _run_chunks(pool: asyncpg.Pool, parallel: int, args: list[tuple[object, ...]], sql: str) -> int:
    """Run ``sql`` once per argument tuple, ``parallel`` at a time; the sum of the counts."""
    queue = list(reversed(args))
    total = 0

    async def drain() -> None:
        nonlocal total
        while queue:
            chunk_args = queue.pop()
            accepted = int(await pool.fetchval(sql, *chunk_args))
            total += accepted  # not `total += await ...`: that reads `total` before awaiting

    await asyncio.gather(*(drain() for _ in range(parallel)))
    return total


async def wait_for_projections(url: str, *, max_wait: float) -> float | None:
    """Seconds until every projection has applied the last event (None after ``max_wait``).

    Called between HTTP scenarios, when no command is in flight: each scenario then starts with
    an idle projector instead of one still draining the previous scenario's events.
    """
    started = time.perf_counter()
    conn = await asyncpg.connect(url)
    try:
        while True:
            last = await conn.fetchrow(_LAST_EVENT)
            target = (last[0], last[1]) if last is not None else (0, 0)
            checkpoints = await conn.fetch(_CHECKPOINTS)
            if all((row[0], row[1]) >= target for row in checkpoints):
                return round(time.perf_counter() - started, 2)
            if time.perf_counter() - started > max_wait:
                return None
            await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def accepted_commands(url: str, key_prefix: str) -> int:
    """How many commands whose Idempotency-Key starts with ``key_prefix`` were accepted (201):
    the database's own count of a scenario's spends, warm-up included, to check the client's."""
    conn = await asyncpg.connect(url)
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM commands WHERE starts_with(command_id, $1) AND outcome = 'accepted'",
            key_prefix,
        )
    finally:
        await conn.close()
    return count


async def checkpoint(url: str) -> None:
    """Flush dirty buffers now, so a checkpoint is less likely to land inside a measured window
    (needs superuser or pg_checkpoint; skipped silently without)."""
    conn = await asyncpg.connect(url)
    try:
        with contextlib.suppress(asyncpg.PostgresError):
            await conn.execute("CHECKPOINT")
    finally:
        await conn.close()


async def postgres_facts(url: str) -> dict[str, object]:
    """Version and the settings that move commit throughput the most."""
    names = [
        "max_connections", "shared_buffers", "synchronous_commit", "fsync", "wal_level",
        "full_page_writes", "commit_delay", "max_wal_size", "checkpoint_timeout", "jit",
    ]  # fmt: skip
    conn = await asyncpg.connect(url)
    try:
        version = await conn.fetchval("SHOW server_version")
        rows = await conn.fetch(
            "SELECT name, setting, unit FROM pg_settings WHERE name = ANY($1::text[])", names
        )
        settings = {r["name"]: r["setting"] + (f" {r['unit']}" if r["unit"] else "") for r in rows}
        pid = await local_postmaster_pid(conn)
    finally:
        await conn.close()
    return {"server_version": version, "settings": settings, "local_postmaster_pid": pid}
