"""Idempotency-Key over HTTP: retries replay the first outcome with one effect; a key is bound to
one request; decided rejections replay too; refused-as-invalid requests do not use up the key."""

from __future__ import annotations

from typing import Any

import msgspec

from api.dto import MoveCreditsRequest
from commands import CommandContext, EventStore
from domain import TopUpCredits
from tests.api.support import (
    Client,
    Refusals,
    assert_problem,
    balance_of,
    created,
    define_asset,
    get_json,
    ledger_state,
    new_key,
    open_wallet,
    post,
    top_up,
)
from tests.helpers import TEST_CLIENT, TEST_CLIENT_ID


def assert_replay(first: Any, again: Any) -> None:
    assert again.status_code == first.status_code
    assert again.headers["idempotent-replayed"] == "true"
    assert again.headers["content-type"] == first.headers["content-type"]
    assert again.content == first.content
    assert again.json() == first.json()


async def _funded(client: Client, amount: int = 1000) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", amount)


async def test_a_retried_transaction_replays_and_has_one_effect(client: Client) -> None:
    await _funded(client)
    expected_balance = 1000
    for version, (flow, delta) in enumerate([("top-ups", 100), ("bonuses", 100), ("spends", -100)], start=3):
        key = new_key()
        body = {"asset": "GOLD", "amount": 100, "reference": f"r-{flow}", "metadata": {"a": "b"}}
        first = await post(client, f"/v1/wallets/alice/{flow}", body, key)
        assert created(first)["wallet_version"] == version
        again = await post(client, f"/v1/wallets/alice/{flow}", body, key)
        third = await post(client, f"/v1/wallets/alice/{flow}", body, key)
        assert_replay(first, again)
        assert_replay(first, third)

        expected_balance += delta
        assert await balance_of(client, "alice") == expected_balance
        _, wallet, etag, _, history = (await ledger_state(client, "alice"))["alice"]
        assert wallet["version"] == version
        assert etag == f'"{version}"'
        assert len(history["items"]) == version - 1
        assert history["items"][0] == first.json()


async def test_a_retry_with_keys_in_another_order_is_the_same_request(client: Client) -> None:
    await _funded(client)
    key = new_key()
    first = await post(client, "/v1/wallets/alice/top-ups", raw=b'{"asset": "GOLD", "amount": 5}', key=key)
    created(first)
    again = await post(client, "/v1/wallets/alice/top-ups", raw=b'{"amount":5,"asset":"GOLD"}', key=key)
    assert_replay(first, again)
    assert await balance_of(client, "alice") == 1005


async def test_a_retry_with_metadata_keys_in_another_order_is_the_same_request(client: Client) -> None:
    await _funded(client)
    key = new_key()
    first_body = b'{"asset": "GOLD", "amount": 5, "metadata": {"a": "1", "b": "2"}}'
    first = await post(client, "/v1/wallets/alice/top-ups", raw=first_body, key=key)
    created(first)
    again_body = b'{"metadata": {"b": "2", "a": "1"}, "amount": 5, "asset": "GOLD"}'
    again = await post(client, "/v1/wallets/alice/top-ups", raw=again_body, key=key)
    assert_replay(first, again)
    other = await post(
        client,
        "/v1/wallets/alice/top-ups",
        raw=b'{"asset": "GOLD", "amount": 5, "metadata": {"a": "1"}}',
        key=key,
    )
    assert other.status_code == 422
    assert await balance_of(client, "alice") == 1005


async def test_a_key_recorded_before_fingerprints_sorted_keys_keeps_replaying(
    client: Client, store: EventStore
) -> None:
    """Earlier releases hashed the body with its objects' keys in the order sent: a command they
    recorded replays its retry (sent as before) all the same."""
    await _funded(client)
    path = "/v1/wallets/alice/top-ups"
    body = MoveCreditsRequest(asset="GOLD", amount=5, metadata={"b": "2", "a": "1"})
    key = new_key()
    as_before = CommandContext(
        command_id=key,
        client_id=TEST_CLIENT_ID,
        created_by=TEST_CLIENT,
        fingerprint=CommandContext.fingerprint_of("POST", path, msgspec.json.encode(body), ""),
    )
    recorded = await store.post_transaction(
        as_before, TopUpCredits(user_id="alice", **msgspec.structs.asdict(body))
    )
    again = await post(
        client, path, raw=b'{"asset": "GOLD", "amount": 5, "metadata": {"b": "2", "a": "1"}}', key=key
    )
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == msgspec.json.decode(recorded.body)
    assert await balance_of(client, "alice") == 1005


async def test_a_retried_define_asset_replays(client: Client) -> None:
    key = new_key()
    body = {"code": "GOLD", "name": "Gold", "decimals": 2}
    first = await post(client, "/v1/assets", body, key)
    created(first)
    again = await post(client, "/v1/assets", body, key)
    assert_replay(first, again)
    listed = await get_json(client, "/v1/assets", again.json()["consistency_token"])
    assert len(listed["items"]) == 1


async def test_a_retried_open_wallet_replays(client: Client) -> None:
    key = new_key()
    body = {"user_id": "alice", "metadata": {"tier": "gold"}}
    first = await post(client, "/v1/wallets", body, key)
    created(first)
    again = await post(client, "/v1/wallets", body, key)
    assert_replay(first, again)
    wallet = await get_json(client, "/v1/wallets/alice", again.json()["consistency_token"])
    assert wallet["version"] == 1


async def test_conflicts_are_replayed(client: Client) -> None:
    await open_wallet(client, "alice")
    await define_asset(client, "GOLD")
    key = new_key()
    first = await post(client, "/v1/wallets", {"user_id": "alice"}, key)
    assert_problem(first, 409, "wallet_exists")
    again = await post(client, "/v1/wallets", {"user_id": "alice"}, key)
    assert_problem(again, 409, "wallet_exists")
    assert_replay(first, again)

    key = new_key()
    body = {"code": "GOLD", "name": "Gold", "decimals": 2}
    first = await post(client, "/v1/assets", body, key)
    assert_problem(first, 409, "asset_exists")
    again = await post(client, "/v1/assets", body, key)
    assert_replay(first, again)


async def test_the_first_response_is_not_marked_replayed(client: Client) -> None:
    await define_asset(client)
    response = await post(client, "/v1/wallets", {"user_id": "alice"})
    assert response.status_code == 201
    assert "idempotent-replayed" not in response.headers
    refused = await post(client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 1})
    assert_problem(refused, 409, "insufficient_funds")
    assert "idempotent-replayed" not in refused.headers


async def test_insufficient_funds_is_replayed_even_after_a_top_up(client: Client) -> None:
    await _funded(client, 50)
    key = new_key()
    body = {"asset": "GOLD", "amount": 80}
    first = await post(client, "/v1/wallets/alice/spends", body, key)
    assert_problem(first, 409, "insufficient_funds")

    await top_up(client, "alice", 100)  # now the wallet could afford it; the decision stands
    again = await post(client, "/v1/wallets/alice/spends", body, key)
    assert_problem(again, 409, "insufficient_funds")
    assert_replay(first, again)
    assert await balance_of(client, "alice") == 150

    fresh = await post(client, "/v1/wallets/alice/spends", body)
    assert created(fresh)["balance_after"] == 70


async def test_version_mismatch_is_replayed(client: Client) -> None:
    await _funded(client)
    key = new_key()
    body = {"asset": "GOLD", "amount": 1}
    headers = {"If-Match": '"1"'}
    first = await post(client, "/v1/wallets/alice/top-ups", body, key, headers)
    assert_problem(first, 412, "version_mismatch")
    again = await post(client, "/v1/wallets/alice/top-ups", body, key, headers)
    assert_replay(first, again)
    assert await balance_of(client, "alice") == 1000


REUSES: dict[str, tuple[str, dict[str, Any], dict[str, str] | None]] = {
    "another amount": ("/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 101}, None),
    "a reference added": (
        "/v1/wallets/alice/top-ups",
        {"asset": "GOLD", "amount": 100, "reference": "x"},
        None,
    ),
    "metadata added": (
        "/v1/wallets/alice/top-ups",
        {"asset": "GOLD", "amount": 100, "metadata": {"a": "b"}},
        None,
    ),
    "another asset": ("/v1/wallets/alice/top-ups", {"asset": "GEMS", "amount": 100}, None),
    "an If-Match added": ("/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 100}, {"If-Match": '"2"'}),
    "the bonus path": ("/v1/wallets/alice/bonuses", {"asset": "GOLD", "amount": 100}, None),
    "the spend path": ("/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 100}, None),
    "another wallet": ("/v1/wallets/bob/top-ups", {"asset": "GOLD", "amount": 100}, None),
    "opening a wallet": ("/v1/wallets", {"user_id": "carol"}, None),
    "defining an asset": ("/v1/assets", {"code": "SILVER", "name": "Silver", "decimals": 0}, None),
}


async def test_a_key_reused_for_another_request_is_refused(client: Client) -> None:
    await _funded(client)
    await define_asset(client, "GEMS")
    await open_wallet(client, "bob")
    key = new_key()
    first = await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 100}, key)
    created(first)
    before = await ledger_state(client, "alice", "bob", "carol")

    refusals = Refusals()
    for case, (path, body, headers) in REUSES.items():
        response = await post(client, path, body, key, headers)
        refusals.check(case, response, 422, "idempotency_key_reused")
    refusals.assert_none()
    assert await ledger_state(client, "alice", "bob", "carol") == before
    # and the key still replays its own request
    assert_replay(
        first, await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 100}, key)
    )


async def test_a_key_reused_after_a_rejection_is_refused(client: Client) -> None:
    await _funded(client, 10)
    key = new_key()
    assert_problem(
        await post(client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 11}, key),
        409,
        "insufficient_funds",
    )
    before = await ledger_state(client, "alice")
    response = await post(client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 5}, key)
    assert_problem(response, 422, "idempotency_key_reused")
    assert await ledger_state(client, "alice") == before


async def test_a_key_is_not_used_up_by_an_invalid_request(client: Client) -> None:
    await _funded(client)
    key = new_key()
    invalid = await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": "100"}, key)
    assert_problem(invalid, 400, "invalid_request")
    bad_if_match = await post(
        client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 7}, key, {"If-Match": "abc"}
    )
    assert_problem(bad_if_match, 400, "invalid_request")

    valid = await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 100}, key)
    assert created(valid)["balance_after"] == 1100
    again = await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 100}, key)
    assert_replay(valid, again)
    assert await balance_of(client, "alice") == 1100


async def test_a_key_is_not_used_up_by_an_invalid_open_wallet(client: Client) -> None:
    key = new_key()
    assert_problem(await post(client, "/v1/wallets", {"user_id": "bad user"}, key), 400, "invalid_request")
    assert_problem(
        await post(client, "/v1/assets", {"code": "gold", "name": "G", "decimals": 0}, key),
        400,
        "invalid_request",
    )
    response = await post(client, "/v1/wallets", {"user_id": "alice"}, key)
    assert created(response)["user_id"] == "alice"


async def test_a_key_is_not_used_up_by_an_unknown_wallet_or_asset(client: Client) -> None:
    """wallet_not_found and asset_not_found are not decisions on the ledger: a retry after the
    wallet or asset exists goes through."""
    key = new_key()
    body = {"asset": "GOLD", "amount": 100}
    assert_problem(await post(client, "/v1/wallets/alice/top-ups", body, key), 404, "asset_not_found")
    await define_asset(client)
    assert_problem(await post(client, "/v1/wallets/alice/top-ups", body, key), 404, "wallet_not_found")
    await open_wallet(client, "alice")
    response = await post(client, "/v1/wallets/alice/top-ups", body, key)
    assert created(response)["balance_after"] == 100
    assert await balance_of(client, "alice") == 100


async def test_any_printable_key_up_to_255_characters_works(client: Client) -> None:
    keys = ["k", "x" * 255, '~!@#$%^&*()_+{}|:<>?`-=[]\\;\',./ "quoted"', "a key with spaces"]
    for i, key in enumerate(keys):
        first = await post(client, "/v1/wallets", {"user_id": f"user-{i}"}, key)
        created(first)
        again = await post(client, "/v1/wallets", {"user_id": f"user-{i}"}, key)
        assert_replay(first, again)


async def test_keys_are_case_sensitive(client: Client) -> None:
    await _funded(client)
    created(await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 1}, "Key-A"))
    created(await post(client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 1}, "key-a"))
    assert await balance_of(client, "alice") == 1002
