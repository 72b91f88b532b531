"""``tally migrate``: brings a database to this release, atomically, under an advisory lock.

Three kinds of source, applied in this order in **one transaction** (a failure changes nothing):

1. **Numbered migrations**, ``migrations/NNNN_name.sql``: schema and data changes, each applied
   once, in order, recorded in ``schema_migrations`` with its checksum. An applied file whose
   checksum changed is refused: history, including the schema's, is not rewritten.
   ``0005_baseline.sql`` is the schema that the first five files built (their functions aside). A
   database that applied those five files is recognised by their recorded checksums (``HISTORY``)
   and is already at the baseline; a new one gets the baseline.
2. **Definitions**: every function, trigger function, trigger and type, one source file each,
   beside the Python that calls it (``commands/sql/*.sql``, ``projections/sql/*.sql``). They are
   repeatable (``CREATE OR REPLACE``), recorded in ``schema_definitions`` with their checksums, and
   applied, all of them, whenever any of them changed or a numbered migration ran. A function
   whose signature changes, or that goes away, is dropped by a numbered migration (as 0006 does).
3. **Flows** (domain/flows.py), written into ``flows``. A flow already there must be unchanged:
   stored transactions were checked against it.

Then, when ``TALLY_APP_ROLE`` is set, the **application role**: created if it is missing (a login
role, with ``TALLY_APP_PASSWORD`` when given), refused if it is privileged, and granted exactly what
``tally serve`` and ``tally projector`` need, afresh on every run (``_grant``): it reads every table,
writes only the read models and the projection checkpoints, and changes history only through the
command functions, which run as their owner (``SECURITY DEFINER``, with the search path pinned when
they are created). It cannot UPDATE, DELETE or TRUNCATE events or commands, ALTER them or disable
their triggers, or CREATE in the schema.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import logging
import os
import re
from pathlib import Path
from typing import Final

import asyncpg
import msgspec

from domain import FLOWS

log = logging.getLogger("tally.migrate")

# Any constant works; it only has to be the same in every process that migrates.
MIGRATION_LOCK_KEY: Final = 0x7A11_0001
_FILE_NAME: Final = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")

# The files 0005_baseline.sql replaces, as databases recorded them (name, sha-256 of the file).
# Copies of them: tests/data/historic/migrations (tests/integration/test_migrate_forward.py).
BASELINE: Final = "0005_baseline.sql"
HISTORY: Final = {
    1: ("0001_event_store.sql", "00709b45f1bdc0a2f77c9cd1d1c2f4d5ec4de6d5b6dca2c597944c46f9066d3f"),
    2: ("0002_read_models.sql", "c204d605fac1c43f22d4e5e802b20d76de81b4abbd8b6dc317573face597fdb7"),
    3: ("0003_projection_operations.sql", "074d11dca78d8b06d83c22a031b497ea9dc12d2f63049ff83c76e6d62cd449fd"),
    4: ("0004_group_commit.sql", "2d62d5ce1e05ccaf315b2b3325139e90ddf6ae0b8dee9b8027cb2d885020663b"),
    5: ("0005_wallet_completeness.sql", "b1694edf01aa314d650c7523532593ca39ebd521efab772f5c3c69e20ec486b0"),
}
# The packages whose ``sql/`` folders hold the definitions, in the order they are applied.
DEFINITION_PACKAGES: Final = ("commands", "projections")

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version    int PRIMARY KEY,
    name       text NOT NULL,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS schema_definitions (
    name       text PRIMARY KEY,
    checksum   text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""
_APPLIED = "SELECT version, name, checksum FROM schema_migrations ORDER BY version"
_RECORD = "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)"
_DEFINED = "SELECT name, checksum FROM schema_definitions"
_FORGET_DEFINITIONS = "DELETE FROM schema_definitions"
_RECORD_DEFINITIONS = (
    "INSERT INTO schema_definitions (name, checksum) SELECT * FROM unnest($1::text[], $2::text[])"
)
_FLOWS = "SELECT kind, event_type, system_account, user_sign FROM flows ORDER BY kind"
_ADD_FLOW = "INSERT INTO flows (kind, event_type, system_account, user_sign) VALUES ($1, $2, $3, $4)"


class MigrationError(RuntimeError):
    pass


_REBASE = "SELECT offset_before, offset_after FROM tally_rebase_writer_xids()"


class Migrated(msgspec.Struct, frozen=True, kw_only=True):
    """What one ``migrate`` call applied: numbered files, definition files, new flows, what became
    of the application role ("created", "granted" or "" when none was named), and the new offset of
    writer_xids when the database turned out restored from another cluster (else None)."""

    migrations: list[str]
    definitions: list[str]
    flows: list[str]
    app_role: str = ""
    xid_offset: int | None = None

    @property
    def nothing(self) -> bool:
        return not (self.migrations or self.definitions or self.flows or self.xid_offset is not None)


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


def definitions() -> list[tuple[str, str]]:
    """(name, sql) of every definition file, in the order they are applied: package by package,
    file name order within one (``check_function_bodies`` is off while they are applied, so
    functions may refer to functions defined later)."""
    found = []
    for package in DEFINITION_PACKAGES:
        folder = importlib.resources.files(package).joinpath("sql")
        for entry in sorted(folder.iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".sql"):
                found.append((f"{package}/sql/{entry.name}", entry.read_text(encoding="utf-8")))
    return found


def checksum(sql: str) -> str:
    return hashlib.sha256(sql.encode()).hexdigest()


def _at_baseline(applied: dict[int, tuple[str, str]], version: int) -> bool:
    """True when the database applied exactly the files the baseline replaces; MigrationError when
    it applied only some of them (it must first be migrated by a release that still has them)."""
    historic = {v: recorded for v, recorded in applied.items() if v <= version}
    if historic == HISTORY:
        return True
    if historic:
        raise MigrationError(
            f"this database stopped part-way through the migrations {BASELINE} replaces "
            f"(it recorded {sorted(historic)}): migrate it with a release from before the baseline first"
        )
    return False


async def _numbered(conn: asyncpg.Connection, directory: Path) -> list[str]:
    applied = {r["version"]: (r["name"], r["checksum"]) for r in await conn.fetch(_APPLIED)}
    applied_now = []
    for version, name, sql in discover(directory):
        if version in applied and applied[version] == (name, checksum(sql)):
            continue
        if name == BASELINE and applied.get(version, ("",))[0] != BASELINE and _at_baseline(applied, version):
            continue
        if version in applied:
            raise MigrationError(
                f"{name} was edited after it was applied (recorded as {applied[version][0]} "
                f"with checksum {applied[version][1][:12]}…); add a new migration instead"
            )
        await conn.execute(sql)
        await conn.execute(_RECORD, version, name, checksum(sql))
        log.info("applied %s", name)
        applied_now.append(name)
    return applied_now


async def _definitions(conn: asyncpg.Connection, force: bool) -> list[str]:
    files = definitions()
    recorded = {r["name"]: r["checksum"] for r in await conn.fetch(_DEFINED)}
    if not force and recorded == {name: checksum(sql) for name, sql in files}:
        return []
    await conn.execute("SET LOCAL check_function_bodies = off")
    # The command functions pin this search path (SET search_path FROM CURRENT): they run as their
    # owner, so no schema the caller controls (pg_temp included) may come before this one.
    await conn.execute("SELECT set_config('search_path', format('%I, pg_temp', current_schema()), true)")
    for name, sql in files:
        try:
            await conn.execute(sql)
        except asyncpg.PostgresError as exc:
            raise MigrationError(f"{name}: {exc}") from exc
    await conn.execute(_FORGET_DEFINITIONS)
    await conn.execute(_RECORD_DEFINITIONS, [n for n, _ in files], [checksum(s) for _, s in files])
    changed = [name for name, sql in files if recorded.get(name) != checksum(sql)]
    log.info("applied %d definitions (%d changed)", len(files), len(changed))
    return changed


async def _flows(conn: asyncpg.Connection) -> list[str]:
    stored = {r["kind"]: tuple(r) for r in await conn.fetch(_FLOWS)}
    wanted = {f.kind: (f.kind, f.event_type, str(f.system_account), f.user_sign) for f in FLOWS}
    changed = sorted(k for k in stored.keys() & wanted.keys() if stored[k] != wanted[k])
    missing = sorted(stored.keys() - wanted.keys())
    if changed or missing:
        raise MigrationError(
            f"flows {changed + missing} differ between the database and domain/flows.py; a written flow "
            "never changes (stored transactions were checked against it): add a new kind instead"
        )
    added = sorted(wanted.keys() - stored.keys())
    for kind in added:
        await conn.execute(_ADD_FLOW, *wanted[kind])
    return added


_CLOSE_FUNCTIONS: Final = (
    "SELECT format('REVOKE EXECUTE ON ALL FUNCTIONS IN SCHEMA %I FROM PUBLIC', current_schema())"
)

# What the application role may write besides calling the command functions: the read models,
# the projections' checkpoints (the projector runs as it) and the webhooks' tables. Everything
# else it may only read.
_APP_WRITES: Final = (
    "rm_assets", "rm_wallets", "rm_balances", "rm_holds", "rm_transactions", "rm_history_wallets",
    "rm_system_balances", "projection_checkpoints",
    # Webhooks: subscriptions (the API) and their deliveries (the dispatcher); not history.
    "webhooks", "webhook_secrets", "webhook_deliveries", "webhook_replays",
)  # fmt: skip


async def _grant(conn: asyncpg.Connection, role: str, password: str | None) -> str:
    """Create ``role`` if missing, refuse it if privileged, and grant it what the API and the
    projector need (and nothing else: earlier grants are revoked first)."""
    current = await conn.fetchval("SELECT current_user")
    if role == current:
        raise MigrationError(f"TALLY_APP_ROLE={role} is the role migrating (the schema owner): name another")
    attrs = await conn.fetchrow(
        "SELECT rolsuper OR rolcreaterole OR rolcreatedb OR rolbypassrls OR rolreplication "
        "       OR EXISTS (SELECT 1 FROM pg_auth_members m WHERE m.member = r.oid) AS privileged "
        "FROM pg_roles r WHERE rolname = $1",
        role,
    )
    if attrs is None:
        statement = "CREATE ROLE %I LOGIN" + (" PASSWORD %L" if password else "")
        outcome = "created"
    else:
        if attrs["privileged"]:
            raise MigrationError(f"role {role} is privileged (superuser, CREATEROLE, CREATEDB, BYPASSRLS, "
                                 "REPLICATION, or a member of another role): the application role must "
                                 "not be")  # fmt: skip
        statement = "ALTER ROLE %I LOGIN" + (" PASSWORD %L" if password else "")
        outcome = "granted"
    try:
        await conn.execute(
            await conn.fetchval("SELECT format($1, $2::text, $3::text)", statement, role, password)
        )
    except asyncpg.InsufficientPrivilegeError as exc:
        raise MigrationError(
            f"cannot create or alter role {role} ({exc}): create it yourself (CREATE ROLE {role} LOGIN "
            "PASSWORD '...'), then run tally migrate again"
        ) from exc
    owned = await conn.fetchval(
        "SELECT count(*) FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE r.rolname = $1", role
    )
    if owned:
        raise MigrationError(f"role {role} owns {owned} relations in this database: it must own none")
    grants = f"""
        GRANT CONNECT ON DATABASE {{db}} TO {{role}};
        REVOKE CREATE ON SCHEMA {{schema}} FROM PUBLIC;
        REVOKE ALL ON SCHEMA {{schema}} FROM {{role}};
        GRANT USAGE ON SCHEMA {{schema}} TO {{role}};
        REVOKE ALL ON ALL TABLES IN SCHEMA {{schema}} FROM {{role}};
        REVOKE ALL ON ALL SEQUENCES IN SCHEMA {{schema}} FROM {{role}};
        GRANT SELECT ON ALL TABLES IN SCHEMA {{schema}} TO {{role}};
        GRANT INSERT, UPDATE, DELETE ON {", ".join(_APP_WRITES)} TO {{role}};
        GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA {{schema}} TO {{role}};
    """
    names = await conn.fetchrow(
        "SELECT quote_ident(current_database()) AS db, quote_ident(current_schema()) AS schema, "
        "quote_ident($1) AS role",
        role,
    )
    assert names is not None
    await conn.execute(grants.format(db=names["db"], schema=names["schema"], role=names["role"]))
    return outcome


async def migrate(
    conn: asyncpg.Connection,
    directory: Path | None = None,
    *,
    app_role: str | None = None,
    app_password: str | None = None,
) -> Migrated:
    """Apply what is pending: numbered migrations, definitions, flows, and the application role's
    grants when one is named; all or nothing."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        async with conn.transaction():
            await conn.execute(_CREATE_LEDGER)
            applied = await _numbered(conn, directory or migrations_dir())
            defined = await _definitions(conn, force=bool(applied))
            flows = await _flows(conn)
            # The command functions run as their owner: nobody may call them unless granted (the
            # application role, below). Every run, so a function made again is closed again.
            await conn.execute(await conn.fetchval(_CLOSE_FUNCTIONS))
            role = await _grant(conn, app_role, app_password) if app_role else ""
            # A database restored from another cluster: its events' writer_xids get ahead of this
            # cluster's ids again before anything is written (commands/sql/tally_writer_xid.sql).
            rebased = await conn.fetchrow(_REBASE)
            assert rebased is not None
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    offset = rebased["offset_after"] if rebased["offset_after"] != rebased["offset_before"] else None
    return Migrated(migrations=applied, definitions=defined, flows=flows, app_role=role, xid_offset=offset)
