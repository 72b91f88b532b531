"""The webhook routes: create (the secret once, again only to a replay of the same request), list,
get, delete, rotate (both secrets sign during the grace period), replay, deliveries; each client
sees only its own; bad input and disallowed URLs are refused with nothing made. (Deliveries
themselves: tests/integration/test_webhooks.py.)"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import msgspec
import pytest
from standardwebhooks import Webhook

from api.app import create_app
from api.settings import Settings
from projections.webhooks import HostPolicy, UrlNotAllowed, derive_secret, sign
from tests.api.support import Client, assert_problem, post
from tests.api.test_auth import bearer, make_key
from tests.helpers import AUTH, api_client

KEY = "api-test-webhook-key"
HOOK = "http://127.0.0.1:9/hook"  # never called here: no dispatcher runs without a projector


@pytest.fixture
async def hooks(settings: Settings) -> AsyncIterator[Client]:
    configured = msgspec.structs.replace(
        settings, webhook_key=KEY, webhook_allowed_hosts="127.0.0.1,*.example.test"
    )
    async with api_client(create_app(configured)) as client:
        client.headers.update(AUTH)
        yield client


async def _create(client: Client, body: dict[str, Any], key: str | None = None) -> Any:
    return await post(client, "/v1/webhooks", body, key=key)


async def test_create_shows_the_secret_once_and_a_replay_derives_it_again(
    hooks: Client, pool: asyncpg.Pool
) -> None:
    made = await _create(
        hooks, {"url": HOOK, "types": ["CreditsSpent", "HoldPlaced"], "description": "shop"}, "h-1"
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert set(body) == {"webhook_id", "url", "types", "description", "secret", "created_at"}
    assert body["secret"].startswith("whsec_")
    again = await _create(
        hooks, {"url": HOOK, "types": ["HoldPlaced", "CreditsSpent"], "description": "shop"}, "h-1"
    )
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == body
    reused = await _create(hooks, {"url": HOOK}, "h-1")
    assert_problem(reused, 422, "idempotency_key_reused")
    # Nothing the database holds is the secret, or signs like it.
    salts = await pool.fetch("SELECT salt FROM webhook_secrets")
    assert len(salts) == 1
    dump = str(await pool.fetch("SELECT * FROM webhooks")) + str(salts)
    assert body["secret"][len("whsec_") :] not in dump
    assert derive_secret(KEY.encode(), bytes(salts[0]["salt"])) == body["secret"]
    assert derive_secret(b"another key", bytes(salts[0]["salt"])) != body["secret"]
    listed = (await hooks.get("/v1/webhooks")).json()["items"]
    assert [h["webhook_id"] for h in listed] == [body["webhook_id"]]
    assert "secret" not in listed[0]
    assert listed[0]["types"] == ["CreditsSpent", "HoldPlaced"]
    assert [listed[0][k] for k in ("pending", "parked", "attempts", "failures")] == [0, 0, 0, 0]


async def test_each_client_sees_only_its_own(hooks: Client, pool: asyncpg.Pool) -> None:
    mine = (await _create(hooks, {"url": HOOK})).json()
    other = bearer(await make_key(pool, ["webhooks:manage"]))
    hooks.headers.update(other)
    assert (await hooks.get("/v1/webhooks")).json() == {"items": []}
    for response in (
        await hooks.get(f"/v1/webhooks/{mine['webhook_id']}"),
        await hooks.get(f"/v1/webhooks/{mine['webhook_id']}/deliveries"),
        await hooks.delete(f"/v1/webhooks/{mine['webhook_id']}"),
        await post(hooks, f"/v1/webhooks/{mine['webhook_id']}/rotate-secret"),
        await post(hooks, f"/v1/webhooks/{mine['webhook_id']}/replay"),
    ):
        assert_problem(response, 404, "webhook_not_found")
    hooks.headers.update(AUTH)
    assert (await hooks.get(f"/v1/webhooks/{mine['webhook_id']}")).status_code == 200


async def test_delete(hooks: Client) -> None:
    made = (await _create(hooks, {"url": HOOK})).json()
    assert (await hooks.delete(f"/v1/webhooks/{made['webhook_id']}")).status_code == 204
    assert_problem(await hooks.get(f"/v1/webhooks/{made['webhook_id']}"), 404, "webhook_not_found")
    assert_problem(await hooks.delete(f"/v1/webhooks/{made['webhook_id']}"), 404, "webhook_not_found")
    assert (await hooks.get("/v1/webhooks")).json() == {"items": []}


async def test_a_rotated_secret_signs_beside_the_new_one_during_its_grace(
    hooks: Client, pool: asyncpg.Pool
) -> None:
    made = (await _create(hooks, {"url": HOOK})).json()
    path = f"/v1/webhooks/{made['webhook_id']}/rotate-secret"
    rotated = await post(hooks, path, {"grace_seconds": 3600}, key="r-1")
    assert rotated.status_code == 200, rotated.text
    body = rotated.json()
    assert body["secret"] != made["secret"]
    until = datetime.fromisoformat(body["previous_expires_at"])
    assert timedelta(minutes=59) < until - datetime.now(UTC) <= timedelta(hours=1)
    again = await post(hooks, path, {"grace_seconds": 3600}, key="r-1")
    assert (again.json(), again.headers["idempotent-replayed"]) == (body, "true")
    assert_problem(await post(hooks, path, {"grace_seconds": 60}, key="r-1"), 422, "idempotency_key_reused")
    view = (await hooks.get(f"/v1/webhooks/{made['webhook_id']}")).json()
    assert [s["expires_at"] is None for s in view["secrets"]] == [False, True]
    # What the dispatcher sends meanwhile verifies with either secret (Standard Webhooks' library).
    salts = await pool.fetch(
        "SELECT salt FROM webhook_secrets WHERE expires_at IS NULL OR expires_at > now() "
        "ORDER BY created_at DESC"
    )
    secrets = [derive_secret(KEY.encode(), bytes(s["salt"])) for s in salts]
    assert secrets == [body["secret"], made["secret"]]
    payload = '{"event_id": "e"}'
    headers = sign(secrets, "msg_1", datetime.now(UTC), payload)
    assert len(headers["webhook-signature"].split(" ")) == 2
    for secret in secrets:
        assert Webhook(secret).verify(payload, headers) == {"event_id": "e"}
    # With no grace, every earlier secret stops at once (the one still in its hour's grace too).
    rotated_again = await post(hooks, path, {"grace_seconds": 0})
    assert rotated_again.status_code == 200
    view = (await hooks.get(f"/v1/webhooks/{made['webhook_id']}")).json()
    assert [s["expires_at"] for s in view["secrets"]] == [None]


async def test_replay_records_its_request(hooks: Client) -> None:
    made = (await _create(hooks, {"url": HOOK})).json()
    path = f"/v1/webhooks/{made['webhook_id']}/replay"
    first = await post(hooks, path, {"after": "0.0"}, key="p-1")
    assert first.status_code == 202, first.text
    assert first.json() == {"webhook_id": made["webhook_id"], "after": "0.0", "replayed": 0}
    assert (await post(hooks, path, {"after": "0.0"}, key="p-1")).headers["idempotent-replayed"] == "true"
    assert_problem(await post(hooks, path, {"after": "5.5"}, key="p-1"), 422, "idempotency_key_reused")
    assert_problem(await post(hooks, path, {"after": "nope"}), 400, "invalid_request")
    assert (await post(hooks, path)).status_code == 202  # no body: from the first event


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"url": "ftp://127.0.0.1/x"}, 400, "url_not_allowed"),
        ({"url": "http://10.1.2.3/x"}, 400, "url_not_allowed"),  # not in the allowed hosts
        ({"url": "http://user:pw@127.0.0.1/x"}, 400, "url_not_allowed"),
        ({"url": "not a url"}, 400, "url_not_allowed"),
        ({"url": "http://127.0.0.1:9/a\x01b"}, 400, "url_not_allowed"),  # no request could carry it
        ({"url": "http://127.0.0.1:9/\x00"}, 400, "invalid_request"),
        ({"url": HOOK, "description": "a\x00b"}, 400, "invalid_request"),
        ({"url": HOOK, "types": ["NoSuchEvent"]}, 400, "invalid_request"),
        ({"url": HOOK, "types": []}, 400, "invalid_request"),
        ({"url": HOOK, "extra": 1}, 400, "invalid_request"),
        ({"url": ""}, 400, "invalid_request"),
        ({}, 400, "invalid_request"),
    ],
)
async def test_bad_subscriptions_are_refused_with_nothing_made(
    hooks: Client, pool: asyncpg.Pool, body: dict[str, Any], status: int, code: str
) -> None:
    assert_problem(await _create(hooks, body), status, code)
    assert await pool.fetchval("SELECT count(*) FROM webhooks") == 0


async def test_allowed_hosts_match_names_and_patterns() -> None:
    policy = HostPolicy.parse("localhost, *.example.test")  # only these
    await policy.check("https://localhost:8443/x")
    await policy.check("https://hooks.example.test/x")
    for url in ("https://example.test/x", "http://127.0.0.1/x", "http://93.184.216.34/x"):
        with pytest.raises(UrlNotAllowed):
            await policy.check(url)
    with_public = HostPolicy.parse("public,localhost")
    await with_public.check("http://localhost/x")
    await with_public.check("http://93.184.216.34/x")
    with pytest.raises(UrlNotAllowed):
        await with_public.check("http://10.0.0.1/x")
    # Unset (public): any host whose addresses are all public; loopback and private ones are refused.
    refused = (
        "http://127.0.0.1/x", "http://localhost/x", "http://10.0.0.1/x", "http://[::1]/x", "http://169.254.169.254/",
        "http://[::ffff:127.0.0.1]/x", "http://[64:ff9b::7f00:1]/x", "http://[2002:7f00:1::]/x",
        "http://[::127.0.0.1]/x", "http://[64:ff9b:1::a00:1]/x", "http://[fec0::1]/x", "http://a..b/x",
        f"http://{'a' * 64}.example/x",
    )  # fmt: skip
    for url in refused:
        with pytest.raises(UrlNotAllowed):
            await HostPolicy.parse(None).check(url)
    await HostPolicy.parse(None).check("http://93.184.216.34/x")


async def test_without_a_webhook_key_subscriptions_are_refused(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    async with api_client(
        create_app(msgspec.structs.replace(settings, webhook_allowed_hosts="127.0.0.1"))
    ) as client:
        client.headers.update(AUTH)
        assert_problem(await _create(client, {"url": HOOK}), 503, "webhooks_not_configured")
    assert await pool.fetchval("SELECT count(*) FROM webhooks") == 0


async def test_a_subscription_needs_a_key_that_may_read_the_feed(hooks: Client, pool: asyncpg.Pool) -> None:
    hooks.headers.update(bearer(await make_key(pool, ["webhooks:manage"])))
    assert assert_problem(await _create(hooks, {"url": HOOK}), 403, "forbidden")["scope"] == "events:read"
    assert await pool.fetchval("SELECT count(*) FROM webhooks") == 0


async def test_the_routes_need_webhooks_manage(hooks: Client, pool: asyncpg.Pool) -> None:
    hooks.headers.update(bearer(await make_key(pool, ["events:read", "ledger:read"])))
    wid = str(uuid.uuid4())
    for response in (
        await hooks.get("/v1/webhooks"),
        await _create(hooks, {"url": HOOK}),
        await hooks.get(f"/v1/webhooks/{wid}/deliveries"),
    ):
        assert assert_problem(response, 403, "forbidden")["scope"] == "webhooks:manage"
