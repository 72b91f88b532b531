"""Real PostgreSQL for every test: DATABASE_URL when set, else an embedded server under
.data/test-pg. The schema is migrated once into a template database; each test gets a fresh copy
of it, so tests that commit (all of them) never see each other's rows and nothing is truncated.

Before a test's database is dropped, every event in it is decoded into its domain class
(``domain.decode_event``): the vocabulary in domain/events.py must describe every event the SQL
writes. A test that writes an undecodable event on purpose (a poison event, an unknown type) names
it in ``foreign_events``."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx
import pytest
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.database import embedded_server, with_user
from api.migrate import migrate
from api.settings import Settings
from commands import EventStore
from domain import decode_event
from tests.helpers import APP_ROLE, AUTH, add_test_client, free_port

ROOT = Path(__file__).resolve().parent.parent


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


async def _create_template(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    conn = await asyncpg.connect(with_database(admin_url, name))
    try:
        await migrate(conn, app_role=APP_ROLE)
        await add_test_client(conn)
    finally:
        await conn.close()


async def _drop(admin_url: str, name: str) -> None:
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
def admin_url() -> Iterator[str]:
    url = os.environ.get("DATABASE_URL")
    if url:
        yield url
        return
    with embedded_server(ROOT / ".data" / "test-pg") as server:
        yield server.get_uri("postgres")


@pytest.fixture(scope="session")
def template_db(admin_url: str) -> Iterator[str]:
    name = f"tally_test_template_{os.getpid()}"
    asyncio.run(_create_template(admin_url, name))
    yield name
    asyncio.run(_drop(admin_url, name))


@pytest.fixture
def foreign_events() -> set[int]:
    """Global positions of events this test wrote on purpose that no domain class describes."""
    return set()


async def _decode_every_event(url: str, foreign: set[int]) -> None:
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch("SELECT global_position, event_type, data::text AS data FROM events")
    finally:
        await conn.close()
    failures = []
    for row in rows:
        if row["global_position"] in foreign:
            continue
        try:
            decode_event(row["event_type"], row["data"])
        except ValueError as exc:  # msgspec.ValidationError and UnknownEventType are ValueErrors
            failures.append(f"position {row['global_position']} ({row['event_type']}): {exc}")
    assert not failures, "stored events that domain/events.py cannot decode:\n" + "\n".join(failures)


@pytest.fixture
async def db_url(admin_url: str, template_db: str, foreign_events: set[int]) -> AsyncIterator[str]:
    """A fresh, migrated database for this test; every event it holds at the end must decode."""
    name = f"tally_test_{uuid.uuid4().hex[:16]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template_db}"')
    finally:
        await admin.close()
    url = with_database(admin_url, name)
    try:
        yield url
        await _decode_every_event(url, foreign_events)
    finally:
        await _drop(admin_url, name)


@pytest.fixture
def app_db_url(db_url: str) -> str:
    """The test database as the application's least-privileged role (``tally migrate`` made it):
    what the API and the projector connect with, here as in a deployment."""
    return with_user(db_url, APP_ROLE, None)


@pytest.fixture
async def pool(db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=60)
    yield pool
    await pool.close()


@pytest.fixture
def store(pool: asyncpg.Pool) -> EventStore:
    return EventStore(pool)


@pytest.fixture
def settings(app_db_url: str) -> Settings:
    return Settings(database_url=app_db_url, consistency_timeout=5.0, projector_poll_interval=0.2)


class LiveServer(NamedTuple):
    url: str
    process: asyncio.subprocess.Process


@contextlib.asynccontextmanager
async def serving(
    db_url: str,
    *,
    projector: bool = True,
    env: Mapping[str, str] | None = None,
    port: int | None = None,
    args: Sequence[str] = (),
) -> AsyncIterator[LiveServer]:
    """`tally serve` (with ``--projector`` unless told otherwise) as its own process on a free
    loopback port (or ``port``), connected to ``db_url``'s server as the application role, with
    ``env`` added to its environment (``{"TALLY_COMMAND_TIMEOUT": "2"}``, say); stopped (SIGTERM)
    on the way out unless it has exited already (a test that SIGKILLs it)."""
    port = free_port() if port is None else port
    environment = {
        **os.environ, "DATABASE_URL": with_user(db_url, APP_ROLE, None), "HOST": "127.0.0.1",
        "PORT": str(port),
        "TALLY_LOG_LEVEL": "warning", "TALLY_PROJECTOR_POLL_INTERVAL": "0.2", **(env or {}),
    }  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "api.cli",
        "serve",
        *(["--projector"] if projector else []),
        *args,
        env=environment,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(300):  # up to ~30 s for the process to import and bind
                try:
                    if (await http.get(f"{url}/health/live")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert process.returncode is None, "the server exited during start-up"
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the server did not answer /health/live")
        yield LiveServer(url, process)
    finally:
        if process.returncode is None:
            process.terminate()
            await process.wait()


@pytest.fixture
async def live_server(db_url: str) -> AsyncIterator[LiveServer]:
    """A real server process, for what needs one: signals, and a browser loading the docs page."""
    async with serving(db_url) as server:
        yield server


@pytest.fixture
async def two_servers(db_url: str) -> AsyncIterator[tuple[LiveServer, LiveServer]]:
    """Two API processes on one database (the first also runs the projector), as behind a load
    balancer."""
    async with serving(db_url) as first, serving(db_url, projector=False) as second:
        yield first, second


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    """The whole app over HTTP, with its projector running in-process."""
    app = create_app(settings, run_projector=True)
    async with AsyncTestClient(app) as client:
        client.headers.update(AUTH)
        yield client
