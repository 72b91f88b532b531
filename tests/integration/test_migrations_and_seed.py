"""Migrations apply once and refuse edited files; the demo seed is idempotent."""

from __future__ import annotations

import shutil
from pathlib import Path

import asyncpg
import pytest

from api.migrate import MigrationError, migrate, migrations_dir
from api.seed import seed
from commands import EventStore


async def test_migrating_again_applies_nothing(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        assert (await migrate(conn)).nothing
        applied = await conn.fetchval("SELECT count(*) FROM schema_migrations")
        assert applied == len(list(migrations_dir().glob("*.sql")))
    finally:
        await conn.close()


async def test_an_edited_applied_migration_is_refused(db_url: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), copy)
    first = sorted(copy.glob("*.sql"))[0]
    first.write_text(first.read_text() + "\n-- edited after the fact\n")
    conn = await asyncpg.connect(db_url)
    try:
        with pytest.raises(MigrationError, match=first.name):
            await migrate(conn, copy)
    finally:
        await conn.close()


async def test_a_new_migration_file_is_applied_once(db_url: str, tmp_path: Path) -> None:
    copy = tmp_path / "migrations"
    shutil.copytree(migrations_dir(), copy)
    (copy / "9999_probe.sql").write_text("CREATE TABLE probe (id int);")
    conn = await asyncpg.connect(db_url)
    try:
        assert (await migrate(conn, copy)).migrations == ["9999_probe.sql"]
        assert (await migrate(conn, copy)).nothing
    finally:
        await conn.close()


async def test_seed_twice_adds_nothing(pool: asyncpg.Pool) -> None:
    store = EventStore(pool)
    new, replayed = await seed(store)
    assert (new, replayed) == (10, 0)
    events = await pool.fetchval("SELECT count(*) FROM events")
    assert await seed(store) == (0, 10)
    assert await pool.fetchval("SELECT count(*) FROM events") == events
