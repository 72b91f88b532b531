"""Health, metrics and logs, as an operator sees them."""

from __future__ import annotations

import io
import json
import logging
import re

import asyncpg
import pytest
from litestar.testing import AsyncTestClient

from api.observability import REQUEST_ID, ConsoleFormatter, JsonFormatter

Client = AsyncTestClient  # type: ignore[type-arg]


async def _post(client: Client, path: str, body: dict[str, object], key: str) -> dict[str, object]:
    response = await client.post(path, json=body, headers={"Idempotency-Key": key})
    assert response.status_code in (201, 409), response.text
    result: dict[str, object] = response.json()
    return result


async def _ledger(client: Client) -> str:
    await _post(client, "/v1/assets", {"code": "GOLD", "name": "Gold", "decimals": 0}, "a")
    await _post(client, "/v1/wallets", {"user_id": "ann"}, "w")
    await _post(client, "/v1/wallets/ann/top-ups", {"asset": "GOLD", "amount": 10}, "t")
    spent = await _post(client, "/v1/wallets/ann/spends", {"asset": "GOLD", "amount": 4}, "s")
    await _post(client, "/v1/wallets/ann/spends", {"asset": "GOLD", "amount": 4}, "s")  # replayed
    await _post(client, "/v1/wallets/ann/spends", {"asset": "GOLD", "amount": 99}, "poor")  # refused
    return str(spent["consistency_token"])


async def test_liveness_and_readiness(client: Client) -> None:
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    token = await _ledger(client)
    await client.get("/v1/system/balances", params={"consistent_with": token})
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert set(body["checks"]) == {
        "commands",
        "projection:wallets",
        "projection:history",
        "projection:system",
    }


async def test_a_stopped_projection_is_reported_and_leaves_the_process_in_rotation(
    client: Client, db_url: str
) -> None:
    """A read-side fault must not take writes out of rotation (the platform routes, and restarts,
    on /health/ready): the check stays 200 and names the stopped projection."""
    await _ledger(client)
    conn = await asyncpg.connect(db_url)
    try:
        await conn.execute(
            "UPDATE projection_checkpoints SET error = 'poison', error_position = 7, stopped_at = now() "
            "WHERE name = 'history'"
        )
    finally:
        await conn.close()
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["projection:history"]["status"] == "failing"
    assert "position 7" in checks["projection:history"]["detail"]
    assert checks["commands"]["status"] == "ok"
    spent = await client.post(
        "/v1/wallets/ann/spends", json={"asset": "GOLD", "amount": 1}, headers={"Idempotency-Key": "after"}
    )
    assert spent.status_code == 201
    metrics = (await client.get("/metrics")).text
    assert 'tally_projection_stopped{projection="history"} 1.0' in metrics


async def test_metrics_count_requests_by_route_and_commands_by_outcome(client: Client) -> None:
    before = _samples((await client.get("/metrics")).text)
    await _ledger(client)
    after = _samples((await client.get("/metrics")).text)

    def grew(name: str, **labels: str) -> float:
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert grew("tally_commands_total", kind="spend", outcome="accepted") == 1
    assert grew("tally_commands_total", kind="spend", outcome="replayed") == 1
    assert grew("tally_commands_total", kind="spend", outcome="insufficient_funds") == 1
    assert grew("tally_commands_total", kind="top_up", outcome="accepted") == 1
    route = {"app_name": "tally", "method": "POST", "path": "/v1/wallets/{user_id}/spends"}
    assert grew("tally_requests_total", **route, status_code="201") == 2
    assert grew("tally_requests_total", **route, status_code="409") == 1
    lag_gauge = ("tally_projection_lag_seconds", (("projection", "wallets"),))
    assert lag_gauge in after  # exported for every projection
    assert after[("tally_db_pool_connections", (("state", "max"),))] > 0


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match is None or line.startswith("#"):
            continue
        labels = tuple(sorted(re.findall(r'(\w+)="([^"]*)"', match.group(2) or "")))
        found[(match.group(1), labels)] = float(match.group(3))
    return found


async def test_the_request_id_is_echoed_or_made(client: Client) -> None:
    given = await client.get("/health/live", headers={"X-Request-ID": "req-123"})
    assert given.headers["x-request-id"] == "req-123"
    made = await client.get("/health/live")
    assert re.fullmatch(r"[0-9a-f]{32}", made.headers["x-request-id"])
    unsafe = await client.get("/health/live", headers={"X-Request-ID": "bad id with spaces"})
    assert unsafe.headers["x-request-id"] != "bad id with spaces"


async def test_each_command_logs_its_key_outcome_and_transaction(
    client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tally.commands")
    await _ledger(client)
    records = [r for r in caplog.records if r.name == "tally.commands"]
    spent = next(r for r in records if getattr(r, "idempotency_key", None) == "s")
    assert (spent.kind, spent.outcome) == ("spend", "accepted")  # type: ignore[attr-defined]
    assert re.fullmatch(r"[0-9a-f-]{36}", spent.transaction_id)  # type: ignore[attr-defined]
    refused = next(r for r in records if getattr(r, "idempotency_key", None) == "poor")
    assert (refused.outcome, refused.code) == ("insufficient_funds", "insufficient_funds")  # type: ignore[attr-defined]


def test_json_lines_carry_the_request_id_and_extra_fields() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("tally.test.json")
    logger.addHandler(handler)
    logger.propagate = False
    token = REQUEST_ID.set("req-9")
    try:
        logger.warning("command %s", "spend", extra={"idempotency_key": "k", "transaction_id": "t"})
    finally:
        REQUEST_ID.reset(token)
        logger.removeHandler(handler)
    line = stream.getvalue().strip()
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["message"] == "command spend"
    assert (entry["level"], entry["request_id"], entry["idempotency_key"], entry["transaction_id"]) == (
        "warning", "req-9", "k", "t",
    )  # fmt: skip
    human = ConsoleFormatter().format(
        logging.makeLogRecord({"msg": "hello", "levelname": "INFO", "name": "x"})
    )
    assert human.endswith("x: hello")
