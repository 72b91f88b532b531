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
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import asyncpg

from api.settings import Settings

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


def connection_settings(settings: Settings, application_name: str) -> dict[str, str]:
    return {
        "application_name": application_name,
        "idle_in_transaction_session_timeout": str(settings.idle_in_transaction_timeout_ms),
        "timezone": "UTC",
    }


async def _keep_session(_conn: asyncpg.Connection) -> None:
    """Release a pooled connection without asyncpg's default server-side reset.

    The default sends ``RESET ALL; UNLISTEN *; SELECT pg_advisory_unlock_all(); CLOSE ALL`` on
    every release: one more round trip per command, and work for PostgreSQL, measured at about a
    sixth of the API server's time under the benchmark. Tally's pooled connections keep no session
    state (LISTEN and advisory locks live on dedicated connections), and asyncpg still rolls back a
    transaction left open before calling this.
    """


async def create_pool(
    url: str,
    settings: Settings,
    application_name: str,
    *,
    min_size: int | None = None,
    max_size: int | None = None,
) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url,
        min_size=settings.pool_min_size if min_size is None else min_size,
        max_size=settings.pool_max_size if max_size is None else max_size,
        server_settings=connection_settings(settings, application_name),
        reset=_keep_session,
    )
