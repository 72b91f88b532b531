"""The SQL that decides and projects has one source: every function, trigger and type in the
database comes from exactly one file of commands/sql or projections/sql, and `tally migrate` keeps
the database equal to those files."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter

import asyncpg
import pytest

from api.migrate import MigrationError, definitions, migrate, migrations_dir
from domain import FLOWS, MAX_AMOUNT, RECORDED_OUTCOMES
from tests.helpers import TEST_CLIENT_ID
from tests.model import legs

_LEGS = """SELECT tally_legs(f, 'ann', $2)::text AS legs, event_type, user_sign * $2 AS user_delta
             FROM flows f WHERE kind = $1"""
_CREATED = re.compile(r"^CREATE (?:OR REPLACE )?(FUNCTION|TRIGGER|TYPE) (\w+)", re.MULTILINE | re.IGNORECASE)


def _defined() -> Counter[tuple[str, str]]:
    """(kind, name) of every object the definition files create, with how many times."""
    return Counter((kind.upper(), name) for _, sql in definitions() for kind, name in _CREATED.findall(sql))


def test_every_object_is_created_by_one_file_once() -> None:
    created = _defined()
    assert created, "no definitions found"
    assert [obj for obj, times in created.items() if times > 1] == []
    for name, sql in definitions():
        file_stem = name.rsplit("/", 1)[1].removesuffix(".sql")
        assert ("FUNCTION", file_stem) in {(k.upper(), n) for k, n in _CREATED.findall(sql)}, (
            f"{name} does not define the function it is named after"
        )


def test_numbered_migrations_hold_no_function_trigger_or_type() -> None:
    for path in sorted(migrations_dir().glob("*.sql")):
        assert _CREATED.findall(path.read_text()) == [], path.name


async def test_the_database_has_exactly_the_defined_objects(pool: asyncpg.Pool) -> None:
    functions = Counter(
        r["proname"]
        for r in await pool.fetch("SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace")
    )
    assert [name for name, times in functions.items() if times > 1] == []  # no stale overload left behind
    triggers = {r["tgname"] for r in await pool.fetch("SELECT tgname FROM pg_trigger WHERE NOT tgisinternal")}
    types = {
        r["typname"]
        for r in await pool.fetch(
            """SELECT t.typname FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid
                WHERE t.typnamespace = 'public'::regnamespace AND c.relkind = 'c'"""
        )
    }
    found = (
        {("FUNCTION", n) for n in functions}
        | {("TRIGGER", n) for n in triggers}
        | {("TYPE", n) for n in types}
    )
    assert found == set(_defined())


async def test_a_changed_definition_is_applied_again(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        # As if an older release had defined it otherwise.
        await conn.execute(
            """CREATE OR REPLACE FUNCTION tally_genesis_hash() RETURNS bytea LANGUAGE sql
                   AS $$ SELECT '\\x01'::bytea $$;
               UPDATE schema_definitions SET checksum = 'older'
                WHERE name = 'commands/sql/tally_genesis_hash.sql'"""
        )
        done = await migrate(conn)
        assert done.definitions == ["commands/sql/tally_genesis_hash.sql"]
        assert await conn.fetchval("SELECT tally_genesis_hash()") == bytes(32)
        assert (await migrate(conn)).nothing
    finally:
        await conn.close()


async def test_a_written_flow_never_changes(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        # A database whose spend flow says otherwise than domain/flows.py (triggers off: the owner
        # tampering, the flows table refuses updates otherwise).
        async with conn.transaction():
            await conn.execute("ALTER TABLE flows DISABLE TRIGGER flows_append_only")
            await conn.execute("UPDATE flows SET system_account = 'bonus' WHERE kind = 'spend'")
            await conn.execute("ALTER TABLE flows ENABLE TRIGGER flows_append_only")
        with pytest.raises(MigrationError, match=r"\['spend'\]"):
            await migrate(conn)
        with pytest.raises(asyncpg.RestrictViolationError):
            await conn.execute("UPDATE flows SET system_account = 'revenue' WHERE kind = 'spend'")
    finally:
        await conn.close()


async def test_the_sql_computes_each_flows_legs(pool: asyncpg.Pool) -> None:
    """tally_legs, the one computation of legs the decider and verify use, from the flows table that
    migrate wrote from domain/flows.py: balanced, closed-loop, the flow's accounts."""
    for flow in FLOWS:
        for amount in (1, 7, MAX_AMOUNT):
            row = await pool.fetchrow(_LEGS, flow.kind, amount)
            assert row is not None
            assert json.loads(row["legs"]) == legs(flow.kind, "ann", amount)
            assert (row["event_type"], row["user_delta"]) == (flow.event_type, flow.user_sign * amount)
            assert sum(leg["amount"] for leg in json.loads(row["legs"])) == 0


async def test_a_command_row_holds_only_an_outcome_commands_record(pool: asyncpg.Pool) -> None:
    constraint = await pool.fetchval(
        "SELECT pg_get_constraintdef(oid) FROM pg_constraint WHERE conname = 'commands_outcome_recorded'"
    )
    assert sorted(re.findall(r"'(\w+)'", constraint)) == sorted(RECORDED_OUTCOMES)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "INSERT INTO commands (client_id, command_id, fingerprint, metadata, outcome, response) "
            "VALUES ($1, 'k', '\\x00', '{}', 'wallet_not_found', '{}')",
            uuid.UUID(TEST_CLIENT_ID),
        )
