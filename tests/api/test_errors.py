"""Every refusal: problem+json with a stable code, no leaked internals, and no change to the ledger.

Tests that try many bad inputs send each one, collect every input that was not refused as expected
(``Refusals``), and then compare everything observable about the ledger with a snapshot taken
before: a wallet's balances, version, ETag and history, the assets, and the system balances."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.api.support import (
    MAX_AMOUNT,
    Client,
    Refusals,
    assert_no_traceback,
    assert_problem,
    define_asset,
    get,
    ledger_state,
    open_wallet,
    post,
    sync_token,
    top_up,
)
from tests.conftest import LiveServer
from tests.helpers import AUTH

FLOWS = ("top-ups", "bonuses", "spends")


@pytest.fixture
async def funded(client: Client) -> Client:
    """GOLD defined, alice holding 1000 GOLD (version 2)."""
    await define_asset(client, "GOLD")
    await open_wallet(client, "alice", {"tier": "gold"})
    await top_up(client, "alice", 1000)
    return client


def _send(body: Any) -> dict[str, Any]:
    """post() keyword arguments for a body: bytes are sent as they are, anything else as JSON."""
    return {"raw": body} if isinstance(body, bytes) else {"body": body}


def _move(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"asset": "GOLD", "amount": 100}
    body.update(changes)
    return body


BAD_MOVE_BODIES: dict[str, dict[str, Any]] = {
    "not a JSON object": {
        "malformed JSON": b'{"asset": "GOLD", "amount": ',
        "not JSON": b"asset=GOLD&amount=100",
        "empty body": b"",
        "an array": b'[{"asset": "GOLD", "amount": 100}]',
        "a string": b'"GOLD"',
        "JSON null": b"null",
        "trailing garbage": b'{"asset": "GOLD", "amount": 100} x',
        "a repeated key (the last would win)": b'{"asset": "GOLD", "amount": 1, "amount": 50}',
        "a repeated metadata key": b'{"asset": "GOLD", "amount": 1, "metadata": {"a": "1", "a": "2"}}',
        "nesting deeper than any parser's stack": b'{"asset": "GOLD", "amount": 1, "metadata": '
        + b"[" * 20_000
        + b"]" * 20_000
        + b"}",
        "a lone surrogate": b'{"asset": "GOLD", "amount": 1, "metadata": {"a": "\\ud800"}}',
        "a lone surrogate in a key": b'{"asset": "GOLD", "amount": 1, "metadata": {"\\udfff": "a"}}',
        "bytes that are not UTF-8": b'{"asset": "GOLD", "amount": 1, "reference": "\xff"}',
        "a byte-order mark": b'\xef\xbb\xbf{"asset": "GOLD", "amount": 1}',
    },
    "amount": {
        "amount as string": _move(amount="100"),
        "amount 1.5": _move(amount=1.5),
        "amount 100.0": _move(amount=100.0),
        "amount 1e2": b'{"asset": "GOLD", "amount": 1e2}',
        "amount true": _move(amount=True),
        "amount NaN": b'{"asset": "GOLD", "amount": NaN}',
        "amount Infinity": b'{"asset": "GOLD", "amount": Infinity}',
        "amount null": _move(amount=None),
        "amount zero": _move(amount=0),
        "amount negative": _move(amount=-100),
        "amount above the maximum": _move(amount=MAX_AMOUNT + 1),
        "amount beyond 64 bits": _move(amount=10**30),
        "amount an object": _move(amount={"value": 100}),
        "amount missing": {"asset": "GOLD"},
    },
    "asset": {
        "asset missing": {"amount": 100},
        "asset a number": _move(asset=5),
        "asset null": _move(asset=None),
        "asset lowercase": _move(asset="gold"),
        "asset too long": _move(asset="G" * 17),
        "asset too short": _move(asset="G"),
        "asset starting with a digit": _move(asset="1GOLD"),
        "asset with a space": _move(asset="GO LD"),
    },
    "metadata": {
        "metadata with 17 keys": _move(metadata={f"k{i}": "v" for i in range(17)}),
        "metadata with a number value": _move(metadata={"a": 1}),
        "metadata with a null value": _move(metadata={"a": None}),
        "metadata with a boolean value": _move(metadata={"a": True}),
        "metadata nested": _move(metadata={"a": {"b": "c"}}),
        "metadata a list": _move(metadata=["a"]),
        "metadata a string": _move(metadata="a=b"),
        "metadata value of 513 characters": _move(metadata={"a": "v" * 513}),
        "metadata key of 65 characters": _move(metadata={"k" * 65: "v"}),
        "metadata empty key": _move(metadata={"": "v"}),
    },
    "other fields": {
        "unknown field": _move(note="hi"),
        "user_id in the body": _move(user_id="alice"),
        "reference of 256 characters": _move(reference="r" * 256),
        "reference a number": _move(reference=5),
        "reference with a NUL character": _move(reference="a\u0000b"),
        "metadata value with a NUL character": _move(metadata={"k": "a\u0000"}),
        "metadata key with a NUL character": _move(metadata={"k\u0000": "v"}),
    },
}


@pytest.mark.parametrize("group", BAD_MOVE_BODIES)
async def test_invalid_transaction_bodies_are_refused_and_change_nothing(funded: Client, group: str) -> None:
    client = funded
    before = await ledger_state(client, "alice")
    refusals = Refusals()
    for case, body in BAD_MOVE_BODIES[group].items():
        for flow in FLOWS:
            response = await post(client, f"/v1/wallets/alice/{flow}", **_send(body))
            refusals.check(f"{flow} with {case}", response, 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice") == before


BAD_WALLET_BODIES: dict[str, dict[str, Any]] = {
    "user_id": {
        "user_id missing": {},
        "user_id null": {"user_id": None},
        "user_id a number": {"user_id": 5},
        "user_id empty": {"user_id": ""},
        "user_id with a space": {"user_id": "carol smith"},
        "user_id with a slash": {"user_id": "carol/x"},
        "user_id with a bang": {"user_id": "carol!"},
        "user_id with a colon": {"user_id": "user:carol"},
        "user_id non-ASCII": {"user_id": "carolé"},
        "user_id of 65 characters": {"user_id": "c" * 65},
    },
    "metadata and shape": {
        "malformed JSON": b'{"user_id": "carol"',
        "empty body": b"",
        "an array": b'["carol"]',
        "metadata with 17 keys": {"user_id": "carol", "metadata": {f"k{i}": "v" for i in range(17)}},
        "metadata with a number value": {"user_id": "carol", "metadata": {"age": 30}},
        "metadata nested": {"user_id": "carol", "metadata": {"a": {"b": "c"}}},
        "metadata a list": {"user_id": "carol", "metadata": [["a", "b"]]},
        "metadata null": {"user_id": "carol", "metadata": None},
        "metadata value of 513 characters": {"user_id": "carol", "metadata": {"a": "v" * 513}},
        "metadata key of 65 characters": {"user_id": "carol", "metadata": {"k" * 65: "v"}},
        "metadata empty key": {"user_id": "carol", "metadata": {"": "v"}},
        "unknown field": {"user_id": "carol", "balance": 100},
    },
}


@pytest.mark.parametrize("group", BAD_WALLET_BODIES)
async def test_invalid_open_wallet_bodies_are_refused_and_change_nothing(funded: Client, group: str) -> None:
    client = funded
    before = await ledger_state(client, "alice", "carol", "c" * 64)
    assert before["carol"][0] == 404
    refusals = Refusals()
    for case, body in BAD_WALLET_BODIES[group].items():
        response = await post(client, "/v1/wallets", **_send(body))
        refusals.check(case, response, 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice", "carol", "c" * 64) == before


def _asset(**changes: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"code": "GEMS", "name": "Gems", "decimals": 0}
    body.update(changes)
    return body


BAD_ASSET_BODIES: dict[str, dict[str, Any]] = {
    "code": {
        "code missing": {"name": "Gems", "decimals": 0},
        "code lowercase": _asset(code="gems"),
        "code too long": _asset(code="G" * 17),
        "code too short": _asset(code="G"),
        "code starting with a digit": _asset(code="1GEMS"),
        "code with a dash": _asset(code="GE-MS"),
        "code a number": _asset(code=5),
        "code null": _asset(code=None),
    },
    "name, decimals and shape": {
        "malformed JSON": b'{"code": "GEMS",',
        "empty body": b"",
        "name missing": {"code": "GEMS", "decimals": 0},
        "name empty": _asset(name=""),
        "name with a NUL character": _asset(name="Ge\u0000ms"),
        "name of 65 characters": _asset(name="n" * 65),
        "name null": _asset(name=None),
        "decimals missing": {"code": "GEMS", "name": "Gems"},
        "decimals negative": _asset(decimals=-1),
        "decimals 19": _asset(decimals=19),
        "decimals as string": _asset(decimals="2"),
        "decimals 2.0": _asset(decimals=2.0),
        "decimals true": _asset(decimals=True),
        "decimals null": _asset(decimals=None),
        "unknown field": _asset(symbol="G"),
    },
}


@pytest.mark.parametrize("group", BAD_ASSET_BODIES)
async def test_invalid_define_asset_bodies_are_refused_and_change_nothing(funded: Client, group: str) -> None:
    client = funded
    before = await ledger_state(client, "alice")
    refusals = Refusals()
    for case, body in BAD_ASSET_BODIES[group].items():
        response = await post(client, "/v1/assets", **_send(body))
        refusals.check(case, response, 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice") == before


async def test_a_body_over_the_limit_is_refused_before_it_is_read(
    funded: Client, live_server: LiveServer
) -> None:
    """64 KiB by default: 413 payload_too_large, whether or not the client declared the length."""
    client = funded
    before = await ledger_state(client, "alice")
    padding = "x" * (64 * 1024)
    body = b'{"asset": "GOLD", "amount": 1, "reference": "' + padding.encode() + b'"}'
    response = await post(client, "/v1/wallets/alice/top-ups", raw=body)
    assert_problem(response, 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: enforced while reading
        yield body[:1000]
        yield body[1000:]

    headers = {**AUTH, "Idempotency-Key": uuid.uuid4().hex, "Content-Type": "application/json"}
    async with httpx.AsyncClient(base_url=live_server.url) as http:
        response = await http.post("/v1/wallets/alice/top-ups", content=chunks(), headers=headers)
    assert "content-length" not in response.request.headers
    assert_problem(response, 413, "payload_too_large")
    assert await ledger_state(client, "alice") == before


async def test_a_trailing_newline_does_not_make_a_valid_identifier(funded: Client) -> None:
    """Codes and user ids are whole-string patterns: "GOLD\\n" is not an asset code and
    "carol\\n" is not a user id, in a body, a path or a query."""
    client = funded
    before = await ledger_state(client, "alice", "carol")
    refusals = Refusals()
    refusals.check(
        "define asset GEMS\\n",
        await post(client, "/v1/assets", _asset(code="GEMS\n")),
        400,
        "invalid_request",
    )
    refusals.check(
        "open wallet carol\\n",
        await post(client, "/v1/wallets", {"user_id": "carol\n"}),
        400,
        "invalid_request",
    )
    for flow in FLOWS:
        response = await post(client, f"/v1/wallets/alice/{flow}", _move(asset="GOLD\n"))
        refusals.check(f"{flow} of GOLD\\n", response, 400, "invalid_request")
        response = await post(client, f"/v1/wallets/alice%0A/{flow}", _move())
        refusals.check(f"{flow} on wallet alice\\n", response, 400, "invalid_request")
    refusals.check("GET wallet alice\\n", await client.get("/v1/wallets/alice%0A"), 400, "invalid_request")
    response = await get(client, "/v1/wallets/alice/transactions", asset="GOLD\n")
    refusals.check("history filtered by GOLD\\n", response, 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice", "carol") == before


# --- Idempotency-Key -------------------------------------------------------------------------

VALID_POSTS: dict[str, tuple[str, dict[str, Any]]] = {
    "define asset": ("/v1/assets", {"code": "GEMS", "name": "Gems", "decimals": 0}),
    "open wallet": ("/v1/wallets", {"user_id": "carol"}),
    "top-up": ("/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 5}),
    "bonus": ("/v1/wallets/alice/bonuses", {"asset": "GOLD", "amount": 5}),
    "spend": ("/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 5}),
}


async def test_a_post_without_idempotency_key_is_refused(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice", "carol")
    refusals = Refusals()
    for case, (path, body) in VALID_POSTS.items():
        response = await post(client, path, body, send_key=False)
        refusals.check(case, response, 400, "idempotency_key_missing")
    refusals.assert_none()
    assert await ledger_state(client, "alice", "carol") == before


BAD_KEYS: dict[str, str | bytes] = {
    "256 characters": "k" * 256,
    "1000 characters": "k" * 1000,
    "a control character": "key\x01",
    "DEL": "key\x7f",
    "a tab": "key\tkey",
    "a trailing newline": "key\n",
    "non-ASCII": "clé-1".encode(),
}


async def test_a_malformed_idempotency_key_is_refused(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice", "carol")
    refusals = Refusals()
    for case, (path, body) in VALID_POSTS.items():
        for key_case, key in BAD_KEYS.items():
            response = await post(client, path, body, send_key=False, headers={"Idempotency-Key": key})
            refusals.check(f"{case} with a key of {key_case}", response, 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice", "carol") == before


async def test_an_empty_idempotency_key_is_refused(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice")
    response = await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 5}, key="")
    assert response.status_code == 400
    assert response.json()["code"] in {"invalid_request", "idempotency_key_missing"}
    assert_problem(response, 400, response.json()["code"])
    assert await ledger_state(client, "alice") == before


# --- If-Match --------------------------------------------------------------------------------


async def test_a_malformed_if_match_is_refused(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice")
    refusals = Refusals()
    for flow in FLOWS:
        for if_match in [
            "abc",
            '"abc"',
            '"-1"',
            '"1.5"',
            '"2", "3"',
            "v2",
            '"99999999999999999999"',
            'W/"2"',
        ]:
            response = await post(
                client, f"/v1/wallets/alice/{flow}", _move(amount=5), headers={"If-Match": if_match}
            )
            refusals.check(f"{flow} with If-Match {if_match}", response, 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice") == before


# --- not found -------------------------------------------------------------------------------


async def test_a_command_on_an_unknown_wallet_is_not_found(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice", "nobody")
    refusals = Refusals()
    for flow in FLOWS:
        response = await post(client, f"/v1/wallets/nobody/{flow}", _move(amount=5))
        refusals.check(flow, response, 404, "wallet_not_found")
    refusals.assert_none()
    assert await ledger_state(client, "alice", "nobody") == before


async def test_a_command_with_an_undefined_asset_is_not_found(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice")
    refusals = Refusals()
    for flow in FLOWS:
        response = await post(client, f"/v1/wallets/alice/{flow}", _move(asset="SILVER", amount=5))
        refusals.check(flow, response, 404, "asset_not_found")
    refusals.assert_none()
    assert await ledger_state(client, "alice") == before


async def test_an_unknown_wallet_is_not_found(funded: Client) -> None:
    client = funded
    token = await sync_token(client)
    assert_problem(await get(client, "/v1/wallets/nobody", token), 404, "wallet_not_found")
    assert_problem(await get(client, "/v1/wallets/nobody"), 404, "wallet_not_found")
    assert_problem(await get(client, "/v1/wallets/Alice", token), 404, "wallet_not_found")
    assert_problem(await get(client, "/v1/wallets/nobody/transactions", token), 404, "wallet_not_found")
    response = await get(client, "/v1/wallets/nobody/transactions", token, asset="GOLD", limit=1, cursor="v5")
    assert_problem(response, 404, "wallet_not_found")


async def test_an_unknown_transaction_is_not_found(funded: Client) -> None:
    client = funded
    token = await sync_token(client)
    refusals = Refusals()
    for transaction_id in [str(uuid.uuid4()), uuid.uuid4().hex, "not-a-uuid", "12345", "' OR 1=1 --"]:
        for params in ({"consistent_with": token}, {}):
            response = await client.get(f"/v1/transactions/{transaction_id}", params=params)
            refusals.check(f"{transaction_id} {params}", response, 404, "transaction_not_found")
    refusals.assert_none()


async def test_an_unknown_route_is_a_problem_404(funded: Client) -> None:
    client = funded
    refusals = Refusals()
    for method, path in [
        ("GET", "/v1/nothing-here"),
        ("GET", "/nope"),
        ("GET", "/v1/wallets/alice/balances"),
        ("POST", "/v1/wallets/alice/withdrawals"),
        ("POST", "/v2/wallets"),
    ]:
        response = await client.request(
            method, path, json=_move(amount=5), headers={"Idempotency-Key": uuid.uuid4().hex}
        )
        refusals.check(f"{method} {path}", response, 404, "not_found")
    refusals.assert_none()


async def test_a_wrong_method_is_a_problem(funded: Client) -> None:
    client = funded
    response = await client.delete("/v1/wallets/alice")
    assert response.status_code == 405
    assert response.headers["content-type"].startswith("application/problem+json")
    assert_no_traceback(response)
    assert response.json()["status"] == 405
    assert set(response.headers["allow"].replace(" ", "").split(",")) >= {"GET"}  # RFC 9110 §15.5.6


# --- conflicts -------------------------------------------------------------------------------


async def test_conflicts_change_nothing(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice")
    assert_problem(await post(client, "/v1/wallets", {"user_id": "alice"}), 409, "wallet_exists")
    response = await post(client, "/v1/assets", {"code": "GOLD", "name": "G", "decimals": 0})
    assert_problem(response, 409, "asset_exists")
    for amount in (1001, MAX_AMOUNT):
        response = await post(client, "/v1/wallets/alice/spends", _move(amount=amount))
        assert_problem(response, 409, "insufficient_funds")
    response = await post(client, "/v1/wallets/alice/spends", _move(amount=1), headers={"If-Match": '"1"'})
    assert_problem(response, 412, "version_mismatch")
    assert await ledger_state(client, "alice") == before


# --- query parameters ------------------------------------------------------------------------


async def test_a_malformed_consistency_token_is_refused(funded: Client) -> None:
    client = funded
    refusals = Refusals()
    paths = [
        "/v1/assets",
        "/v1/wallets/alice",
        "/v1/wallets/alice/transactions",
        "/v1/system/balances",
        f"/v1/transactions/{uuid.uuid4()}",
    ]
    for path in paths:
        for token in ["nope", "", "1", "1.", ".1", "a.b", "1.2.3", "-1.5", "1.-5", "1 .2", "1" * 50]:
            response = await client.get(path, params={"consistent_with": token})
            refusals.check(f"{path} consistent_with={token!r}", response, 400, "invalid_request")
    refusals.assert_none()


async def test_a_cursor_this_api_did_not_issue_is_refused(funded: Client) -> None:
    client = funded
    refusals = Refusals()
    for cursor in ["nope", "", "v", "vx", "v-1", "12", "v1.5", "V3", "v 3", "v3v", "v" + "9" * 40]:
        response = await get(client, "/v1/wallets/alice/transactions", cursor=cursor)
        refusals.check(f"cursor={cursor!r}", response, 400, "invalid_request")
    refusals.assert_none()


async def test_a_cursor_beyond_any_wallet_version_is_refused(funded: Client) -> None:
    """A cursor-shaped value too large for a wallet version is still not a cursor this API issued:
    a client error, never a server error."""
    client = funded
    refusals = Refusals()
    for cursor in ["v9223372036854775808", "v" + "9" * 19]:
        response = await get(client, "/v1/wallets/alice/transactions", cursor=cursor)
        refusals.check(f"cursor={cursor!r}", response, 400, "invalid_request")
    refusals.assert_none()


async def test_malformed_history_parameters_are_refused(funded: Client) -> None:
    client = funded
    refusals = Refusals()
    for limit in ["0", "201", "-1", "abc", "1.5", "", "1000000000000000000000"]:
        response = await get(client, "/v1/wallets/alice/transactions", limit=limit)
        refusals.check(f"limit={limit!r}", response, 400, "invalid_request")
    for asset in ["gold", "G", "G" * 17, "GO-LD"]:
        response = await get(client, "/v1/wallets/alice/transactions", asset=asset)
        refusals.check(f"asset={asset!r}", response, 400, "invalid_request")
    refusals.assert_none()


async def test_a_malformed_user_id_in_the_path_is_refused(funded: Client) -> None:
    client = funded
    before = await ledger_state(client, "alice")
    refusals = Refusals()
    for user_id in ["a" * 65, "bad!user", "bad%20user", "caf%C3%A9", "a:b"]:
        response = await client.get(f"/v1/wallets/{user_id}")
        refusals.check(f"GET wallet {user_id}", response, 400, "invalid_request")
        response = await client.get(f"/v1/wallets/{user_id}/transactions")
        refusals.check(f"GET history {user_id}", response, 400, "invalid_request")
        for flow in FLOWS:
            response = await post(client, f"/v1/wallets/{user_id}/{flow}", _move(amount=5))
            refusals.check(f"{flow} {user_id}", response, 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice") == before


async def test_as_of_at_the_ends_of_time_is_answered(funded: Client) -> None:
    """Times whose UTC is outside the calendar (year 0, year 10000) mean before and after the ledger."""
    client = funded
    for before_anything in ("0001-01-01T00:00:00+14:00", "0001-01-01T00:00:00", "0"):
        response = await get(client, "/v1/wallets/alice", as_of=before_anything)
        assert_problem(response, 404, "wallet_not_found")
        assert "0001-01-01T00:00:00.000000Z" in response.json()["detail"] or before_anything == "0"
    for after_everything in ("9999-12-31T23:59:59-14:00", "9999-12-31T23:59:59.999999", str(2**63 - 1)):
        response = await get(client, "/v1/wallets/alice", as_of=after_everything)
        assert response.status_code == 200, response.text
        assert response.json()["balances"] == [
            {"asset": "GOLD", "balance": 1000, "held": 0, "available": 1000}
        ]
    for nonsense in (str(2**63), "-1", "1e3", "\u0661", "2024-13-01", "now"):
        response = await get(client, "/v1/wallets/alice", as_of=nonsense)
        assert_problem(response, 400, "invalid_request")


async def test_odd_bytes_in_headers_are_refused_not_failed(funded: Client) -> None:
    """NUL bytes, control characters and bytes beyond ASCII in every header the API reads: a 4xx
    problem, never a 500, and nothing recorded; a request id that is not a sane token is replaced."""
    client = funded
    before = await ledger_state(client, "alice")
    odd = [b"a\x00b", b"\x01\x02", "é".encode(), b"\xff\xfe", b"Bearer tally_sk_" + "é".encode() * 20]
    expected = {"Idempotency-Key": (400, "invalid_request"), "If-Match": (400, "invalid_request"),
                "Authorization": (401, "unauthenticated")}  # fmt: skip
    refusals = Refusals()
    for value in odd:
        for name, (status, code) in expected.items():
            headers = {"Idempotency-Key": uuid.uuid4().hex, name: value}
            response = await client.post(
                "/v1/wallets/alice/spends", content=b'{"asset": "GOLD", "amount": 1}', headers=headers
            )
            refusals.check(f"{name}: {value!r}", response, status, code)
        read = await client.get("/v1/wallets/alice", headers={"X-Request-ID": value, "If-None-Match": value})
        assert read.status_code == 200, read.text
        assert read.headers["x-request-id"].encode() != value
    refusals.assert_none()
    assert await ledger_state(client, "alice") == before
