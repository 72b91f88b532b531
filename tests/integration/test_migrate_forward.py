"""A database built by the first five migrations, with data, migrates forward and keeps every
promise: nothing lost, every balance verified, every stored answer replayed byte for byte.

The data is tests/data/historic/ledger.json: the write side of a ledger that the release before the
baseline (commit 9e7888b) built through its own HTTP API, with the exact answers that release gave
to each request's retry and to the reads (tests/data/historic/generate.py says how it was made).
The five migration files of that release are in tests/data/historic/migrations, byte for byte."""

from __future__ import annotations

import base64
import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from api.app import create_app
from api.keys import adopt_earlier_keys, create_client
from api.migrate import HISTORY, MigrationError, migrate
from api.settings import Settings
from projections.verify import verify
from tests.conftest import with_database
from tests.helpers import TEST_CLIENT, add_test_client, api_client

HISTORIC = Path(__file__).resolve().parent.parent / "data" / "historic"
LEDGER = json.loads((HISTORIC / "ledger.json").read_text())

# What `tally migrate` did before the baseline: each file in its own transaction, then its row.
_OLD_LEDGER = """CREATE TABLE IF NOT EXISTS schema_migrations (
    version int PRIMARY KEY, name text NOT NULL, checksum text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now())"""
_LOAD = """
INSERT INTO streams SELECT * FROM json_populate_recordset(NULL::streams, $1::json);
INSERT INTO events (global_position, stream_id, stream_version, event_id, event_type, data, metadata, hash,
                    recorded_at) OVERRIDING SYSTEM VALUE
SELECT global_position, stream_id, stream_version, event_id, event_type, data, metadata, hash, recorded_at
  FROM json_populate_recordset(NULL::events, $2::json);
INSERT INTO commands SELECT * FROM json_populate_recordset(NULL::commands, $3::json);
SELECT setval(pg_get_serial_sequence('events', 'global_position'), (SELECT max(global_position) FROM events));
"""


async def _apply_history(conn: asyncpg.Connection, upto: int = 5) -> None:
    await conn.execute(_OLD_LEDGER)
    for path in sorted((HISTORIC / "migrations").glob("*.sql"))[:upto]:
        sql = path.read_text()
        async with conn.transaction():
            await conn.execute(sql)
            await conn.execute(
                "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                int(path.name[:4]), path.name, hashlib.sha256(sql.encode()).hexdigest(),
            )  # fmt: skip


async def _load_historic_ledger(conn: asyncpg.Connection) -> None:
    """The fixture's rows, written as that release wrote them (its triggers on), then projected by
    that release's own projection functions."""
    tables = LEDGER["tables"]
    # Not through asyncpg's extended protocol: several statements, so the values go in literally.
    async with conn.transaction():
        await conn.execute(
            _LOAD.replace("$1::json", _literal(tables["streams"]))
            .replace("$2::json", _literal(tables["events"]))
            .replace("$3::json", _literal(tables["commands"]))
        )
    for _ in range(100):
        applied = [
            await conn.fetchval(f"SELECT applied FROM tally_project_{name}(1000)")
            for name in ("wallets", "history", "system")
        ]
        if await conn.fetchval("SELECT min(events_applied) FROM projection_checkpoints") == len(
            tables["events"]
        ):
            return
        assert applied is not None
    raise AssertionError("the historic projections did not catch up")


def _literal(rows: list[dict[str, Any]]) -> str:
    return "'" + json.dumps(rows).replace("'", "''") + "'::json"


def _decoded(answer: dict[str, Any]) -> Any:
    return json.loads(base64.b64decode(answer["body"]))


def _as_answered(new: Any, old: Any) -> Any:
    """``new`` with only the fields ``old`` has (objects) and list items paired in order: a later
    release may add fields to an answer (balances gained held and available; a transaction read by
    id, reversed_amount and reversals), never change or drop one."""
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _as_answered(v, old[k]) for k, v in new.items() if k in old}
    if isinstance(new, list) and isinstance(old, list) and len(new) == len(old):
        return [_as_answered(n, o) for n, o in zip(new, old, strict=True)]
    return new


def _without_tokens(value: Any) -> Any:
    """A read's body without the consistency tokens the read models hold: they name the writing
    transaction's id, which differs in this rebuilt database."""
    if isinstance(value, dict):
        return {k: _without_tokens(v) for k, v in value.items() if k != "consistency_token"}
    if isinstance(value, list):
        return [_without_tokens(v) for v in value]
    return value


async def test_a_database_built_by_the_first_five_migrations_migrates_forward(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await _apply_history(conn)
        await _load_historic_ledger(conn)
        before = {r["command_id"]: (r["status"], r["response"]) for r in await conn.fetch(
            "SELECT command_id, status, response::text AS response FROM commands")}  # fmt: skip

        migrated = await migrate(conn)
        assert migrated.migrations == [
            "0006_typed_events_domain_outcomes.sql",
            "0007_clients.sql",
            "0008_bounded_reads.sql",
            "0009_reversals_and_holds.sql",
            "0010_batches.sql",
            "0011_stream_order.sql",
            "0012_webhooks.sql",
        ]
        assert migrated.flows == ["bonus", "spend", "top_up"]

        # Every stored outcome is a domain outcome now; every stored response is untouched.
        after = {r["command_id"]: (r["outcome"], r["response"]) for r in await conn.fetch(
            "SELECT command_id, outcome, response::text AS response FROM commands")}  # fmt: skip
        assert after.keys() == before.keys()
        for key, (status, response) in before.items():
            outcome = "accepted" if status == 201 else json.loads(response)["code"]
            assert after[key] == (outcome, response), key
        assert {o for o, _ in after.values()} == {
            "accepted", "asset_exists", "wallet_exists", "insufficient_funds", "version_mismatch",
        }  # fmt: skip
        report = await verify(conn)
        assert report.ok, report.findings
        assert report.events == len(LEDGER["tables"]["events"])
        # The keys recorded before callers had identities: given to the one client that sent them
        # (the test's), whose retries replay them; no other client's keys meet them.
        await add_test_client(conn)
        assert await adopt_earlier_keys(conn, TEST_CLIENT) == len(before)
        other = (await create_client(conn, "other", ["admin"])).secret
    finally:
        await conn.close()

    settings = Settings(database_url=db_url, consistency_timeout=10.0, projector_poll_interval=0.1)
    async with api_client(create_app(settings, run_projector=True)) as client:
        first = LEDGER["requests"][0]
        assert first["path"] == "/v1/assets"
        elsewhere = await client.post(
            first["path"], content=base64.b64decode(first["body"]),
            headers={**first["headers"], "Authorization": f"Bearer {other}"},
        )  # fmt: skip
        assert elsewhere.status_code == 409  # its own new command: the asset exists (nothing changes)
        assert "idempotent-replayed" not in elsewhere.headers
        # Every retry gets, byte for byte, the answer the earlier release gave it.
        for request in LEDGER["requests"]:
            response = await client.post(
                request["path"], content=base64.b64decode(request["body"]), headers=request["headers"]
            )
            replay = request["replay"]
            assert (response.status_code, response.headers.get("content-type")) == (
                replay["status"], replay["content_type"],
            ), request  # fmt: skip
            assert response.headers.get("idempotent-replayed") == replay["idempotent_replayed"] == "true"
            assert response.content == base64.b64decode(replay["body"]), request["path"]
        # The read models that release built still answer as it did.
        for path, answer in LEDGER["reads"].items():
            response = await client.get(path)
            assert (response.status_code, response.headers.get("etag")) == (answer["status"], answer["etag"])
            old = _without_tokens(_decoded(answer))
            assert _as_answered(_without_tokens(response.json()), old) == old, path
        # And the ledger goes on: a new spend continues ann's stream, its hash chain and her history.
        spent = await client.post(
            "/v1/wallets/ann/spends",
            json={"asset": "GOLD", "amount": 100},
            headers={"Idempotency-Key": "new-1"},
        )
        assert spent.status_code == 201, spent.text
        assert (spent.json()["wallet_version"], spent.json()["balance_after"]) == (5, 600)
        token = spent.json()["consistency_token"]
        history = await client.get("/v1/wallets/ann/transactions", params={"consistent_with": token})
        assert [t["wallet_version"] for t in history.json()["items"]] == [5, 4, 3, 2]
    conn = await asyncpg.connect(db_url)
    try:
        report = await verify(conn)
        assert report.ok, report.findings
    finally:
        await conn.close()


_CATALOG = {
    "columns": """SELECT table_name, ordinal_position, column_name, data_type, is_nullable,
                         coalesce(column_default, ''), is_identity
                    FROM information_schema.columns WHERE table_schema = 'public'""",
    "constraints": """SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid)
                        FROM pg_constraint WHERE connamespace = 'public'::regnamespace""",
    "indexes": "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public'",
    "functions": """SELECT proname, pg_get_function_identity_arguments(oid), pg_get_functiondef(oid)
                      FROM pg_proc WHERE pronamespace = 'public'::regnamespace""",
    "triggers": """SELECT tgrelid::regclass::text, tgname, pg_get_triggerdef(oid, true)
                     FROM pg_trigger WHERE NOT tgisinternal""",
    "types": """SELECT t.typname, a.attnum, a.attname, format_type(a.atttypid, a.atttypmod)
                  FROM pg_type t JOIN pg_class c ON c.oid = t.typrelid
                  JOIN pg_attribute a ON a.attrelid = c.oid
                 WHERE t.typnamespace = 'public'::regnamespace AND c.relkind = 'c'""",
    "projections": "SELECT name, generation FROM projection_checkpoints",
    "flows": "SELECT kind, event_type, system_account, user_sign FROM flows",
    "migrations": "SELECT version FROM schema_migrations WHERE version > 5",
    "definitions": "SELECT name, checksum FROM schema_definitions",
}


async def _catalog(url: str) -> dict[str, list[tuple[Any, ...]]]:
    conn = await asyncpg.connect(url)
    try:
        return {name: sorted(tuple(r) for r in await conn.fetch(sql)) for name, sql in _CATALOG.items()}
    finally:
        await conn.close()


async def test_the_baseline_builds_what_the_history_built(db_url: str, admin_url: str) -> None:
    """A new database (the baseline, then 0006 on) and an old one migrated forward end with the same
    tables, columns, constraints, indexes, functions, triggers, types and reference data."""
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await _apply_history(conn)
        await migrate(conn)
        history = await conn.fetch("SELECT version, name, checksum FROM schema_migrations WHERE version <= 5")
        assert {r["version"]: (r["name"], r["checksum"]) for r in history} == HISTORY
    finally:
        await conn.close()
    fresh_name = f"tally_test_fresh_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(admin_url)
    try:
        await admin.execute(f'CREATE DATABASE "{fresh_name}"')
        fresh_url = with_database(admin_url, fresh_name)
        fresh = await asyncpg.connect(fresh_url)
        try:
            done = await migrate(fresh)
            assert done.migrations == [
                "0005_baseline.sql", "0006_typed_events_domain_outcomes.sql", "0007_clients.sql",
                "0008_bounded_reads.sql", "0009_reversals_and_holds.sql", "0010_batches.sql",
                "0011_stream_order.sql", "0012_webhooks.sql",
            ]  # fmt: skip
        finally:
            await fresh.close()
        old, new = await _catalog(db_url), await _catalog(fresh_url)
        for part in _CATALOG:
            assert old[part] == new[part], part
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{fresh_name}" WITH (FORCE)')
        await admin.close()


async def test_a_database_part_way_through_the_history_is_refused(db_url: str) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        await _apply_history(conn, upto=3)
        with pytest.raises(MigrationError, match="part-way"):
            await migrate(conn)
        assert await conn.fetchval("SELECT max(version) FROM schema_migrations") == 3  # nothing changed
    finally:
        await conn.close()
