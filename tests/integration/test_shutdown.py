"""SIGTERM mid-load: the server stops accepting, finishes what is in flight, and exits; every
acknowledged command is applied and none is half-applied."""

from __future__ import annotations

import asyncio
import signal
import uuid

import asyncpg
import httpx

from projections.verify import verify
from tests.conftest import LiveServer
from tests.helpers import AUTH

CLIENTS = 32
ACKNOWLEDGED_BEFORE_SIGTERM = 200
MAX_REQUESTS_PER_CLIENT = 500


async def test_sigterm_mid_load_applies_every_acknowledged_command(
    live_server: LiveServer, pool: asyncpg.Pool
) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, timeout=30, headers=AUTH) as http:

        async def post(path: str, body: dict[str, object]) -> httpx.Response:
            return await http.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})

        assert (await post("/v1/assets", {"code": "GOLD", "name": "Gold", "decimals": 0})).status_code == 201
        for i in range(CLIENTS):
            assert (await post("/v1/wallets", {"user_id": f"u{i}"})).status_code == 201
            assert (
                await post(f"/v1/wallets/u{i}/top-ups", {"asset": "GOLD", "amount": 10**9})
            ).status_code == 201

    acknowledged: dict[str, str] = {}  # idempotency key -> transaction id
    unanswered: list[str] = []
    enough = asyncio.Event()

    async def client(i: int) -> None:
        # One connection per client, as a calling service would keep.
        async with httpx.AsyncClient(base_url=live_server.url, timeout=30, headers=AUTH) as http:
            for _ in range(MAX_REQUESTS_PER_CLIENT):
                key = uuid.uuid4().hex
                try:
                    response = await http.post(
                        f"/v1/wallets/u{i}/spends", json={"asset": "GOLD", "amount": 1},
                        headers={"Idempotency-Key": key},
                    )  # fmt: skip
                except httpx.TransportError:
                    unanswered.append(key)
                    return  # the server has stopped accepting
                assert response.status_code == 201, response.text
                acknowledged[key] = response.json()["transaction_id"]
                if len(acknowledged) >= ACKNOWLEDGED_BEFORE_SIGTERM:
                    enough.set()

    load = [asyncio.create_task(client(i)) for i in range(CLIENTS)]
    await asyncio.wait_for(enough.wait(), 60)
    live_server.process.send_signal(signal.SIGTERM)
    await asyncio.gather(*load)
    assert await asyncio.wait_for(live_server.process.wait(), 30) == 0
    assert unanswered, "the load outlived the server: SIGTERM was not mid-load"

    rows = await pool.fetch(
        "SELECT c.command_id, c.outcome, e.event_id::text AS event_id FROM commands c "
        "LEFT JOIN events e ON e.event_id = c.event_id WHERE c.command_id = ANY($1::text[])",
        [*acknowledged, *unanswered],
    )
    recorded = {r["command_id"]: r for r in rows}
    for key, transaction_id in acknowledged.items():
        assert recorded[key]["outcome"] == "accepted"
        assert recorded[key]["event_id"] == transaction_id
    for key in unanswered:  # never reached the server, or fully applied: nothing in between
        if key in recorded:
            assert recorded[key]["outcome"] == "accepted"
            assert recorded[key]["event_id"] is not None
    # Read models are compared at their own checkpoints, so a projector stopped mid-way is fine.
    async with pool.acquire() as conn:
        report = await verify(conn)
    assert report.ok, report.findings
