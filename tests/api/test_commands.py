"""The command endpoints: define an asset, open a wallet, top up, grant a bonus, spend."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.api.support import (
    MAX_AMOUNT,
    Client,
    assert_problem,
    bonus,
    created,
    define_asset,
    get_json,
    ledger_state,
    open_wallet,
    post,
    spend,
    top_up,
)

TRANSACTION_FIELDS = {
    "transaction_id",
    "created_by",
    "kind",
    "user_id",
    "asset",
    "amount",
    "entries",
    "reference",
    "metadata",
    "balance_after",
    "wallet_version",
    "created_at",
    "consistency_token",
}


def _timestamp(value: str) -> datetime:
    parsed = datetime.fromisoformat(value)
    assert parsed.tzinfo is not None
    return parsed


# --- assets ----------------------------------------------------------------------------------


async def test_define_asset_returns_the_asset(client: Client) -> None:
    response = await post(client, "/v1/assets", {"code": "GOLD", "name": "Gold coins", "decimals": 2})
    body = created(response)
    assert set(body) == {"code", "name", "decimals", "created_at", "consistency_token"}
    assert (body["code"], body["name"], body["decimals"]) == ("GOLD", "Gold coins", 2)
    _timestamp(body["created_at"])


async def test_define_asset_accepts_the_boundaries(client: Client) -> None:
    cases = [("AB", "x", 0), ("A_1", "n" * 64, 18), ("Z" + "9" * 15, "sixteen chars", 7)]
    token = None
    for code, name, decimals in cases:
        body = created(await post(client, "/v1/assets", {"code": code, "name": name, "decimals": decimals}))
        assert (body["code"], body["name"], body["decimals"]) == (code, name, decimals)
        token = body["consistency_token"]
    listed = await get_json(client, "/v1/assets", token)
    assert sorted((a["code"], a["name"], a["decimals"]) for a in listed["items"]) == sorted(cases)


async def test_defining_an_asset_twice_is_a_conflict(client: Client) -> None:
    await define_asset(client, "GOLD", name="Gold")
    before = await ledger_state(client)
    response = await post(client, "/v1/assets", {"code": "GOLD", "name": "Other", "decimals": 0})
    assert_problem(response, 409, "asset_exists")
    assert await ledger_state(client) == before


# --- wallets ---------------------------------------------------------------------------------


async def test_open_wallet_returns_an_empty_wallet(client: Client) -> None:
    body = created(await post(client, "/v1/wallets", {"user_id": "alice"}))
    assert set(body) == {"user_id", "version", "balances", "metadata", "created_at", "consistency_token"}
    assert body["user_id"] == "alice"
    assert body["version"] == 1
    assert body["balances"] == []
    assert body["metadata"] == {}
    _timestamp(body["created_at"])


async def test_open_wallet_keeps_its_metadata(client: Client) -> None:
    metadata = {f"k{i}": "v" * 512 for i in range(15)} | {"k" * 64: ""}
    body = await open_wallet(client, "user.name@example-1_x", metadata)
    assert body["user_id"] == "user.name@example-1_x"
    assert body["metadata"] == metadata
    wallet = await get_json(client, "/v1/wallets/user.name@example-1_x", body["consistency_token"])
    assert wallet["metadata"] == metadata


async def test_open_wallet_accepts_a_64_character_user_id(client: Client) -> None:
    user_id = "u" * 64
    body = await open_wallet(client, user_id)
    wallet = await get_json(client, f"/v1/wallets/{user_id}", body["consistency_token"])
    assert wallet["user_id"] == user_id


async def test_opening_a_wallet_twice_is_a_conflict(client: Client) -> None:
    await open_wallet(client, "alice", {"tier": "gold"})
    before = await ledger_state(client, "alice")
    response = await post(client, "/v1/wallets", {"user_id": "alice", "metadata": {"tier": "silver"}})
    assert_problem(response, 409, "wallet_exists")
    assert await ledger_state(client, "alice") == before


# --- the three flows -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flow", "kind", "system_account"),
    [
        ("top-ups", "top_up", "system:treasury"),
        ("bonuses", "bonus", "system:bonus"),
    ],
)
async def test_credit_flows_move_from_a_system_account_to_the_user(
    client: Client, flow: str, kind: str, system_account: str
) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    response = await post(
        client,
        f"/v1/wallets/alice/{flow}",
        {"asset": "GOLD", "amount": 250, "reference": "pay-1", "metadata": {"channel": "ios"}},
    )
    body = created(response)
    assert set(body) == TRANSACTION_FIELDS
    assert body["kind"] == kind
    assert body["user_id"] == "alice"
    assert body["asset"] == "GOLD"
    assert body["amount"] == 250
    assert sorted(body["entries"], key=lambda e: e["account"]) == sorted(
        [{"account": system_account, "amount": -250}, {"account": "user:alice", "amount": 250}],
        key=lambda e: e["account"],
    )
    assert sum(e["amount"] for e in body["entries"]) == 0
    assert body["reference"] == "pay-1"
    assert body["metadata"] == {"channel": "ios"}
    assert body["balance_after"] == 250
    assert body["wallet_version"] == 2
    _timestamp(body["created_at"])

    wallet = await get_json(client, "/v1/wallets/alice", body["consistency_token"])
    assert wallet["balances"] == [{"asset": "GOLD", "balance": 250, "held": 0, "available": 250}]
    assert wallet["version"] == 2


async def test_spend_moves_from_the_user_to_revenue(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 1000)
    body = await spend(client, "alice", 300, reference="order-9")
    assert set(body) == TRANSACTION_FIELDS
    assert body["kind"] == "spend"
    assert body["amount"] == 300
    assert {e["account"]: e["amount"] for e in body["entries"]} == {
        "user:alice": -300,
        "system:revenue": 300,
    }
    assert len(body["entries"]) == 2
    assert body["reference"] == "order-9"
    assert body["metadata"] == {}
    assert body["balance_after"] == 700
    assert body["wallet_version"] == 3

    wallet = await get_json(client, "/v1/wallets/alice", body["consistency_token"])
    assert wallet["balances"] == [{"asset": "GOLD", "balance": 700, "held": 0, "available": 700}]


async def test_transaction_defaults(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    body = await top_up(client, "alice", 1)
    assert body["reference"] is None
    assert body["metadata"] == {}


async def test_spending_the_whole_balance_leaves_zero(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 40)
    await bonus(client, "alice", 2)
    body = await spend(client, "alice", 42)
    assert body["balance_after"] == 0
    wallet = await get_json(client, "/v1/wallets/alice", body["consistency_token"])
    assert wallet["balances"] == [{"asset": "GOLD", "balance": 0, "held": 0, "available": 0}]
    assert wallet["version"] == 4


async def test_amount_boundaries_are_accepted(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "whale")
    first = await top_up(client, "whale", MAX_AMOUNT)
    second = await top_up(client, "whale", MAX_AMOUNT)
    assert first["amount"] == MAX_AMOUNT
    assert second["balance_after"] == 2 * MAX_AMOUNT
    last = await spend(client, "whale", 1)
    assert last["balance_after"] == 2 * MAX_AMOUNT - 1
    wallet = await get_json(client, "/v1/wallets/whale", last["consistency_token"])
    assert wallet["balances"] == [
        {"asset": "GOLD", "balance": 2 * MAX_AMOUNT - 1, "held": 0, "available": 2 * MAX_AMOUNT - 1}
    ]


async def test_balances_are_kept_per_asset(client: Client) -> None:
    await define_asset(client, "GOLD")
    await define_asset(client, "GEMS", decimals=0)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 100, "GOLD")
    await bonus(client, "alice", 7, "GEMS")
    last = await spend(client, "alice", 3, "GEMS")
    assert last["balance_after"] == 4
    wallet = await get_json(client, "/v1/wallets/alice", last["consistency_token"])
    assert wallet["balances"] == [
        {"asset": "GEMS", "balance": 4, "held": 0, "available": 4},
        {"asset": "GOLD", "balance": 100, "held": 0, "available": 100},
    ]
    assert wallet["version"] == 4

    response = await post(client, "/v1/wallets/alice/spends", {"asset": "GEMS", "amount": 5})
    assert_problem(response, 409, "insufficient_funds")


async def test_spend_beyond_the_balance_is_refused_and_changes_nothing(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 100)
    before = await ledger_state(client, "alice")
    response = await post(client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 101})
    assert_problem(response, 409, "insufficient_funds")
    assert await ledger_state(client, "alice") == before


async def test_spend_from_an_empty_wallet_is_refused(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    response = await post(client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 1})
    assert_problem(response, 409, "insufficient_funds")


# --- If-Match --------------------------------------------------------------------------------


async def test_if_match_with_the_current_version_succeeds(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    last = await top_up(client, "alice", 100)
    for flow in ("top-ups", "bonuses", "spends"):
        wallet = await client.get("/v1/wallets/alice", params={"consistent_with": last["consistency_token"]})
        etag = wallet.headers["etag"]
        assert etag == f'"{last["wallet_version"]}"'
        response = await post(
            client, f"/v1/wallets/alice/{flow}", {"asset": "GOLD", "amount": 10}, headers={"If-Match": etag}
        )
        body = created(response)
        assert body["wallet_version"] == last["wallet_version"] + 1
        last = body
    assert last["balance_after"] == 110


async def test_if_match_with_a_stale_version_is_refused(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 100)
    await top_up(client, "alice", 100)
    before = await ledger_state(client, "alice")
    for flow in ("top-ups", "bonuses", "spends"):
        for stale in ('"1"', '"2"', '"4"'):
            response = await post(
                client,
                f"/v1/wallets/alice/{flow}",
                {"asset": "GOLD", "amount": 10},
                headers={"If-Match": stale},
            )
            assert_problem(response, 412, "version_mismatch")
    assert await ledger_state(client, "alice") == before


async def test_version_mismatch_is_decided_before_insufficient_funds(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    response = await post(
        client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 10}, headers={"If-Match": '"7"'}
    )
    assert_problem(response, 412, "version_mismatch")


async def test_if_match_follows_each_new_version(client: Client) -> None:
    await define_asset(client)
    opened = await open_wallet(client, "alice")
    version = opened["version"]
    for _ in range(3):
        response = await post(
            client,
            "/v1/wallets/alice/top-ups",
            {"asset": "GOLD", "amount": 5},
            headers={"If-Match": f'"{version}"'},
        )
        version = created(response)["wallet_version"]
    assert version == 4
    wallet = await client.get(
        "/v1/wallets/alice", params={"consistent_with": response.json()["consistency_token"]}
    )
    assert wallet.headers["etag"] == '"4"'
    assert wallet.json()["balances"] == [{"asset": "GOLD", "balance": 15, "held": 0, "available": 15}]
