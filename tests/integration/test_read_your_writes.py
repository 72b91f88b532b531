"""consistent_with: a query waits for the projections, bounded, then answers 503."""

from __future__ import annotations

import asyncio
import os
import sys

import msgspec
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.settings import Settings
from tests.helpers import api_client


async def test_a_token_not_yet_projected_times_out_then_is_waited_for(db_url: str) -> None:
    # No projector runs in this app: the read model cannot reach the token in time.
    impatient = Settings(database_url=db_url, consistency_timeout=0.3)
    async with api_client(create_app(impatient, run_projector=False)) as client:
        created = await client.post("/v1/assets", json={"code": "GOLD", "name": "Gold", "decimals": 0},
                                    headers={"Idempotency-Key": "a"})  # fmt: skip
        assert created.status_code == 201
        token = created.json()["consistency_token"]
        waited = await client.get("/v1/assets", params={"consistent_with": token})
        assert waited.status_code == 503
        assert waited.headers["content-type"].startswith("application/problem+json")
        assert waited.json()["code"] == "projection_timeout"
        assert (await client.get("/v1/assets")).json() == {"items": []}

    # A projector in its own process (`tally projector`) starts; a query with the token waits for
    # it and then answers with the write applied.
    projector = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "projector",
        env={**os.environ, "DATABASE_URL": db_url, "TALLY_LOG_LEVEL": "warning"},
    )  # fmt: skip
    try:
        patient = Settings(database_url=db_url, consistency_timeout=30)
        async with api_client(create_app(patient, run_projector=False)) as client:
            answer = await client.get("/v1/assets", params={"consistent_with": token})
    finally:
        projector.terminate()
        assert await projector.wait() == 0  # SIGTERM is a clean stop
    assert answer.status_code == 200
    assert [a["code"] for a in answer.json()["items"]] == ["GOLD"]


async def test_a_malformed_token_is_invalid(client: AsyncTestClient) -> None:  # type: ignore[type-arg]
    response = await client.get("/v1/system/balances", params={"consistent_with": "not-a-token"})
    assert response.status_code == 400
    assert msgspec.json.decode(response.content)["code"] == "invalid_request"
