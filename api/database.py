"""Where the database is: ``DATABASE_URL``, or an embedded PostgreSQL the project runs itself.

The embedded server (the ``pgserver`` package, which bundles PostgreSQL's binaries) keeps its data
under ``<data_dir>/pg`` and listens on a unix socket only. It is shared by every ``tally`` process
of the checkout and stopped when the last one exits.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import warnings
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from api.settings import Settings
from commands.errors import Overloaded, close_broken

log = logging.getLogger("tally.database")

EMBEDDED_DATABASE = "tally"


@contextlib.contextmanager
def embedded_server(data_dir: Path) -> Iterator[Any]:
    """Start (or join) the embedded PostgreSQL under ``data_dir``; stop it when the last user leaves."""
    # Imported here: deployments with DATABASE_URL never load it. pgserver keeps a lock file in the
    # user's runtime dir and warns when XDG_RUNTIME_DIR is unset (containers, CI); that is harmless.
    warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
    try:
        import pgserver
    except ImportError:
        raise RuntimeError(
            "DATABASE_URL is unset and the embedded PostgreSQL is not installed: "
            "set DATABASE_URL, or pip install 'tally[embedded]'"
        ) from None

    data_dir.mkdir(parents=True, exist_ok=True)
    _forget_dead_handles(data_dir)
    server = pgserver.get_server(  # type: ignore[attr-defined]
        data_dir.resolve(), cleanup_mode="stop"
    )
    try:
        yield server
    finally:
        server.cleanup()


def _forget_dead_handles(data_dir: Path) -> None:
    """pgserver stops the server when its last *registered* process exits, but never forgets a
    process that died without cleaning up (SIGKILL, a crash), so the server would then never stop.
    Drop such processes from its list, under pgserver's own lock."""
    import fasteners
    from pgserver.postgres_server import PostgresServer

    handles = data_dir / ".handle_pids.json"
    with fasteners.InterProcessLock(PostgresServer.lock_path):
        try:
            pids = json.loads(handles.read_text())
        except (FileNotFoundError, ValueError):
            return
        alive = [pid for pid in pids if _is_alive(pid)]
        if alive != pids:
            handles.write_text(json.dumps(alive))


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def with_user(url: str, user: str, password: str | None) -> str:
    """``url`` logging in as ``user`` (with ``password``, if any) instead."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    login = quote(user, safe="") + (":" + quote(password, safe="") if password else "")
    return urlunsplit(parts._replace(netloc=f"{login}@{host}"))


def app_url(settings: Settings, base: str) -> str:
    """What ``tally serve``, ``tally projector`` and the read-only commands connect with:
    ``DATABASE_URL`` as given when ``TALLY_OWNER_DATABASE_URL`` is set (a deployment names both);
    otherwise ``base`` logging in as ``TALLY_APP_ROLE`` when it is set (``make run``)."""
    if settings.owner_database_url or not settings.app_role:
        return base
    return with_user(base, settings.app_role, settings.app_password)


def owner_url(settings: Settings, base: str) -> str:
    """What ``tally migrate``, ``tally rebuild``, ``tally keys`` and ``tally seed`` connect with."""
    return settings.owner_database_url or base


@contextlib.contextmanager
def database_url(settings: Settings) -> Iterator[str]:
    """The server's URL: ``DATABASE_URL`` when set, else the embedded server's ``tally`` database
    (as its superuser); app_url and owner_url say which login each command uses."""
    if settings.database_url:
        yield settings.database_url
        return
    with embedded_server(settings.data_dir / "pg") as server:
        exists = server.psql(f"SELECT 1 FROM pg_database WHERE datname = '{EMBEDDED_DATABASE}';")
        if "(1 row)" not in exists:
            server.psql(f"CREATE DATABASE {EMBEDDED_DATABASE};")
        url = server.get_uri(EMBEDDED_DATABASE)
        log.info("embedded PostgreSQL at %s", url)
        yield url


def connection_settings(
    settings: Settings,
    application_name: str,
    *,
    statement_timeout: float | None = None,
    lock_timeout: float | None = None,
) -> dict[str, str]:
    """Every session's settings. The keepalives make the server notice, within about
    half a minute, a client that vanished without closing (its locks and backend are freed)."""
    server = {
        "application_name": application_name,
        "idle_in_transaction_session_timeout": str(settings.idle_in_transaction_timeout_ms),
        "timezone": "UTC",
        "tcp_keepalives_idle": "10",
        "tcp_keepalives_interval": "5",
        "tcp_keepalives_count": "3",
    }
    if statement_timeout is not None:
        server["statement_timeout"] = str(round(statement_timeout * 1000))
    if lock_timeout is not None:
        server["lock_timeout"] = str(round(lock_timeout * 1000))
    return server


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's default server-side reset.

    The default sends ``RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); CLOSE ALL`` on
    every release: one more round trip per command, and work for PostgreSQL, measured at about a
    sixth of the API server's time under the benchmark. Tally's pooled connections keep no session
    state (LISTEN and advisory locks live on dedicated connections), and asyncpg still rolls back a
    transaction left open before calling this.
    """


# A stalled network path (no reset, no answer) must fail a connection, not hang it until the
# kernel's defaults give up after hours: probes after 10 s idle, every 5 s, 3 missed and it is
# dead; and data unacknowledged for 20 s fails it too (TCP_USER_TIMEOUT, Linux). Requests are also
# bounded by asyncpg's own timeouts; these free the connection itself.
_KEEPALIVE_OPTIONS: tuple[tuple[str, int], ...] = (
    ("TCP_KEEPIDLE", 10),
    ("TCP_KEEPINTVL", 5),
    ("TCP_KEEPCNT", 3),
    ("TCP_USER_TIMEOUT", 20_000),
)


def keep_alive(conn: asyncpg.Connection) -> None:
    """Turn on TCP keepalives on ``conn``'s socket (asyncpg has no option for it; the socket is
    reached through its transport). Unix sockets need none."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE_OPTIONS:
        if hasattr(socket, name):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


async def _init_connection(conn: asyncpg.Connection) -> None:
    keep_alive(conn)


async def create_pool(
    url: str,
    settings: Settings,
    application_name: str,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
    statement_timeout: float | None = None,
    lock_timeout: float | None = None,
) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=settings.pool_min_size if min_size is None else min_size,
        max_size=settings.pool_max_size if max_size is None else max_size,
        server_settings=connection_settings(
            settings, application_name, statement_timeout=statement_timeout, lock_timeout=lock_timeout
        ),
        reset=_keep_session,
        init=_init_connection,
        timeout=settings.connect_timeout,
    )


async def connect(url: str, settings: Settings, application_name: str) -> asyncpg.Connection:
    """A dedicated connection (LISTEN, the projector's lock), with the same keepalives."""
    conn = await asyncpg.connect(
        url,
        server_settings=connection_settings(settings, application_name),
        timeout=settings.connect_timeout,
    )
    keep_alive(conn)
    return conn


class BoundedPool:
    """A pool whose every wait is bounded: a connection is awaited at most ``timeout`` seconds (then
    Overloaded: every connection is busy), and each statement runs at most a second longer than
    that (asyncpg's timeout, for a path that stopped answering; PostgreSQL's statement_timeout, set
    on the pool, normally ends it first). Releasing a connection whose statement was cancelled is
    bounded too (asyncpg uses the acquire's timeout). Queries use one over their own pool;
    key lookups, health checks and notifications one over the commands' pool."""

    def __init__(self, pool: asyncpg.Pool, timeout: float, what: str) -> None:
        self.pool = pool
        self.timeout = timeout
        self._what = what

    @contextlib.asynccontextmanager
    async def acquire(self) -> AsyncIterator[asyncpg.pool.PoolConnectionProxy[asyncpg.Record]]:
        try:
            conn = await self.pool.acquire(timeout=self.timeout)
        except TimeoutError:
            raise Overloaded(
                f"every connection for {self._what} stayed busy for {self.timeout:g} s"
            ) from None
        try:
            yield conn
        except BaseException as exc:
            close_broken(conn, exc)
            raise
        finally:
            await self.pool.release(conn)

    async def fetch(self, query: str, *args: Any) -> list[asyncpg.Record]:
        async with self.acquire() as conn:
            return await conn.fetch(query, *args, timeout=self.timeout + 1)

    async def fetchrow(self, query: str, *args: Any) -> asyncpg.Record | None:
        async with self.acquire() as conn:
            return await conn.fetchrow(query, *args, timeout=self.timeout + 1)

    async def fetchval(self, query: str, *args: Any) -> Any:
        async with self.acquire() as conn:
            return await conn.fetchval(query, *args, timeout=self.timeout + 1)

    async def execute(self, query: str, *args: Any) -> str:
        async with self.acquire() as conn:
            return await conn.execute(query, *args, timeout=self.timeout + 1)
