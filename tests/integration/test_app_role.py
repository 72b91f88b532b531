"""The application's database role is least-privileged: connected as it (as the API and the
projector are, in every test), history cannot be changed behind the command functions' back, and
the commands and projections still work."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from api.database import with_user
from api.migrate import MigrationError, migrate
from commands import EventStore
from projections.rebuild import rebuild
from tests.helpers import APP_ROLE, define_asset, open_wallet, projected, spend, top_up

REFUSED = [
    "UPDATE events SET data = '{}'",
    "DELETE FROM events",
    "TRUNCATE events",
    "INSERT INTO events (stream_id, stream_version, event_id, event_type, data, metadata, hash, recorded_at) "
    "VALUES ('wallet:x', 1, gen_random_uuid(), 'WalletOpened', '{}', '{}', sha256(''), now())",
    "UPDATE commands SET response = '{}'",
    "DELETE FROM commands",
    "TRUNCATE commands",
    "UPDATE streams SET version = 1",
    "ALTER TABLE events DISABLE TRIGGER ALL",
    "ALTER TABLE commands DISABLE TRIGGER USER",
    "DROP TABLE events",
    "CREATE TABLE mine (x int)",
    "CREATE FUNCTION mine() RETURNS int LANGUAGE sql AS 'SELECT 1'",
    "INSERT INTO clients (client_id, name, scopes) VALUES (gen_random_uuid(), 'me', '{admin}')",
    "UPDATE clients SET scopes = '{admin}'",
    "UPDATE client_secrets SET expires_at = NULL",
    # An internal function, called directly, runs with the caller's rights: refused at its INSERT.
    "SELECT tally_append_event('wallet:x', 1, sha256(''), gen_random_uuid(), 'WalletOpened', '{}', '{}', "
    "now(), pg_current_xact_id())",
]


@pytest.fixture
async def app_pool(app_db_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(app_db_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


async def test_the_app_role_holds_no_privilege_and_owns_nothing(app_pool: asyncpg.Pool) -> None:
    role = await app_pool.fetchrow(
        "SELECT current_user AS name, rolsuper, rolcreaterole, rolcreatedb, rolbypassrls, rolreplication "
        "FROM pg_roles WHERE rolname = current_user"
    )
    assert role is not None
    assert role["name"] == APP_ROLE
    assert not any(
        role[a] for a in ("rolsuper", "rolcreaterole", "rolcreatedb", "rolbypassrls", "rolreplication")
    )
    owned = await app_pool.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE r.rolname = current_user"
    )
    assert owned == 0
    assert not await app_pool.fetchval("SELECT has_schema_privilege(current_schema(), 'CREATE')")


@pytest.mark.parametrize("statement", REFUSED)
async def test_the_app_role_cannot_change_history(
    app_pool: asyncpg.Pool, pool: asyncpg.Pool, statement: str
) -> None:
    store = EventStore(app_pool)
    await define_asset(store)
    await open_wallet(store, "ann")
    await top_up(store, "ann", 100)
    before = await _history(pool)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        await app_pool.execute(statement)
    assert await _history(pool) == before


async def _history(pool: asyncpg.Pool) -> list[list[asyncpg.Record]]:
    """Everything the refused statements aim at, as the owner sees it."""
    return [
        await pool.fetch(f"SELECT * FROM {table} ORDER BY 1, 2")
        for table in ("events", "commands", "streams", "clients", "client_secrets")
    ]


async def test_commands_and_projections_work_as_the_app_role(
    app_pool: asyncpg.Pool, pool: asyncpg.Pool, db_url: str
) -> None:
    store = EventStore(app_pool)
    await define_asset(store)
    await open_wallet(store, "ann")
    await top_up(store, "ann", 100)
    await spend(store, "ann", 30)
    await projected(app_pool)
    assert await app_pool.fetchval("SELECT balance FROM rm_balances WHERE user_id = 'ann'") == 70
    # A rebuild (as the owner) swaps in new read-model tables; the app role keeps its access.
    for name in ("wallets", "history", "system"):
        await rebuild(db_url, name)
    await top_up(store, "ann", 5)
    await projected(app_pool)
    assert await app_pool.fetchval("SELECT balance FROM rm_balances WHERE user_id = 'ann'") == 75
    assert await app_pool.fetchval("SELECT count(*) FROM rm_transactions WHERE user_id = 'ann'") == 3


@contextlib.asynccontextmanager
async def _owner_and_role(
    db_url: str, prefix: str, create: str | None
) -> AsyncIterator[tuple[asyncpg.Connection, str]]:
    """The owner's connection and a role of this test's own (made with ``create``'s options, or
    left for the test to make), dropped with whatever it was granted on the way out."""
    role = f"{prefix}_{uuid.uuid4().hex[:8]}"
    owner = await asyncpg.connect(db_url)
    try:
        if create is not None:
            await owner.execute(f"CREATE ROLE {role} {create}")
        yield owner, role
    finally:
        await owner.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
        await owner.close()


async def test_migrate_refuses_a_privileged_app_role(db_url: str) -> None:
    async with _owner_and_role(db_url, "tally_test_priv", "LOGIN CREATEDB") as (conn, role):
        with pytest.raises(MigrationError, match="privileged"):
            await migrate(conn, app_role=role)
        current = await conn.fetchval("SELECT current_user")
        with pytest.raises(MigrationError, match="the role migrating"):
            await migrate(conn, app_role=current)


async def test_migrate_creates_the_app_role_with_its_password(db_url: str) -> None:
    async with _owner_and_role(db_url, "tally_test_new", None) as (conn, role):
        done = await migrate(conn, app_role=role, app_password="s3cret 'quoted'")
        assert done.app_role == "created"
        assert await conn.fetchval("SELECT rolpassword IS NOT NULL FROM pg_authid WHERE rolname = $1", role)
        assert await conn.fetchval(
            "SELECT has_function_privilege($1, 'tally_post_transactions(jsonb, integer)', 'EXECUTE')", role
        )
        assert not await conn.fetchval("SELECT has_table_privilege($1, 'events', 'UPDATE')", role)
        again = await migrate(conn, app_role=role)
        assert again.app_role == "granted"


async def test_a_role_granted_nothing_cannot_call_the_command_functions(db_url: str) -> None:
    """The command functions run as their owner, so calling one is the privilege: PUBLIC may not."""
    async with _owner_and_role(db_url, "tally_test_nobody", "LOGIN") as (_owner, role):
        nobody = await asyncpg.connect(with_user(db_url, role, None))
        try:
            for call in (
                "tally_post_transactions('[]'::jsonb, NULL)",
                "tally_define_asset('[]'::jsonb)",
                "tally_open_wallet('[]'::jsonb)",
            ):
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    await nobody.fetch(f"SELECT * FROM {call}")
        finally:
            await nobody.close()
