"""Applies ``migrations/NNNN_name.sql`` in order, each once, under an advisory lock.

Each file runs in its own transaction with its row in ``schema_migrations``; a file already applied
whose checksum changed is refused: history, including the schema's, is not rewritten.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from pathlib import Path

import asyncpg

log = logging.getLogger("tally.migrate")

# Any constant works; it only has to be the same in every process that migrates.
MIGRATION_LOCK_KEY = 0x7A11_0001
_FILE_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
_RECORD = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"


class MigrationError(RuntimeError):
    pass


def migrations_dir() -> Path:
    """``TALLY_MIGRATIONS_DIR``, or ``migrations/`` beside the packages (a source checkout or image)."""
    override = os.environ.get("TALLY_MIGRATIONS_DIR")
    return Path(override) if override else Path(__file__).resolve().parent.parent / "migrations"


def discover(directory: Path) -> list[tuple[int, str, str]]:
    """(version, file name, sql) for every migration file, in order."""
    found = []
    for path in sorted(directory.glob("*.sql")):
        match = _FILE_NAME.match(path.name)
        if match is None:
            raise MigrationError(f"{path.name}: migration files are named NNNN_lower_snake.sql")
        found.append((int(match.group(1)), path.name, path.read_text(encoding="utf-8")))
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise MigrationError(f"two migration files share a number in {directory}")
    return found


def checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


async def migrate(conn: asyncpg.Connection, directory: Path | None = None) -> list[str]:
    """Apply the pending migrations; returns the names applied by this call."""
    files = discover(directory or migrations_dir())
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(_CREATE_LEDGER)
        applied = {r["version"]: (r["name"], r["checksum"]) for r in await conn.fetch(_APPLIED)}
        for version, name, sql in files:
            if version in applied:
                if applied[version] != (name, checksum(sql)):
                    raise MigrationError(
                        f"{name} was edited after it was applied (recorded as {applied[version][0]} "
                        f"with checksum {applied[version][1][:12]}…); add a new migration instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(_RECORD, version, name, checksum(sql))
            log.info("applied %s", name)
            applied_now.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied_now
