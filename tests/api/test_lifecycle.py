"""The purchase lifecycle over HTTP: reversals (refunds, claw-backs) and holds (authorize, capture,
void, expire)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from api.keys import create_client
from tests.api.support import (
    Client,
    assert_problem,
    created,
    define_asset,
    get,
    get_json,
    ledger_state,
    open_wallet,
    post,
    spend,
    sync_token,
    top_up,
)


async def _setup(client: Client, user_id: str = "alice", funds: int = 1000) -> dict[str, Any]:
    await define_asset(client)
    await open_wallet(client, user_id)
    return await top_up(client, user_id, funds, reference="pay_1")


async def _wallet(client: Client, user_id: str) -> dict[str, Any]:
    token = await sync_token(client)
    wallet: dict[str, Any] = await get_json(client, f"/v1/wallets/{user_id}", token)
    [gold] = [b for b in wallet["balances"] if b["asset"] == "GOLD"]
    return dict(gold)


# --- reversals -------------------------------------------------------------------------------


async def test_a_reversal_negates_the_original_and_is_linked_both_ways(client: Client) -> None:
    original = await _setup(client)
    response = await post(
        client, f"/v1/transactions/{original['transaction_id']}/reversals",
        {"amount": 300, "reason": "chargeback", "reference": "cb_1"},
    )  # fmt: skip
    reversal = created(response)
    assert reversal["kind"] == "reversal"
    assert reversal["reverses"] == original["transaction_id"]
    assert reversal["amount"] == 300
    assert reversal["reason"] == "chargeback"
    assert reversal["entries"] == [
        {"account": "system:treasury", "amount": 300},
        {"account": "user:alice", "amount": -300},
    ]
    assert reversal["balance_after"] == 700
    assert await _wallet(client, "alice") == {"asset": "GOLD", "balance": 700, "held": 0, "available": 700}

    shown = await get_json(
        client, f"/v1/transactions/{original['transaction_id']}", reversal["consistency_token"]
    )
    assert shown["reversed_amount"] == 300
    assert shown["reversals"] == [reversal["transaction_id"]]
    again = await get_json(
        client, f"/v1/transactions/{reversal['transaction_id']}", reversal["consistency_token"]
    )
    assert again["reverses"] == original["transaction_id"]
    assert "reversals" not in again
    history = await get_json(client, "/v1/wallets/alice/transactions", reversal["consistency_token"])
    assert [t["transaction_id"] for t in history["items"][:2]] == [
        reversal["transaction_id"], original["transaction_id"],
    ]  # fmt: skip
    system = await get_json(client, "/v1/system/balances", reversal["consistency_token"])
    assert system["balances"][0]["treasury"] == -700
    assert system["balances"][0]["sum"] == 0


async def test_partial_reversals_until_nothing_remains(client: Client) -> None:
    original = await _setup(client, funds=100)
    path = f"/v1/transactions/{original['transaction_id']}/reversals"
    created(await post(client, path, {"amount": 60}))
    refused = assert_problem(await post(client, path, {"amount": 41}), 409, "reversal_exceeds_remaining")
    assert refused["remaining"] == 40
    rest = created(await post(client, path, {}))  # the default: all that remains
    assert rest["amount"] == 40
    nothing = assert_problem(await post(client, path, {}), 409, "reversal_exceeds_remaining")
    assert nothing["remaining"] == 0
    assert (await _wallet(client, "alice"))["balance"] == 0


async def test_a_reversal_is_not_reversible_and_unknown_ids_are_not_found(client: Client) -> None:
    original = await _setup(client)
    reversal = created(
        await post(client, f"/v1/transactions/{original['transaction_id']}/reversals", {"amount": 1})
    )
    assert_problem(
        await post(client, f"/v1/transactions/{reversal['transaction_id']}/reversals", {}),
        409,
        "not_reversible",
    )
    assert_problem(
        await post(client, f"/v1/transactions/{uuid.uuid4()}/reversals", {}), 404, "transaction_not_found"
    )
    assert_problem(
        await post(client, "/v1/transactions/not-an-id/reversals", {}), 404, "transaction_not_found"
    )


async def test_reversing_a_top_up_cannot_take_more_than_is_available(client: Client) -> None:
    original = await _setup(client, funds=100)
    await spend(client, "alice", 80)
    before = await ledger_state(client, "alice")
    refused = assert_problem(
        await post(client, f"/v1/transactions/{original['transaction_id']}/reversals", {}),
        409,
        "insufficient_funds",
    )
    assert (refused["available"], refused["amount"]) == (20, 100)
    assert await ledger_state(client, "alice") == before
    created(await post(client, f"/v1/transactions/{original['transaction_id']}/reversals", {"amount": 20}))
    assert (await _wallet(client, "alice"))["balance"] == 0


async def test_a_refunded_spend_gives_the_credits_back(client: Client) -> None:
    await _setup(client, funds=100)
    purchase = await spend(client, "alice", 70)
    refund = created(await post(client, f"/v1/transactions/{purchase['transaction_id']}/reversals", {}))
    assert refund["entries"] == [
        {"account": "system:revenue", "amount": -70},
        {"account": "user:alice", "amount": 70},
    ]
    assert (await _wallet(client, "alice"))["balance"] == 100


async def test_a_reversal_replays_under_its_key(client: Client) -> None:
    original = await _setup(client)
    path = f"/v1/transactions/{original['transaction_id']}/reversals"
    first = created(await post(client, path, {"amount": 10}, key="refund-1"))
    again = await post(client, path, {"amount": 10}, key="refund-1")
    assert again.status_code == 201
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first
    assert_problem(await post(client, path, {"amount": 11}, key="refund-1"), 422, "idempotency_key_reused")
    assert (await _wallet(client, "alice"))["balance"] == 990


async def test_reversal_bodies_are_checked(client: Client) -> None:
    original = await _setup(client)
    path = f"/v1/transactions/{original['transaction_id']}/reversals"
    before = await ledger_state(client, "alice")
    for body in ({"amount": 0}, {"amount": "5"}, {"reason": "x" * 201}, {"reason": ""}, {"other": 1}):
        response = await post(client, path, body)
        assert response.status_code == 400, (body, response.text)
    assert await ledger_state(client, "alice") == before


# --- holds -----------------------------------------------------------------------------------


async def _hold(client: Client, user_id: str, amount: int, **extra: Any) -> dict[str, Any]:
    return created(
        await post(client, f"/v1/wallets/{user_id}/holds", {"asset": "GOLD", "amount": amount, **extra})
    )


async def test_a_hold_reserves_the_available_balance(client: Client) -> None:
    await _setup(client, funds=100)
    hold = await _hold(client, "alice", 70, reference="order-9", metadata={"sku": "x"})
    assert set(hold) == {
        "hold_id", "user_id", "asset", "amount", "captured", "remaining", "status", "expires_at", "reference",
        "metadata", "created_at", "consistency_token",
    }  # fmt: skip
    assert (hold["amount"], hold["captured"], hold["remaining"], hold["status"]) == (70, 0, 70, "active")
    assert await _wallet(client, "alice") == {"asset": "GOLD", "balance": 100, "held": 70, "available": 30}
    refused = assert_problem(
        await post(client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 31}),
        409,
        "insufficient_funds",
    )
    assert (refused["balance"], refused["held"], refused["available"]) == (100, 70, 30)
    assert_problem(
        await post(client, "/v1/wallets/alice/holds", {"asset": "GOLD", "amount": 31}),
        409,
        "insufficient_funds",
    )
    await spend(client, "alice", 30)
    shown = await get_json(client, f"/v1/holds/{hold['hold_id']}", await sync_token(client))
    assert shown == hold


async def test_captures_partial_then_final(client: Client) -> None:
    await _setup(client, funds=100)
    hold = await _hold(client, "alice", 60)
    path = f"/v1/holds/{hold['hold_id']}/captures"
    first = created(await post(client, path, {"amount": 20, "final": False}))
    assert (first["kind"], first["hold_id"], first["amount"]) == ("spend", hold["hold_id"], 20)
    assert first["entries"] == [
        {"account": "system:revenue", "amount": 20},
        {"account": "user:alice", "amount": -20},
    ]
    assert await _wallet(client, "alice") == {"asset": "GOLD", "balance": 80, "held": 40, "available": 40}
    refused = assert_problem(await post(client, path, {"amount": 41}), 409, "capture_exceeds_hold")
    assert refused["remaining"] == 40
    last = created(await post(client, path, {"amount": 25}))  # final: the other 15 are released
    assert last["balance_after"] == 55
    assert await _wallet(client, "alice") == {"asset": "GOLD", "balance": 55, "held": 0, "available": 55}
    shown = await get_json(client, f"/v1/holds/{hold['hold_id']}", last["consistency_token"])
    assert (shown["status"], shown["captured"], shown["remaining"]) == ("captured", 45, 0)
    assert_problem(await post(client, path, {}), 409, "hold_not_active")
    assert_problem(await post(client, f"/v1/holds/{hold['hold_id']}/void"), 409, "hold_not_active")
    history = await get_json(client, "/v1/wallets/alice/transactions", last["consistency_token"])
    assert [t.get("hold_id") for t in history["items"][:2]] == [hold["hold_id"]] * 2


async def test_a_void_releases_the_hold(client: Client) -> None:
    await _setup(client, funds=100)
    hold = await _hold(client, "alice", 60)
    response = await post(client, f"/v1/holds/{hold['hold_id']}/void", {"reason": "order cancelled"})
    assert response.status_code == 200, response.text
    voided = response.json()
    assert (voided["status"], voided["remaining"], voided["captured"]) == ("voided", 0, 0)
    assert await _wallet(client, "alice") == {"asset": "GOLD", "balance": 100, "held": 0, "available": 100}
    assert_problem(await post(client, f"/v1/holds/{hold['hold_id']}/captures", {}), 409, "hold_not_active")
    assert_problem(await post(client, f"/v1/holds/{uuid.uuid4()}/void"), 404, "hold_not_found")
    # The body is optional, and strict when sent: empty, JSON null, or {"reason": ...}
    other = await _hold(client, "alice", 10)
    empty = await post(client, f"/v1/holds/{other['hold_id']}/void", raw=b"")
    assert empty.status_code == 200, empty.text
    for bad in (b"[]", b'{"reason": ""}', b'{"why": "x"}', b"{"):
        assert_problem(
            await post(client, f"/v1/holds/{other['hold_id']}/void", raw=bad), 400, "invalid_request"
        )
    assert_problem(await post(client, "/v1/holds/nope/captures", {}), 404, "hold_not_found")


async def test_an_expired_hold_holds_nothing_without_any_request(client: Client) -> None:
    await _setup(client, funds=100)
    hold = await _hold(client, "alice", 60, expires_in_seconds=1)
    assert (await _wallet(client, "alice"))["available"] == 40
    # Not a sleep that hopes: wait until the database's own clock is past the hold's expiry.
    response = await get(client, f"/v1/holds/{hold['hold_id']}")
    while response.json()["status"] == "active":
        response = await get(client, f"/v1/holds/{hold['hold_id']}")
    assert (response.json()["status"], response.json()["remaining"]) == ("expired", 0)
    assert await _wallet(client, "alice") == {"asset": "GOLD", "balance": 100, "held": 0, "available": 100}
    assert_problem(await post(client, f"/v1/holds/{hold['hold_id']}/captures", {}), 409, "hold_expired")
    assert_problem(await post(client, f"/v1/holds/{hold['hold_id']}/void"), 409, "hold_expired")
    await spend(client, "alice", 100)


async def test_wallet_holds_are_listed_and_filtered(client: Client) -> None:
    await _setup(client, funds=100)
    holds = [await _hold(client, "alice", 10) for _ in range(3)]
    created(await post(client, f"/v1/holds/{holds[0]['hold_id']}/captures", {}))
    token = await sync_token(client)
    page = await get_json(client, "/v1/wallets/alice/holds", token, limit=2)
    assert [h["hold_id"] for h in page["items"]] == [holds[2]["hold_id"], holds[1]["hold_id"]]
    rest = await get_json(client, "/v1/wallets/alice/holds", token, limit=2, cursor=page["next_cursor"])
    assert [h["hold_id"] for h in rest["items"]] == [holds[0]["hold_id"]]
    assert rest["next_cursor"] is None
    captured = await get_json(client, "/v1/wallets/alice/holds", token, status="captured")
    assert [h["hold_id"] for h in captured["items"]] == [holds[0]["hold_id"]]
    assert_problem(await get(client, "/v1/wallets/nobody/holds", token), 404, "wallet_not_found")
    assert (await get(client, "/v1/wallets/alice/holds", status="gone")).status_code == 400


async def test_hold_commands_replay_and_check_their_bodies(client: Client) -> None:
    await _setup(client, funds=100)
    body = {"asset": "GOLD", "amount": 10}
    first = created(await post(client, "/v1/wallets/alice/holds", body, key="h-1"))
    again = await post(client, "/v1/wallets/alice/holds", body, key="h-1")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first
    void = await post(client, f"/v1/holds/{first['hold_id']}/void", key="v-1")
    replay = await post(client, f"/v1/holds/{first['hold_id']}/void", key="v-1")
    assert replay.json() == void.json()
    assert replay.headers["idempotent-replayed"] == "true"
    before = await ledger_state(client, "alice")
    for bad in ({"asset": "GOLD", "amount": 10, "expires_in_seconds": 0},
                {"asset": "GOLD", "amount": 10, "expires_in_seconds": 30 * 86400 + 1},
                {"asset": "GOLD", "amount": 0}, {"asset": "GOLD"}):  # fmt: skip
        assert (await post(client, "/v1/wallets/alice/holds", bad)).status_code == 400, bad
    assert_problem(await post(client, "/v1/wallets/nobody/holds", body), 404, "wallet_not_found")
    assert_problem(
        await post(client, "/v1/wallets/alice/holds", {"asset": "NOPE", "amount": 1}), 404, "asset_not_found"
    )
    assert await ledger_state(client, "alice") == before


async def test_a_key_limited_to_other_assets_may_not_reverse_capture_or_void(
    client: Client, pool: asyncpg.Pool
) -> None:
    """The asset of a reversal, capture or void is the transaction's or hold's, known only in SQL:
    a key limited to GEMS is refused there (403 forbidden, nothing written, the key stays free)."""
    original = await _setup(client)
    hold = await _hold(client, "alice", 10)
    async with pool.acquire() as conn:
        limited = (
            await create_client(conn, "gems-only", ["credits:reverse", "holds:write"], assets=["GEMS"])
        ).secret
    headers = {"Authorization": f"Bearer {limited}"}
    before = await ledger_state(client, "alice")
    attempts = [
        (f"/v1/transactions/{original['transaction_id']}/reversals", {}),
        (f"/v1/holds/{hold['hold_id']}/captures", {}),
        (f"/v1/holds/{hold['hold_id']}/void", None),
    ]
    for path, body in attempts:
        refused = assert_problem(
            await post(client, path, body, key="same", headers=headers), 403, "forbidden"
        )
        assert refused["asset"] == "GOLD"
    assert await ledger_state(client, "alice") == before
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'same'") == 0
