"""The read-cost scenario's database: a wallet of 10 events and one of 1,000,000, built once, kept.

Unlike ``tally_bench`` (dropped and made again by every run), ``tally_bench_reads`` is kept between
runs, on the same server (the embedded one under ``.data/bench-pg``, or ``DATABASE_URL``'s): a
later run migrates it (``tally migrate``'s own function, so a new migration or definition lands on
the kept data, as it would in production), finds both wallets at their size and builds nothing. A
build that was interrupted resumes where it stopped (every batch is one transaction); a database
that no longer migrates, or ``--rebuild-reads``, is dropped and built again.

The events are written by the command functions every API command goes through, so the database
is one ``tally verify`` accepts (hash chains, balances, gapless versions, one command per event):
the wallets are opened with ``tally_open_wallet``, and their transactions (a top-up of
``MAX_AMOUNT`` first, then top-ups, spends and bonuses of 1 in turn) are sent to
``tally_post_transactions`` as batches of ``BUILD_BATCH`` commands on the one wallet, each with its
own Idempotency-Key and the fingerprint the API would compute. A wallet's commands serialize on its
row lock, so the build runs on one connection; the projector catches up meanwhile on another (the
second core), so the read models are complete soon after the last batch.

The shallow wallet's events are written one per transaction, so each has its own ``recorded_at``
and "as of the middle of its history" falls between two of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

import asyncpg
import msgspec

from api.dto import MoveCreditsRequest
from api.migrate import MigrationError, migrate
from bench.database import ASSET, Target, bench_context, ensure_bench_client, with_database
from commands import CommandContext, CommandRecord
from domain import MAX_AMOUNT, DefineAsset, GrantBonus, OpenWallet, SpendCredits, TopUpCredits
from domain.commands import TransactionCommand
from projections.projector import catch_up

READS_DATABASE: Final = "tally_bench_reads"
SHALLOW_EVENTS: Final = 10
DEEP_EVENTS: Final = 1_000_000
# Commands per tally_post_transactions call while building. The function's cost per command grows
# with the batch (its arrays of claimed keys, and every update of the one wallet row stays in the
# heap until the batch commits): a few hundred is the fastest measured; a commit per command would
# be much slower still.
BUILD_BATCH: Final = 250
PROJECT_BATCH: Final = 5000
PROGRESS_EVERY_S: Final = 15.0

_ACCEPTED = "accepted"
# Waits for the wallet (60 s at most) rather than come back wallet_locked.
_POST = "SELECT outcome, replayed FROM tally_post_transactions($1::jsonb, 60000)"
_OPEN = "SELECT outcome FROM tally_open_wallet($1::jsonb)"
_DEFINE = "SELECT outcome FROM tally_define_asset($1::jsonb)"
_VERSION = "SELECT version FROM streams WHERE stream_id = $1"
_MIDDLE = """
SELECT e.global_position, e.recorded_at,
       (SELECT max(c.stream_version) FROM events c
         WHERE c.stream_id = e.stream_id AND c.recorded_at <= e.recorded_at) AS version_at_time
  FROM events e
 WHERE e.stream_id = $1 AND e.stream_version = $2
"""
# Flow kind -> the segment of its POST route, for the fingerprint the API would compute.
_SEGMENTS: Final[dict[type[TransactionCommand], str]] = {
    TopUpCredits: "top-ups",
    GrantBonus: "bonuses",
    SpendCredits: "spends",
}
# The kind of the transaction at each version after the first top-up, by version modulo 4: the
# balance stays near MAX_AMOUNT and the history holds every kind.
_CYCLE: Final[tuple[type[TransactionCommand], ...]] = (TopUpCredits, SpendCredits, GrantBonus, SpendCredits)


@dataclass(frozen=True, slots=True)
class ReadWallet:
    """A prepared wallet and the moments in the middle of its history that the scenario asks for."""

    key: str  # "shallow" or "deep"
    user_id: str
    events: int  # its version: every event, WalletOpened included
    middle_version: int
    middle_position: int  # the global position of its event at middle_version
    middle_time: datetime  # that event's recorded_at
    version_at_middle_time: int  # its last version recorded at or before middle_time

    @property
    def cursor(self) -> str:
        """A history cursor in the middle: the page below the middle version."""
        return f"v{self.middle_version}"


def user_id_for(events: int) -> str:
    return f"reads-{events}"


def reads_url(target: Target) -> str:
    return with_database(target.admin_url, READS_DATABASE)


async def prepare(
    target: Target, *, deep_events: int, rebuild: bool, progress: Callable[[str], None]
) -> tuple[list[ReadWallet], dict[str, Any]]:
    """The two wallets, built or found, every projection caught up; and what it took."""
    setup: dict[str, Any] = {}
    started = time.perf_counter()
    setup["database"] = await _ensure_database(target.admin_url, drop=rebuild)
    url = reads_url(target)
    try:
        await _migrate(url)
    except MigrationError as exc:
        if setup["database"] == "created":
            raise
        progress(f"  the kept {READS_DATABASE} does not migrate ({exc}); building it again")
        setup["database"] = await _ensure_database(target.admin_url, drop=True)
        await _migrate(url)
    setup["migrate_s"] = round(time.perf_counter() - started, 2)

    sizes = {"shallow": SHALLOW_EVENTS, "deep": deep_events}
    pool = await asyncpg.create_pool(url, min_size=2, max_size=2)
    try:
        await _ensure_asset(pool)
        built: dict[str, int] = {}
        build_started = time.perf_counter()
        done = asyncio.Event()
        projector = asyncio.create_task(_project_until(url, done))
        try:
            for key, events in sizes.items():
                built[key] = await _build(pool, user_id_for(events), events, key=key, progress=progress)
        except BaseException:  # interrupted or failed: the next run resumes, projecting included
            projector.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await projector
            raise
        done.set()
        await projector
        setup["events_written"] = built
        setup["build_s"] = round(time.perf_counter() - build_started, 2)
        if any(built.values()):
            written = sum(built.values())
            setup["events_written_per_s"] = round(written / max(setup["build_s"], 1e-9))
            started = time.perf_counter()
            async with pool.acquire() as conn:  # visibility map and statistics for the new rows
                await conn.execute("VACUUM ANALYZE")
            setup["vacuum_s"] = round(time.perf_counter() - started, 2)
        wallets = [await _describe(pool, key, user_id_for(events)) for key, events in sizes.items()]
    finally:
        await pool.close()
    return wallets, setup


async def _ensure_database(admin_url: str, *, drop: bool) -> str:
    """Whether the database was "created" or "kept"; ``drop`` drops a kept one first."""
    admin = await asyncpg.connect(admin_url)
    try:
        if drop:
            await admin.execute(f'DROP DATABASE IF EXISTS "{READS_DATABASE}" WITH (FORCE)')
        if await admin.fetchval("SELECT true FROM pg_database WHERE datname = $1", READS_DATABASE):
            return "kept"
        await admin.execute(f'CREATE DATABASE "{READS_DATABASE}"')
        return "created"
    finally:
        await admin.close()


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await migrate(conn)
        await ensure_bench_client(conn)
    finally:
        await conn.close()


def _json(records: list[CommandRecord]) -> str:
    return msgspec.json.encode(records).decode()


def _record(key: str, path: str, body: bytes, command: DefineAsset | OpenWallet | TransactionCommand) -> str:
    fingerprint = CommandContext.fingerprint_of("POST", path, body, "")
    ctx = bench_context(key, fingerprint, {"path": path, "user_agent": "bench-reads-setup"})
    return msgspec.json.encode(CommandRecord.of(ctx, command)).decode()


async def _ensure_asset(pool: asyncpg.Pool) -> None:
    if await pool.fetchval(_VERSION, f"asset:{ASSET}") is not None:
        return
    command = DefineAsset(code=ASSET, name="Gold coins (benchmark)", decimals=0)
    outcome = await pool.fetchval(
        _DEFINE,
        _record(f"bench-reads-asset-{uuid.uuid4().hex}", "/v1/assets", msgspec.json.encode(command), command),
    )
    if outcome != _ACCEPTED:
        raise RuntimeError(f"defining {ASSET} in {READS_DATABASE}: {outcome}")


class _Transactions:
    """The command records of one wallet's transactions, by version, as the API would make them."""

    def __init__(self, user_id: str) -> None:
        self._user_id = user_id
        self._tag = uuid.uuid4().hex[:8]  # keys unique across builds, a resumed one included
        self._seq = 0
        self._fingerprints: dict[tuple[type[TransactionCommand], int], tuple[bytes, str]] = {}

    def _fingerprint(self, kind: type[TransactionCommand], amount: int) -> tuple[bytes, str]:
        found = self._fingerprints.get((kind, amount))
        if found is None:
            path = f"/v1/wallets/{self._user_id}/{_SEGMENTS[kind]}"
            body = msgspec.json.encode(MoveCreditsRequest(asset=ASSET, amount=amount))
            found = self._fingerprints[kind, amount] = (
                CommandContext.fingerprint_of("POST", path, body, ""),
                path,
            )
        return found

    def record(self, version: int) -> CommandRecord:
        kind, amount = (TopUpCredits, MAX_AMOUNT) if version <= 2 else (_CYCLE[version % 4], 1)
        fingerprint, path = self._fingerprint(kind, amount)
        self._seq += 1
        ctx = bench_context(
            f"bench-{self._user_id}-{self._tag}-{self._seq:09d}",  # in key order: appended to the index
            fingerprint,
            {"path": path, "user_agent": "bench-reads-setup"},
        )
        return CommandRecord.of(ctx, kind(user_id=self._user_id, asset=ASSET, amount=amount))


async def _build(
    pool: asyncpg.Pool, user_id: str, events: int, *, key: str, progress: Callable[[str], None]
) -> int:
    """Open ``user_id`` if needed and append transactions until it holds ``events`` events; how many
    were written. A wallet already beyond ``events`` is a RuntimeError (its name says its size)."""
    stream_id = f"wallet:{user_id}"
    written = 0
    version: int | None = await pool.fetchval(_VERSION, stream_id)
    if version is None:
        command = OpenWallet(user_id=user_id)
        outcome = await pool.fetchval(
            _OPEN,
            _record(f"bench-reads-open-{user_id}", "/v1/wallets", msgspec.json.encode(command), command),
        )
        if outcome != _ACCEPTED:
            raise RuntimeError(f"opening wallet {user_id} in {READS_DATABASE}: {outcome}")
        version, written = 1, 1
    if version > events:
        raise RuntimeError(f"wallet {user_id} holds {version} events, more than {events}: --rebuild-reads")
    if version == events:
        return written
    progress(f"  building the {key} wallet {user_id}: {version:,} -> {events:,} events")
    transactions = _Transactions(user_id)
    # One event per transaction for a small wallet (distinct times); batches for a large one.
    batch_size = 1 if events <= SHALLOW_EVENTS else BUILD_BATCH
    started = last_report = time.perf_counter()
    first = version
    async with pool.acquire() as conn:
        # A crash loses the last batches, not the database's consistency: the build resumes. (The
        # pool resets the setting when the connection goes back.)
        await conn.execute("SET synchronous_commit = off")
        while version < events:
            last = min(events, version + batch_size)
            records = [transactions.record(v) for v in range(version + 1, last + 1)]
            rows = await conn.fetch(_POST, _json(records))
            outcomes = Counter(r["outcome"] + (" (replayed)" if r["replayed"] else "") for r in rows)
            if outcomes[_ACCEPTED] != len(records):
                raise RuntimeError(f"building wallet {user_id} at version {version}: {dict(outcomes)}")
            version += len(records)
            written += len(records)
            now = time.perf_counter()
            if now - last_report >= PROGRESS_EVERY_S:
                rate = (version - first) / (now - started)
                left = (events - version) / rate
                progress(f"    {version:,} events ({rate:,.0f}/s, about {left:,.0f} s left)")
                last_report = now
    elapsed = time.perf_counter() - started
    progress(f"    {user_id}: {version - first:,} events in {elapsed:.1f} s")
    return written


async def _project_until(url: str, done: asyncio.Event) -> None:
    """Apply events to every projection while the build runs (on its own connection, so on the
    other core), and once more after it: the read models are then complete."""
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        while True:
            finished = done.is_set()
            await catch_up(pool, batch_size=PROJECT_BATCH)
            if finished:
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1.0)
    finally:
        await pool.close()


async def _describe(pool: asyncpg.Pool, key: str, user_id: str) -> ReadWallet:
    stream_id = f"wallet:{user_id}"
    events: int = await pool.fetchval(_VERSION, stream_id)
    middle = events // 2
    row = await pool.fetchrow(_MIDDLE, stream_id, middle)
    if row is None:
        raise RuntimeError(f"wallet {user_id} has no event at version {middle}")
    return ReadWallet(
        key=key,
        user_id=user_id,
        events=events,
        middle_version=middle,
        middle_position=row["global_position"],
        middle_time=row["recorded_at"],
        version_at_middle_time=row["version_at_time"],
    )
