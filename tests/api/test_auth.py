"""Callers have identities: every route against no key, a key without its scope and a key with
only its scope; idempotency keys in each client's namespace; the asset allowlist; rate limits;
rotation and revocation across two API processes; `tally keys` from the command line."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import time
import uuid
from typing import Any, NamedTuple

import asyncpg
import httpx
import msgspec
from litestar.testing import AsyncTestClient

from api.app import create_app
from api.auth import CACHE_SECONDS, SCOPES, route_scopes
from api.keys import create_client, revoke_client, rotate_client
from api.settings import Settings
from tests.api.support import (
    Client,
    assert_problem,
    created,
    define_asset,
    ledger_state,
    open_wallet,
    post,
    top_up,
)
from tests.conftest import LiveServer
from tests.helpers import TEST_CLIENT_ID, api_client

# Routes a caller reaches without a key.
OPEN = {"/health/live", "/health/ready"}
PATH_VALUES = {
    "user_id": "alice", "transaction_id": str(uuid.uuid4()), "hold_id": str(uuid.uuid4()),
    "webhook_id": str(uuid.uuid4()),
}  # fmt: skip
BODIES = {
    "/v1/assets": {"code": "GOLD", "name": "Gold", "decimals": 0},
    "/v1/wallets": {"user_id": "alice"},
}
MOVE = {"asset": "GOLD", "amount": 5}


async def make_key(pool: asyncpg.Pool, scopes: list[str], **options: Any) -> str:
    async with pool.acquire() as conn:
        key = await create_client(conn, f"c-{uuid.uuid4().hex[:10]}", scopes, **options)
    return key.secret


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def routes(client: AsyncTestClient) -> list[tuple[str, str, str]]:  # type: ignore[type-arg]
    """(method, concrete path, scope) of every route that needs a key."""
    found = []
    for route in client.app.routes:
        for method, handler in getattr(route, "route_handler_map", {}).items():
            if method in {"HEAD", "OPTIONS"} or route.path in OPEN or route.path.startswith("/docs"):
                continue
            path = re.sub(r"\{(\w+):\w+\}", lambda m: PATH_VALUES[m.group(1)], route.path)
            scopes = route_scopes(handler[0] if isinstance(handler, tuple) else handler)
            if len(scopes) > 1:  # each part of its request needs its own: tests/api/test_batches.py
                continue
            found.append((method, path, scopes[0]))
    return sorted(found)


async def call(client: Client, method: str, path: str, secret: str | None) -> httpx.Response:
    """``method path`` with ``secret`` as its bearer key, or with no Authorization header at all."""
    headers = {"Idempotency-Key": uuid.uuid4().hex} if method == "POST" else {}
    body = BODIES.get(path, MOVE) if method == "POST" else None
    request = client.build_request(method, path, json=body, headers=headers)
    if secret is None:
        del request.headers["authorization"]
    else:
        request.headers["authorization"] = f"Bearer {secret}"
    return await client.send(request)


async def test_every_route_needs_a_key_with_its_scope(client: Client, pool: asyncpg.Pool) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 100)
    found = routes(client)
    assert {scope for _, _, scope in found} >= {
        "assets:write", "wallets:write", "credits:top-up", "credits:bonus", "credits:spend", "ledger:read",
        "metrics:read", "events:read", "webhooks:manage",
    }  # fmt: skip
    assert len(found) >= 11
    failures = []
    for method, path, scope in found:
        others = [s for s in SCOPES if s not in {scope, "admin"}]
        wrong = await make_key(pool, others)
        right = await make_key(pool, [scope])
        anonymous = await call(client, method, path, None)
        if (
            anonymous.status_code != 401
            or anonymous.headers.get("www-authenticate", "").split()[0] != "Bearer"
        ):
            failures.append(f"{method} {path} without a key: {anonymous.status_code}")
        else:
            assert_problem(anonymous, 401, "unauthenticated")
        unknown = await call(client, method, path, "tally_sk_0123456789abcdef_" + "x" * 43)
        if unknown.status_code != 401:
            failures.append(f"{method} {path} with an unknown key: {unknown.status_code}")
        forbidden = await call(client, method, path, wrong)
        if forbidden.status_code != 403 or forbidden.json().get("scope") != scope:
            failures.append(
                f"{method} {path} without {scope}: {forbidden.status_code} {forbidden.text[:200]}"
            )
        else:
            assert_problem(forbidden, 403, "forbidden")
        # The event stream never ends: a filter it refuses (400) shows the key got past the scope
        # check without opening one.
        allowed = await call(
            client, method, path + ("?types=none" if path == "/v1/events/stream" else ""), right
        )
        if allowed.status_code in {401, 403} or allowed.status_code >= 500:
            failures.append(f"{method} {path} with only {scope}: {allowed.status_code} {allowed.text[:200]}")
    assert not failures, "\n".join(failures)
    # The refusals recorded nothing: every command the new keys recorded came from a key with the scope.
    senders = await pool.fetch(
        "SELECT k.scopes FROM commands c JOIN clients k USING (client_id) WHERE k.client_id <> $1",
        uuid.UUID(TEST_CLIENT_ID),
    )
    assert senders
    assert all(len(s["scopes"]) == 1 for s in senders), senders


async def test_open_routes_and_details_for_metrics_readers(client: Client, pool: asyncpg.Pool) -> None:
    anonymous = {"Authorization": ""}
    assert (await client.get("/health/live", headers=anonymous)).status_code == 200
    ready = await client.get("/health/ready", headers=anonymous)
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    reader = bearer(await make_key(pool, ["metrics:read"]))
    detailed = (await client.get("/health/ready", headers=reader)).json()
    assert detailed["checks"]["commands"]["status"] == "ok"
    assert (await client.get("/docs/openapi.json", headers=anonymous)).status_code == 200
    assert (await client.get("/metrics", headers=anonymous)).status_code == 401
    assert (await client.get("/metrics", headers=reader)).status_code == 200


async def test_the_openapi_document_declares_the_bearer_scheme(client: Client) -> None:
    document = (await client.get("/docs/openapi.json")).json()
    assert document["components"]["securitySchemes"]["bearer"] == {
        "type": "http", "scheme": "bearer",
        "description": document["components"]["securitySchemes"]["bearer"]["description"],
    }  # fmt: skip
    assert document["security"] == [{"bearer": []}]
    spend = document["paths"]["/v1/wallets/{user_id}/spends"]["post"]
    assert "`credits:spend`" in spend["description"]
    assert {"401", "403", "429"} <= set(spend["responses"])
    assert document["paths"]["/health/live"]["get"]["security"] == [{}]


async def test_two_clients_sending_the_same_key_get_two_effects(client: Client, pool: asyncpg.Pool) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    first = bearer(await make_key(pool, ["credits:top-up"]))
    second = bearer(await make_key(pool, ["credits:top-up"]))
    body = {"asset": "GOLD", "amount": 40}
    a = created(await post(client, "/v1/wallets/alice/top-ups", body, key="order-1", headers=first))
    b = created(await post(client, "/v1/wallets/alice/top-ups", body, key="order-1", headers=second))
    assert a["transaction_id"] != b["transaction_id"]
    assert b["balance_after"] == 80
    assert a["created_by"] != b["created_by"]
    again = await post(client, "/v1/wallets/alice/top-ups", body, key="order-1", headers=second)
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == b
    # A client cannot block another's key either: a different body under the same key is the
    # other client's own new command.
    third = bearer(await make_key(pool, ["credits:top-up"]))
    c = created(
        await post(client, "/v1/wallets/alice/top-ups", {**body, "amount": 1}, key="order-1", headers=third)
    )
    assert c["balance_after"] == 81
    events = await pool.fetch(
        "SELECT metadata ->> 'created_by' AS by, metadata ->> 'client_id' AS id FROM events "
        "WHERE event_type = 'CreditsToppedUp' ORDER BY global_position"
    )
    assert [e["by"] for e in events] == [a["created_by"], b["created_by"], c["created_by"]]
    assert len({e["id"] for e in events}) == 3


async def test_a_key_limited_to_some_assets_cannot_touch_others(client: Client, pool: asyncpg.Pool) -> None:
    await define_asset(client, "GOLD")
    await define_asset(client, "GEMS")
    await open_wallet(client, "alice")
    gold_only = bearer(await make_key(pool, ["credits:top-up", "assets:write"], assets=["GOLD"]))
    before = await ledger_state(client, "alice")
    commands = await pool.fetchval("SELECT count(*) FROM commands")
    refused = await post(
        client, "/v1/wallets/alice/top-ups", {"asset": "GEMS", "amount": 5}, headers=gold_only
    )
    assert assert_problem(refused, 403, "forbidden")["asset"] == "GEMS"
    defined = await post(
        client, "/v1/assets", {"code": "RUBY", "name": "Ruby", "decimals": 0}, headers=gold_only
    )
    assert assert_problem(defined, 403, "forbidden")["asset"] == "RUBY"
    assert await pool.fetchval("SELECT count(*) FROM commands") == commands
    assert await ledger_state(client, "alice") == before
    created(
        await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 5}, headers=gold_only)
    )


async def test_over_its_rate_limit_a_client_gets_429_and_nothing_is_recorded(
    client: Client, pool: asyncpg.Pool
) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    limited = bearer(await make_key(pool, ["credits:top-up"], rate_limit=2))
    async with pool.acquire() as conn:
        client_id = await conn.fetchval("SELECT client_id FROM clients ORDER BY created_at DESC LIMIT 1")
    keys = [f"burst-{i}" for i in range(12)]
    responses = await asyncio.gather(*(
        post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 1}, key=k, headers=limited)
        for k in keys
    ))  # fmt: skip
    limited_out = [r for r in responses if r.status_code == 429]
    accepted = [r for r in responses if r.status_code == 201]
    assert limited_out, [r.status_code for r in responses]
    assert len(accepted) + len(limited_out) == len(keys)
    for response in limited_out:
        assert_problem(response, 429, "rate_limited")
        assert int(response.headers["retry-after"]) >= 1
    recorded = await pool.fetchval("SELECT count(*) FROM commands WHERE client_id = $1", client_id)
    assert recorded == len(accepted)
    # Another client is not limited by this one's traffic.
    assert (
        await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 1})
    ).status_code == 201


async def _status_on(servers: tuple[LiveServer, LiveServer], secret: str) -> list[int]:
    async with httpx.AsyncClient(headers=bearer(secret), timeout=30) as http:
        return [(await http.get(f"{s.url}/v1/assets")).status_code for s in servers]


async def _until(servers: tuple[LiveServer, LiveServer], secret: str, status: int) -> list[int]:
    """Poll both processes until both answer ``status``: their caches hold a secret for
    CACHE_SECONDS, so this gives up at a bound far above that (and far below a restart)."""
    deadline = time.monotonic() + CACHE_SECONDS + 8
    while True:
        statuses = await _status_on(servers, secret)
        if statuses == [status, status] or time.monotonic() > deadline:
            return statuses
        await asyncio.sleep(0.2)


async def test_rotation_and_revocation_reach_every_api_process(
    two_servers: tuple[LiveServer, LiveServer], db_url: str
) -> None:
    conn = await asyncpg.connect(db_url)
    try:
        old = (await create_client(conn, "rotating", ["ledger:read"])).secret
        assert await _status_on(two_servers, old) == [200, 200]  # both processes now cache it

        graced = (await rotate_client(conn, "rotating", 3600)).secret
        assert await _status_on(two_servers, graced) == [200, 200]
        assert await _status_on(two_servers, old) == [200, 200]  # in its grace period

        new = (await rotate_client(conn, "rotating", 0)).secret
        assert await _until(two_servers, graced, 401) == [401, 401]
        # Two rotations: the first secret's grace ended with the second, so only `new` is live.
        assert await _until(two_servers, old, 401) == [401, 401]
        assert await _status_on(two_servers, new) == [200, 200]
        live = await conn.fetchval(
            "SELECT count(*) FROM client_secrets s JOIN clients c USING (client_id) "
            "WHERE c.name = 'rotating' AND (s.expires_at IS NULL OR s.expires_at > now())"
        )
        assert live == 1

        await revoke_client(conn, "rotating")
        assert await _until(two_servers, new, 401) == [401, 401]
    finally:
        await conn.close()


async def test_an_expired_key_fails_at_once(client: Client, pool: asyncpg.Pool) -> None:
    secret = await make_key(pool, ["ledger:read"], expires_in_days=10 / 86400)  # ten seconds
    assert (await client.get("/v1/assets", headers=bearer(secret))).status_code == 200  # cached now
    expires_at = await pool.fetchval("SELECT extract(epoch FROM max(expires_at))::float8 FROM clients")
    await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.05)  # until the moment has passed
    # The cache holds the secret for a few seconds, but the expiry is checked on every request.
    assert_problem(await client.get("/v1/assets", headers=bearer(secret)), 401, "unauthenticated")


class Ran(NamedTuple):
    returncode: int
    stdout: str
    stderr: str


async def _tally(db_url: str, *args: str) -> Ran:
    """``tally keys ARGS`` as its own process."""
    env = {**os.environ, "DATABASE_URL": db_url, "TALLY_LOG_LEVEL": "warning"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "keys", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def test_the_keys_command_line(client: Client, db_url: str, pool: asyncpg.Pool) -> None:
    made = await _tally(db_url, "create", "shop", "--scopes", "credits:spend,ledger:read", "--assets", "GOLD",
                  "--rate-limit", "50", "--expires-in", "30", "--json")  # fmt: skip
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert {"id", "name", "scopes", "assets", "secret", "created_at", "expires_at"} <= set(key)
    assert key["name"] == "shop"
    assert key["scopes"] == ["credits:spend", "ledger:read"]
    assert key["assets"] == ["GOLD"]
    assert key["secret"].startswith("tally_sk_")
    stored = await pool.fetchval("SELECT secret_hash FROM client_secrets s JOIN clients c USING (client_id) "
                                 "WHERE c.name = 'shop'")  # fmt: skip
    assert key["secret"].encode() not in bytes(stored)
    assert (await client.get("/v1/assets", headers=bearer(key["secret"]))).status_code == 200

    duplicate = await _tally(db_url, "create", "shop", "--scopes", "ledger:read")
    assert duplicate.returncode == 2
    assert "exists already" in duplicate.stderr
    bad_scope = await _tally(db_url, "create", "other", "--scopes", "credits:steal")
    assert bad_scope.returncode == 2
    assert "credits:steal" in bad_scope.stderr

    listed = await _tally(db_url, "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert "tally_sk_" not in listed.stdout
    assert "shop" in {c["name"] for c in json.loads(listed.stdout)}

    rotated = await _tally(db_url, "rotate", "shop", "--grace", "0", "--json")
    assert rotated.returncode == 0, rotated.stderr
    new_secret = json.loads(rotated.stdout)["secret"]
    assert new_secret != key["secret"]
    assert (await client.get("/v1/assets", headers=bearer(new_secret))).status_code == 200

    revoked = await _tally(db_url, "revoke", "shop")
    assert revoked.returncode == 0, revoked.stderr
    deadline = time.monotonic() + 30
    while (await client.get("/v1/assets", headers=bearer(new_secret))).status_code != 401:
        assert time.monotonic() < deadline, "a revoked key kept working"
        await asyncio.sleep(0.2)


async def test_the_docs_can_be_closed(settings: Settings) -> None:
    closed = msgspec.structs.replace(settings, docs_public=False)
    async with api_client(create_app(closed)) as client:
        assert (await client.get("/docs/openapi.json")).status_code == 200  # with the test's key
        anonymous = client.build_request("GET", "/docs/openapi.json")
        del anonymous.headers["authorization"]
        assert_problem(await client.send(anonymous), 401, "unauthenticated")
        live = client.build_request("GET", "/health/live")
        del live.headers["authorization"]
        assert (await client.send(live)).status_code == 200


async def test_a_rotated_client_keeps_its_namespace(client: Client, pool: asyncpg.Pool) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    async with pool.acquire() as conn:
        old = (await create_client(conn, "rotated", ["credits:top-up"])).secret
        body = {"asset": "GOLD", "amount": 9}
        first = created(await post(client, "/v1/wallets/alice/top-ups", body, key="k-1", headers=bearer(old)))
        new = (await rotate_client(conn, "rotated", 0)).secret
    again = await post(client, "/v1/wallets/alice/top-ups", body, key="k-1", headers=bearer(new))
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first
