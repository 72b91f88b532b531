"""``tally rebuild``: replay every event into fresh read-model tables, then swap them in atomically.

How: the rebuild of projection NAME works in its own schema ``rm_rebuild_NAME``, holding empty
copies of NAME's tables and of ``projection_checkpoints``. With ``search_path`` set to that schema
first, the *same* projection function the live projector runs resolves its unqualified table names
to the copies, while ``events`` still resolves to the live table: one implementation of every
projection, no second copy to drift. The API and the live projector keep using the live tables
meanwhile.

The swap is one transaction: lock NAME's live checkpoint row (the live projector waits there),
apply the last events to the copies, drop the live tables, move the copies into ``public``, and set
the live checkpoint to the rebuild's with the generation bumped. Readers see the old tables or the
new ones, never a mix; the live projector then continues from the rebuilt checkpoint.

Interrupting a rebuild leaves its schema and checkpoint in place: running it again resumes
(``--restart`` starts over). A second rebuild of the same projection waits on an advisory lock.
"""

from __future__ import annotations

import asyncio
import sys
import time
import zlib
from collections.abc import Callable
from typing import Final, TextIO

import asyncpg
import msgspec

from projections.projector import PROJECTIONS, projection_lock_key

TABLES: Final[dict[str, tuple[str, ...]]] = {
    "wallets": ("rm_assets", "rm_wallets", "rm_balances", "rm_holds"),
    "history": ("rm_transactions", "rm_history_wallets"),
    "system": ("rm_system_balances",),
}
REBUILD_BATCH: Final = 20_000
SWAP_LOCK_TIMEOUT_MS: Final = 200
SWAP_RETRY_INTERVAL_S: Final = 0.5
SWAP_PATIENCE_S: Final = 900
_LOCK_BASE: Final = 0x7A11_0100


class RebuildResult(msgspec.Struct, frozen=True, kw_only=True):
    projection: str
    events: int
    seconds: float
    generation: int
    resumed: bool

    @property
    def events_per_second(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


Progress = Callable[[str, int, int], None]


_SHAPE = """
SELECT string_agg(table_name || '.' || column_name || ' ' || data_type, ', '
                  ORDER BY table_name, ordinal_position)
  FROM information_schema.columns WHERE table_schema = $1 AND table_name = ANY($2::text[])
"""


def _schema(name: str) -> str:
    return f"rm_rebuild_{name}"


async def _prepare(conn: asyncpg.Connection, name: str, restart: bool) -> bool:
    """Create the rebuild schema with empty copies; True when an interrupted rebuild is resumed.
    One is resumed only when its copies have exactly the live tables' columns (found in review: a
    rebuild interrupted before a release added a table would have written to the live one through
    the search path); otherwise it starts over."""
    schema = _schema(name)
    tables = [*TABLES[name], "projection_checkpoints"]
    copies: str | None = await conn.fetchval(_SHAPE, schema, tables)
    live: str = await conn.fetchval(_SHAPE, "public", tables)
    if copies == live and not restart:
        return True
    async with conn.transaction():
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        await conn.execute(f"CREATE SCHEMA {schema}")
        for table in (*TABLES[name], "projection_checkpoints"):
            await conn.execute(f"CREATE TABLE {schema}.{table} (LIKE public.{table} INCLUDING ALL)")
        await conn.execute(f"INSERT INTO {schema}.projection_checkpoints (name) VALUES ($1)", name)
    return False


async def _apply(conn: asyncpg.Connection, name: str, batch: int) -> int:
    row = await conn.fetchrow(PROJECTIONS[name], batch)
    assert row is not None
    applied: int = row["applied"]
    return applied


async def _copy_grants(conn: asyncpg.Connection, table: str, schema: str) -> None:
    """Give the copy the live table's grants (the application role's, api/migrate.py), so the API
    and the projector keep their access to the read model it replaces."""
    grants = await conn.fetch(
        """SELECT CASE WHEN a.grantee = 0 THEN 'PUBLIC' ELSE quote_ident(pg_get_userbyid(a.grantee)) END
                  AS grantee, string_agg(a.privilege_type, ', ') AS privileges
             FROM pg_class c, aclexplode(c.relacl) a
            WHERE c.oid = $1::regclass AND a.grantee <> c.relowner
            GROUP BY a.grantee""",
        f"public.{table}",
    )
    for grant in grants:
        await conn.execute(f"GRANT {grant['privileges']} ON {schema}.{table} TO {grant['grantee']}")


async def _swap(conn: asyncpg.Connection, name: str, batch: int) -> tuple[int, int]:
    """Finish the replay and swap the copies in, atomically. Returns (events applied, generation).

    Lock order (found in review): first the projection's advisory lock, which every live batch
    takes first too, so the live projector waits there holding nothing; then the live tables, with
    a short lock_timeout, so a long reader (a running `tally verify`) makes the swap give up and
    retry rather than queue an exclusive lock that blocks every API read behind it; only then the
    checkpoint row, the first write, which assigns this transaction its id. A transaction id held
    while waiting would hold back every projection (they read below the oldest running one).
    """
    schema = _schema(name)
    applied = 0
    live_tables = ", ".join(f"public.{table}" for table in TABLES[name])
    async with conn.transaction():
        await conn.execute(f"SET LOCAL lock_timeout = '{SWAP_LOCK_TIMEOUT_MS}ms'")
        await conn.execute("SELECT pg_advisory_xact_lock($1)", projection_lock_key(name))
        await conn.execute(f"LOCK TABLE {live_tables} IN ACCESS EXCLUSIVE MODE")
        await conn.execute("SELECT 1 FROM public.projection_checkpoints WHERE name = $1 FOR UPDATE", name)
        while (n := await _apply(conn, name, batch)) > 0:
            applied += n
        for table in TABLES[name]:
            await _copy_grants(conn, table, schema)
            await conn.execute(f"DROP TABLE public.{table}")
            await conn.execute(f"ALTER TABLE {schema}.{table} SET SCHEMA public")
        generation: int = await conn.fetchval(
            f"""UPDATE public.projection_checkpoints live
                   SET last_xid = r.last_xid, last_position = r.last_position,
                       events_applied = r.events_applied, updated_at = now(), rebuilt_at = now(),
                       generation = live.generation + 1,
                       error = NULL, error_position = NULL, stopped_at = NULL
                  FROM {schema}.projection_checkpoints r
                 WHERE live.name = $1 AND r.name = $1
             RETURNING live.generation""",
            name,
        )
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    return applied, generation


async def rebuild(
    url: str,
    name: str,
    *,
    restart: bool = False,
    batch: int = REBUILD_BATCH,
    progress: Progress | None = None,
    on_swap_retry: Callable[[], None] | None = None,
) -> RebuildResult:
    """Rebuild projection ``name`` from every event while the live one keeps serving.
    ``on_swap_retry`` is called each time the swap gives way to a reader and will try again."""
    if name not in TABLES:
        raise ValueError(f"unknown projection {name!r}; one of {', '.join(TABLES)}")
    # A dedicated connection: its search_path makes the projection function write to the copies.
    conn = await asyncpg.connect(url, server_settings={"application_name": f"tally-rebuild:{name}"})
    try:
        await conn.execute("SELECT pg_advisory_lock($1)", _LOCK_BASE + zlib.crc32(name.encode()) % 0xFFFF)
        resumed = await _prepare(conn, name, restart)
        await conn.execute(f"SET search_path = {_schema(name)}, public")
        total: int = await conn.fetchval("SELECT count(*) FROM public.events")
        done: int = await conn.fetchval(
            "SELECT events_applied FROM projection_checkpoints WHERE name = $1", name
        )
        clock = time.perf_counter()
        replayed = 0
        while True:
            applied = await _apply(conn, name, batch)
            replayed += applied
            if progress is not None:
                progress(name, done + replayed, max(total, done + replayed))
            if applied < batch:
                break
        deadline = time.monotonic() + SWAP_PATIENCE_S
        while True:
            try:
                applied, generation = await _swap(conn, name, batch)
                break
            except asyncpg.LockNotAvailableError:
                if time.monotonic() > deadline:
                    raise RuntimeError(
                        f"could not swap {name} in for {SWAP_PATIENCE_S} s: its tables stayed in use "
                        "(a long `tally verify`?); run the rebuild again to resume"
                    ) from None
                if on_swap_retry is not None:
                    on_swap_retry()
                # Keep up with new events meanwhile, so the final swap has little left to do.
                replayed += await _apply(conn, name, batch)
                await asyncio.sleep(SWAP_RETRY_INTERVAL_S)
        replayed += applied
        seconds = time.perf_counter() - clock
    finally:
        await conn.close()
    return RebuildResult(
        projection=name, events=replayed, seconds=round(seconds, 3), generation=generation, resumed=resumed
    )


class ProgressPrinter:
    """A progress bar with events/s and ETA on a terminal; a plain line every few seconds otherwise."""

    def __init__(self, stream: TextIO = sys.stderr, interval: float = 2.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._interval = interval
        self._started: dict[str, tuple[float, int]] = {}
        self._last_line = 0.0

    def __call__(self, name: str, done: int, total: int) -> None:
        now = time.perf_counter()
        start, first = self._started.setdefault(name, (now, done))
        rate = (done - first) / (now - start) if now > start else 0.0
        eta = (total - done) / rate if rate > 0 else 0.0
        share = done / total if total else 1.0
        text = f"{name}: {done:,}/{total:,} events ({share:.0%}), {rate:,.0f} events/s, ETA {eta:,.0f} s"
        if self._tty:
            bar = "#" * int(share * 30)
            self._stream.write(f"\r[{bar:<30}] {text}\x1b[K")
            if done >= total:
                self._stream.write("\n")
            self._stream.flush()
        elif now - self._last_line >= self._interval or done >= total:
            self._stream.write(text + "\n")
            self._stream.flush()
            self._last_line = now
