"""How ``ledger.json`` was made: kept for provenance, not run by the suite.

It ran once, from a checkout of commit 9e7888b (the last commit before the write model moved to
``commands/sql`` and ``projections/sql``), with that checkout's own code and virtualenv:

    cd <checkout of 9e7888b> && .venv/bin/python <this file> <output.json>

It drives that release's HTTP API (its own ``create_app``, in-process) against a fresh database
migrated by that release's migrations (copied byte for byte to ``migrations/`` here), sends a set of
commands covering every stored outcome, sends each one again, and records:

* ``requests``: each request exactly as sent, and the exact answer its *retry* got (status, the
  headers a caller keys on, body bytes): what any later release must keep answering, byte for byte;
* ``reads``: the GET answers of that release for each wallet, history and transaction;
* ``tables``: every row of ``streams``, ``events`` and ``commands`` (the write side), from which
  tests/integration/test_migrate_forward.py rebuilds that database and migrates it forward.

Imports below are that release's modules; they do not exist in this tree any more.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg
from litestar.testing import AsyncTestClient

from api.app import create_app  # type: ignore[import-not-found, unused-ignore]
from api.database import embedded_server  # type: ignore[import-not-found, unused-ignore]
from api.migrate import migrate  # type: ignore[import-not-found, unused-ignore]
from api.settings import Settings  # type: ignore[import-not-found, unused-ignore]

J = {"content-type": "application/json"}
# (method, path, headers, body): every kind of stored outcome, in an order that produces them.
SCENARIO: list[tuple[str, dict[str, str], dict[str, Any]]] = [
    ("/v1/assets", {"idempotency-key": "asset-gold"}, {"code": "GOLD", "name": "Gold coins", "decimals": 0}),
    ("/v1/assets", {"idempotency-key": "asset-gems"}, {"code": "GEMS", "name": "Gems", "decimals": 2}),
    ("/v1/assets", {"idempotency-key": "asset-gold-again"}, {"code": "GOLD", "name": "Gold", "decimals": 0}),
    ("/v1/wallets", {"idempotency-key": "open-ann"}, {"user_id": "ann", "metadata": {"tier": "gold"}}),
    ("/v1/wallets", {"idempotency-key": "open-ben"}, {"user_id": "ben"}),
    ("/v1/wallets", {"idempotency-key": "open-ann-again"}, {"user_id": "ann"}),
    ("/v1/wallets/ann/top-ups", {"idempotency-key": "pay-1"},
     {"asset": "GOLD", "amount": 1000, "reference": "psp-1", "metadata": {"b": "2", "a": "1"}}),
    ("/v1/wallets/ann/bonuses", {"idempotency-key": "welcome-ann"},
     {"asset": "GEMS", "amount": 250, "reference": "welcome"}),
    ("/v1/wallets/ann/spends", {"idempotency-key": "order-1", "if-match": '"3"'},
     {"asset": "GOLD", "amount": 300, "reference": "order-1", "metadata": {"sku": "sword"}}),
    ("/v1/wallets/ann/spends", {"idempotency-key": "order-2"}, {"asset": "GOLD", "amount": 701}),
    ("/v1/wallets/ann/spends", {"idempotency-key": "order-3", "if-match": '"2"'},
     {"asset": "GOLD", "amount": 1}),
    ("/v1/wallets/ben/top-ups", {"idempotency-key": "pay-2"}, {"asset": "GOLD", "amount": 10**15}),
    ("/v1/wallets/ben/spends", {"idempotency-key": "order-4"}, {"asset": "GOLD", "amount": 10**15 - 1}),
    ("/v1/wallets/ben/bonuses", {"idempotency-key": "gift-ben", "if-match": "5"},
     {"asset": "GEMS", "amount": 5}),
    ("/v1/wallets/ben/bonuses", {"idempotency-key": "gift-ben-2", "if-match": "3"},
     {"asset": "GEMS", "amount": 5}),
]  # fmt: skip


def _answer(response: Any) -> dict[str, Any]:
    return {
        "status": response.status_code,
        "content_type": response.headers.get("content-type"),
        "idempotent_replayed": response.headers.get("idempotent-replayed"),
        "etag": response.headers.get("etag"),
        "body": base64.b64encode(response.content).decode(),
    }


async def _dump(url: str) -> dict[str, list[dict[str, Any]]]:
    conn = await asyncpg.connect(url)
    try:
        tables = {}
        for table, order in (
            ("streams", "stream_id"),
            ("events", "global_position"),
            ("commands", "command_id"),
        ):
            rows = await conn.fetchval(
                f"SELECT coalesce(json_agg(t ORDER BY {order}), '[]')::text FROM {table} t"
            )
            tables[table] = json.loads(rows)
        return tables
    finally:
        await conn.close()


async def main() -> dict[str, Any]:
    with embedded_server(Path(".data") / "historic-fixture-pg") as server:
        admin = await asyncpg.connect(server.get_uri("postgres"))
        name = f"historic_{uuid.uuid4().hex[:8]}"
        await admin.execute(f'CREATE DATABASE "{name}"')
        url = server.get_uri(name)
        conn = await asyncpg.connect(url)
        await migrate(conn)
        await conn.close()
        requests = []
        reads = {}
        settings = Settings(database_url=url, consistency_timeout=10.0, projector_poll_interval=0.1)
        async with AsyncTestClient(create_app(settings, run_projector=True)) as client:
            token = None
            for path, headers, body in SCENARIO:
                raw = json.dumps(body).encode()
                first = await client.post(path, content=raw, headers={**J, **headers})
                again = await client.post(path, content=raw, headers={**J, **headers})
                if first.status_code == 201:
                    token = first.json()["consistency_token"]
                requests.append({
                    "method": "POST", "path": path, "headers": {**J, **headers},
                    "body": base64.b64encode(raw).decode(),
                    "first_status": first.status_code, "replay": _answer(again),
                })  # fmt: skip
            for user in ("ann", "ben"):
                reads[f"/v1/wallets/{user}"] = _answer(
                    await client.get(f"/v1/wallets/{user}", params={"consistent_with": token})
                )
                history = f"/v1/wallets/{user}/transactions"
                reads[history] = _answer(await client.get(history, params={"consistent_with": token}))
            for tx in json.loads((await client.get("/v1/wallets/ann/transactions")).content)["items"]:
                path = f"/v1/transactions/{tx['transaction_id']}"
                reads[path] = _answer(await client.get(path))
            reads["/v1/system/balances"] = _answer(await client.get("/v1/system/balances"))
            reads["/v1/assets"] = _answer(await client.get("/v1/assets"))
        document = {"requests": requests, "reads": reads, "tables": await _dump(url)}
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        await admin.close()
    return document


if __name__ == "__main__":
    Path(sys.argv[1]).write_text(json.dumps(asyncio.run(main()), indent=1, sort_keys=True) + "\n")
