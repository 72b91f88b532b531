"""Helpers for the HTTP tests: POST with an Idempotency-Key, read-your-writes GETs, problem checks,
and a snapshot of everything observable about the ledger (to prove a refused request changed
nothing)."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
from litestar.testing import AsyncTestClient

Client = AsyncTestClient  # type: ignore[type-arg]

PROBLEM_JSON = "application/problem+json"
MAX_AMOUNT = 10**15


def new_key() -> str:
    return uuid.uuid4().hex


async def post(
    client: Client,
    path: str,
    body: Any = None,
    key: str | None = None,
    headers: dict[str, Any] | None = None,
    *,
    raw: bytes | str | None = None,
    send_key: bool = True,
) -> httpx.Response:
    """POST ``body`` as JSON (or ``raw`` bytes as-is) with an Idempotency-Key: ``key``, else a
    fresh one, unless ``send_key`` is False."""
    all_headers: dict[str, Any] = {}
    if send_key:
        all_headers["Idempotency-Key"] = key if key is not None else new_key()
    all_headers.update(headers or {})
    if raw is not None:
        all_headers.setdefault("Content-Type", "application/json")
        return await client.post(path, content=raw, headers=all_headers)
    return await client.post(path, json=body, headers=all_headers)


async def get(client: Client, path: str, token: str | None = None, **params: Any) -> httpx.Response:
    """GET ``path``; with ``token`` as ``consistent_with`` so the read reflects that command."""
    if token is not None:
        params["consistent_with"] = token
    return await client.get(path, params=params)


async def get_json(client: Client, path: str, token: str | None = None, **params: Any) -> Any:
    response = await get(client, path, token, **params)
    assert response.status_code == 200, response.text
    return response.json()


def created(response: httpx.Response) -> dict[str, Any]:
    """The body of a first (not replayed) 201."""
    assert response.status_code == 201, response.text
    assert response.headers["content-type"].startswith("application/json")
    assert "idempotent-replayed" not in response.headers
    body: dict[str, Any] = response.json()
    assert isinstance(body["consistency_token"], str)
    assert body["consistency_token"]
    return body


def assert_no_traceback(response: httpx.Response) -> None:
    assert "Traceback" not in response.text
    assert 'File "' not in response.text


def problem_mismatch(response: httpx.Response, status: int, code: str) -> str | None:
    """Why ``response`` is not an RFC 9457 problem with this status and stable code (and no leaked
    internals), or None when it is."""
    summary = f"{response.status_code} {response.text[:300]}"
    try:
        body = response.json()
    except ValueError:
        body = None
    member = body.get if isinstance(body, dict) else (lambda _name: None)
    problems = [
        ("Traceback" in response.text or 'File "' in response.text, "leaks a traceback"),
        (response.status_code != status, f"expected {status} {code}"),
        (not response.headers.get("content-type", "").startswith(PROBLEM_JSON), "not problem+json"),
        (member("code") != code, f"expected code {code}"),
        (member("status") != status, f"status member is not {status}"),
        (not isinstance(member("title"), str) or not member("title"), "no title"),
        (not isinstance(member("type"), str) or not member("type"), "no type"),
        (not isinstance(member("detail"), str), "no detail"),
    ]
    for failed, why in problems:
        if failed:
            return f"{why}: {summary} ({response.headers.get('content-type')})"
    return None


def assert_problem(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """An RFC 9457 problem with this status and stable code, and no leaked internals."""
    mismatch = problem_mismatch(response, status, code)
    assert mismatch is None, mismatch
    body: dict[str, Any] = response.json()
    return body


class Refusals:
    """Collects every case that was not refused as expected, so one test can try many bad inputs
    and still name each one that slipped through."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    def check(self, case: str, response: httpx.Response, status: int, code: str) -> None:
        mismatch = problem_mismatch(response, status, code)
        if mismatch is None and "idempotent-replayed" in response.headers:
            mismatch = "a refusal of an invalid request is marked as replayed"
        if mismatch is not None:
            self.failures.append(f"{case}: {mismatch}")

    def assert_none(self) -> None:
        assert not self.failures, "\n".join(self.failures)


# --- builders --------------------------------------------------------------------------------


async def define_asset(
    client: Client, code: str = "GOLD", name: str | None = None, decimals: int = 2
) -> dict:
    body = {"code": code, "name": name or code.title(), "decimals": decimals}
    return created(await post(client, "/v1/assets", body))


async def open_wallet(client: Client, user_id: str, metadata: dict[str, str] | None = None) -> dict:
    body: dict[str, Any] = {"user_id": user_id}
    if metadata is not None:
        body["metadata"] = metadata
    return created(await post(client, "/v1/wallets", body))


async def move(
    client: Client, flow: str, user_id: str, amount: int, asset: str = "GOLD", **extra: Any
) -> dict:
    """A top-up, bonus or spend (``flow`` is the path segment) that must succeed."""
    body = {"asset": asset, "amount": amount, **extra}
    return created(await post(client, f"/v1/wallets/{user_id}/{flow}", body))


async def top_up(client: Client, user_id: str, amount: int, asset: str = "GOLD", **extra: Any) -> dict:
    return await move(client, "top-ups", user_id, amount, asset, **extra)


async def bonus(client: Client, user_id: str, amount: int, asset: str = "GOLD", **extra: Any) -> dict:
    return await move(client, "bonuses", user_id, amount, asset, **extra)


async def spend(client: Client, user_id: str, amount: int, asset: str = "GOLD", **extra: Any) -> dict:
    return await move(client, "spends", user_id, amount, asset, **extra)


def as_read(transaction: dict[str, Any]) -> dict[str, Any]:
    """A command's transaction as GET /v1/transactions/{id} shows it while nothing reversed it."""
    return {**transaction, "reversed_amount": 0, "reversals": []}


async def sync_token(client: Client) -> str:
    """A token committed after everything before it: reading with it sees all earlier commands
    (a harmless new wallet nobody looks at)."""
    response = await post(client, "/v1/wallets", {"user_id": f"sentinel-{uuid.uuid4().hex[:12]}"})
    return str(created(response)["consistency_token"])


async def ledger_state(client: Client, *user_ids: str) -> dict[str, Any]:
    """Everything observable about these wallets, the assets and the system accounts, as of now
    (after every earlier command has been projected)."""
    token = await sync_token(client)
    state: dict[str, Any] = {
        "assets": await get_json(client, "/v1/assets", token),
        "system": await get_json(client, "/v1/system/balances", token),
    }
    for user_id in user_ids:
        wallet = await get(client, f"/v1/wallets/{user_id}", token)
        history = await get(client, f"/v1/wallets/{user_id}/transactions", token, limit=200)
        state[user_id] = (
            wallet.status_code,
            wallet.json(),
            wallet.headers.get("etag"),
            history.status_code,
            history.json(),
        )
    return state


async def balance_of(client: Client, user_id: str, asset: str = "GOLD", token: str | None = None) -> int:
    wallet = await get_json(client, f"/v1/wallets/{user_id}", token or await sync_token(client))
    return sum(b["balance"] for b in wallet["balances"] if b["asset"] == asset)
