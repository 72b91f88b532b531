"""POST /v1/batches over HTTP: each command decided as if sent alone, under its own key; atomic
batches all or nothing; the batch's key replays the whole answer; scopes per command; bad batches
refused whole, changing nothing."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import msgspec
import pytest

from api.app import create_app
from api.settings import Settings
from tests.api.support import (
    Client,
    Refusals,
    as_read,
    assert_problem,
    balance_of,
    define_asset,
    get_json,
    ledger_state,
    new_key,
    open_wallet,
    post,
    sync_token,
    top_up,
)
from tests.api.test_auth import bearer, make_key
from tests.conftest import serving
from tests.helpers import AUTH, api_client, holding_wallet, lock_waits, stream_balance

SEGMENT = {"top_up": "top-ups", "bonus": "bonuses", "spend": "spends"}


def cmd(kind: str, user_id: str, amount: int, key: str | None = None, **extra: Any) -> dict[str, Any]:
    return {
        "kind": kind,
        "user_id": user_id,
        "asset": "GOLD",
        "amount": amount,
        "key": key or new_key(),
        **extra,
    }


async def send(client: Client, commands: list[dict[str, Any]], key: str | None = None, **options: Any) -> Any:
    return await post(client, "/v1/batches", {"commands": commands, **options}, key)


def alone(client: Client, command: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
    """The command sent alone to its own route, under its key."""
    body = {k: v for k, v in command.items() if k not in {"kind", "user_id", "key"}}
    path = f"/v1/wallets/{command['user_id']}/{SEGMENT[command['kind']]}"
    return post(client, path, body, command["key"], headers)


async def test_each_command_is_decided_as_if_sent_alone(client: Client) -> None:
    await define_asset(client)
    for user in ("alice", "bob"):
        await open_wallet(client, user)
    await top_up(client, "alice", 100)
    commands = [
        cmd("top_up", "alice", 50, reference="pay_1"),
        cmd("spend", "alice", 120, metadata={"sku": "sword"}),
        cmd("spend", "bob", 10),
        cmd("bonus", "carol", 5),  # no wallet
        {**cmd("spend", "alice", 1), "asset": "SILVER"},  # no such asset
        cmd("bonus", "bob", 7),
    ]
    response = await send(client, commands)
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert [(r["index"], r["key"], r["status"]) for r in results] == [
        (i, c["key"], s)
        for i, (c, s) in enumerate(zip(commands, [201, 201, 409, 404, 404, 201], strict=True))
    ]
    assert not any(r.get("replayed") for r in results)
    assert results[0]["transaction"]["balance_after"] == 150
    assert results[1]["transaction"]["balance_after"] == 30
    assert results[1]["transaction"]["metadata"] == {"sku": "sword"}
    assert results[2]["problem"]["code"] == "insufficient_funds"
    assert results[2]["problem"]["balance"] == 0
    assert results[3]["problem"]["code"] == "wallet_not_found"
    assert results[4]["problem"]["code"] == "asset_not_found"
    # Each command, sent alone afterwards under its key, answers what it answered in the batch:
    # the recorded ones replay (the same transaction), the ones refused without a record decide again.
    token = await sync_token(client)
    for command, result in zip(commands, results, strict=True):
        again = await alone(client, command)
        assert again.status_code == result["status"], (command, again.text)
        if result["status"] == 201:
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == result["transaction"]
            read = await get_json(
                client, f"/v1/transactions/{result['transaction']['transaction_id']}", token
            )
            assert read == as_read(result["transaction"])
        elif result["status"] == 409:
            assert again.headers["idempotent-replayed"] == "true"
            assert again.json() == result["problem"]
        else:
            assert "idempotent-replayed" not in again.headers
            assert again.json() == result["problem"]
    assert await balance_of(client, "alice") == 30
    assert await balance_of(client, "bob") == 7


async def test_a_wallets_commands_are_decided_in_request_order(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "dave")
    commands = [cmd("top_up", "dave", 100), cmd("spend", "dave", 100), cmd("spend", "dave", 1)]
    results = (await send(client, commands)).json()["results"]
    assert [r["status"] for r in results] == [201, 201, 409]
    assert [r["transaction"]["wallet_version"] for r in results[:2]] == [2, 3]


async def test_the_batch_key_replays_the_whole_answer(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    commands = [cmd("top_up", "alice", 10), cmd("top_up", "carol", 5)]
    first = await send(client, commands, key="campaign-1")
    assert first.status_code == 200
    assert "idempotent-replayed" not in first.headers
    # carol's wallet opens now: her command would be applied if it were decided again, but the
    # batch's key replays its first answer, exactly.
    await open_wallet(client, "carol")
    again = await send(client, commands, key="campaign-1")
    assert again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await balance_of(client, "carol") == 0
    assert await balance_of(client, "alice") == 10
    # The same key for another batch is refused, and changes nothing.
    other = await send(client, [cmd("top_up", "alice", 10)], key="campaign-1")
    assert_problem(other, 422, "idempotency_key_reused")
    assert await balance_of(client, "alice") == 10
    # A batch key is not a command key: a command may use it, and the batch still replays.
    alone_command = cmd("top_up", "alice", 3, key="campaign-1")
    assert (await alone(client, alone_command)).status_code == 201
    assert (await send(client, commands, key="campaign-1")).json() == first.json()


async def test_a_command_in_a_second_batch_replays(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    spend_once = cmd("top_up", "alice", 40)
    first = (await send(client, [spend_once])).json()["results"][0]
    second = (await send(client, [cmd("top_up", "alice", 1), spend_once])).json()["results"]
    assert second[1]["replayed"] is True
    assert second[1]["transaction"] == first["transaction"]
    changed = {**spend_once, "amount": 41}
    third = (await send(client, [changed])).json()["results"][0]
    assert (third["status"], third["problem"]["code"]) == (422, "idempotency_key_reused")
    assert await balance_of(client, "alice") == 41


async def test_a_repeated_key_within_a_batch_replays_its_first_occurrence(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 100)
    first = cmd("spend", "alice", 10, key="x")
    results = (await send(client, [first, first, {**first, "amount": 11}])).json()["results"]
    assert [(r["status"], r.get("replayed", False)) for r in results] == [
        (201, False),
        (201, True),
        (422, False),
    ]
    assert results[1]["transaction"] == results[0]["transaction"]
    assert await balance_of(client, "alice") == 90


async def test_an_atomic_batch_applies_all_or_nothing(client: Client) -> None:
    await define_asset(client)
    for user in ("alice", "bob"):
        await open_wallet(client, user)
    await top_up(client, "alice", 100)
    before = await ledger_state(client, "alice", "bob")
    earlier = cmd("top_up", "bob", 1)
    assert (await alone(client, earlier)).status_code == 201
    before = await ledger_state(client, "alice", "bob")
    commands = [cmd("top_up", "bob", 10), earlier, cmd("spend", "alice", 60), cmd("spend", "alice", 60)]
    rejected = await send(client, commands, atomic=True)
    body = assert_problem(rejected, 409, "batch_rejected")
    assert body["refused"] == [3]
    assert [(r["status"], r.get("replayed", False)) for r in body["results"]] == [
        (424, False), (201, True), (424, False), (409, False)
    ]  # fmt: skip
    assert body["results"][0]["problem"]["code"] == "not_applied"
    assert body["results"][3]["problem"]["code"] == "insufficient_funds"
    assert await ledger_state(client, "alice", "bob") == before
    # Nothing was recorded under the refused batch's commands' keys: each decides afresh alone.
    assert (await alone(client, commands[0])).headers.get("idempotent-replayed") is None
    # All of them acceptable: all applied, in one transaction.
    applied = await send(client, [cmd("spend", "alice", 60), cmd("top_up", "bob", 2)], atomic=True)
    assert applied.status_code == 200, applied.text
    results = applied.json()["results"]
    assert [r["status"] for r in results] == [201, 201]
    assert await balance_of(client, "alice") == 40
    assert await balance_of(client, "bob") == 13


async def test_the_batch_key_replays_a_rejected_atomic_batch(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    commands = [cmd("spend", "alice", 5)]
    first = await send(client, commands, key="b", atomic=True)
    assert_problem(first, 409, "batch_rejected")
    await top_up(client, "alice", 5)
    again = await send(client, commands, key="b", atomic=True)
    assert_problem(again, 409, "batch_rejected")
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json() == first.json()
    assert await balance_of(client, "alice") == 5


async def test_each_command_needs_the_scope_of_its_kind(client: Client, pool: asyncpg.Pool) -> None:
    await define_asset(client)
    await define_asset(client, "SILVER")
    await open_wallet(client, "alice")
    await top_up(client, "alice", 100)
    bonus_only = bearer(await make_key(pool, ["credits:bonus"]))
    gold_spender = bearer(await make_key(pool, ["credits:spend", "credits:bonus"], assets=["GOLD"]))
    reader = bearer(await make_key(pool, ["ledger:read"]))
    mixed = [cmd("bonus", "alice", 5), cmd("spend", "alice", 5)]
    response = await post(client, "/v1/batches", {"commands": mixed}, headers=bonus_only)
    results = response.json()["results"]
    assert [r["status"] for r in results] == [201, 403]
    assert results[1]["problem"]["code"] == "forbidden"
    assert results[1]["problem"]["scope"] == "credits:spend"
    silver = {**cmd("bonus", "alice", 5), "asset": "SILVER"}
    response = await post(client, "/v1/batches", {"commands": [silver]}, headers=gold_spender)
    [result] = response.json()["results"]
    assert (result["status"], result["problem"]["asset"]) == (403, "SILVER")
    # The command refused for its scope was not recorded: sent alone by a key that may, it applies.
    assert (await alone(client, mixed[1])).status_code == 201
    before = await ledger_state(client, "alice")
    both = [cmd("bonus", "alice", 5), cmd("spend", "alice", 1)]
    atomic = await post(client, "/v1/batches", {"commands": both, "atomic": True}, headers=bonus_only)
    assert assert_problem(atomic, 409, "batch_rejected")["refused"] == [1]
    no_scope = await post(client, "/v1/batches", {"commands": [cmd("bonus", "alice", 5)]}, headers=reader)
    assert assert_problem(no_scope, 403, "forbidden")["scope"] == "credits:top-up credits:bonus credits:spend"
    assert await ledger_state(client, "alice") == before


@pytest.fixture
async def small_batches(settings: Settings) -> AsyncIterator[Client]:
    """The app with TALLY_MAX_BATCH=3."""
    async with api_client(
        create_app(msgspec.structs.replace(settings, max_batch=3), run_projector=True)
    ) as client:
        yield client


async def test_bad_batches_are_refused_whole_and_change_nothing(small_batches: Client) -> None:
    client = small_batches
    await define_asset(client)
    await open_wallet(client, "alice")
    before = await ledger_state(client, "alice")
    good = cmd("top_up", "alice", 1)
    refusals = Refusals()
    cases: dict[str, tuple[Any, int, str]] = {
        "no commands": ({"commands": []}, 400, "invalid_request"),
        "no commands member": ({}, 400, "invalid_request"),
        "an unknown kind": ({"commands": [{**good, "kind": "steal"}]}, 400, "invalid_request"),
        "a command without a key": ({"commands": [{**good, "key": None}]}, 400, "invalid_request"),
        "a key with a newline": ({"commands": [{**good, "key": "k\n"}]}, 400, "invalid_request"),
        "an amount of zero": ({"commands": [good, {**good, "amount": 0}]}, 400, "invalid_request"),
        "a string amount": ({"commands": [{**good, "amount": "1"}]}, 400, "invalid_request"),
        "an unknown field": ({"commands": [{**good, "memo": "x"}]}, 400, "invalid_request"),
        "atomic as a string": ({"commands": [good], "atomic": "yes"}, 400, "invalid_request"),
        "over TALLY_MAX_BATCH": (
            {"commands": [cmd("top_up", "alice", 1) for _ in range(4)]},
            413,
            "batch_too_large",
        ),
    }
    for case, (body, status, code) in cases.items():
        refusals.check(case, await post(client, "/v1/batches", body), status, code)
    keyless = await post(client, "/v1/batches", {"commands": [good]}, send_key=False)
    refusals.check("no Idempotency-Key", keyless, 400, "idempotency_key_missing")
    huge = {
        "commands": [{**good, "reference": "r" * 255, "metadata": {f"k{i}": "v" * 512 for i in range(16)}}]
        * 10
    }
    refusals.check(
        "a body over the route's limit", await post(client, "/v1/batches", huge), 413, "payload_too_large"
    )
    refusals.check("not JSON", await post(client, "/v1/batches", raw=b"{"), 400, "invalid_request")
    refusals.assert_none()
    assert await ledger_state(client, "alice") == before
    assert (await post(client, "/v1/batches", {"commands": [good] * 3})).status_code == 200


async def test_a_batch_of_a_thousand_commands(client: Client) -> None:
    """The default maximum, over 1,000 wallets, in one request (and its replay)."""
    await define_asset(client)
    users = [f"u{i:04d}" for i in range(1000)]
    wallets = await send(client, [cmd("bonus", "nobody", 1)])  # a warm-up that changes nothing
    assert wallets.status_code == 200
    for user in users[:10]:
        await open_wallet(client, user)
    commands = [cmd("top_up", user, 7) for user in users]
    key = str(uuid.uuid4())
    response = await send(client, commands, key=key)
    statuses = [r["status"] for r in response.json()["results"]]
    assert statuses == [201] * 10 + [404] * 990
    again = await send(client, commands, key=key)
    assert again.json() == response.json()


async def test_a_repeated_key_is_answered_as_its_first_occurrence(client: Client, pool: asyncpg.Pool) -> None:
    """Found by review: in a rejected atomic batch a repeat replayed a transaction that was rolled
    back; a repeat of a refusal without a record decided on its own."""
    await define_asset(client)
    await open_wallet(client, "alice")
    await top_up(client, "alice", 100)
    dup = cmd("top_up", "alice", 10, key="dup")
    rejected = await send(client, [dup, dup, cmd("spend", "alice", 1000)], atomic=True)
    body = assert_problem(rejected, 409, "batch_rejected")
    assert [(r["status"], r.get("replayed", False)) for r in body["results"]] == [
        (424, False), (424, False), (409, False)
    ]  # fmt: skip
    assert not any("transaction" in r for r in body["results"])
    assert "idempotent-replayed" not in (await alone(client, dup)).headers  # nothing was recorded
    # A first occurrence refused without a record: the repeat answers the same, or 422.
    nobody = cmd("top_up", "nobody", 5, key="n")
    results = (await send(client, [nobody, nobody, {**nobody, "user_id": "alice"}])).json()["results"]
    assert [(r["status"], r.get("replayed", False)) for r in results] == [
        (404, False),
        (404, True),
        (422, False),
    ]
    bonus_only = bearer(await make_key(pool, ["credits:bonus"]))
    both = [cmd("top_up", "alice", 5, key="t"), cmd("bonus", "alice", 700, key="t")]
    response = await post(client, "/v1/batches", {"commands": both}, headers=bonus_only)
    assert [r["status"] for r in response.json()["results"]] == [403, 422]
    assert await balance_of(client, "alice") == 110


async def test_more_than_the_limit_of_ten_thousand_is_413(client: Client) -> None:
    await define_asset(client)
    body = {"commands": [cmd("top_up", "alice", 1) for _ in range(10_001)]}
    assert_problem(await post(client, "/v1/batches", body), 413, "batch_too_large")


async def test_two_batches_under_one_key_at_once_apply_one(db_url: str, pool: asyncpg.Pool) -> None:
    """Found by review: two different batches sent at once under one key were both applied, and
    one answered 422. The batch's key is claimed while it is decided: the second waits, then
    finds the first's answer (422 for a different batch; a replay for the same). A real server
    process, so the two requests are truly concurrent."""
    env = {"TALLY_LOCK_TIMEOUT": "30", "TALLY_COMMAND_TIMEOUT": "60"}
    async with (
        serving(db_url, env=env) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH) as http,
    ):

        async def send_to(commands: list[dict[str, Any]], key: str) -> httpx.Response:
            return await http.post(
                "/v1/batches", json={"commands": commands}, headers={"Idempotency-Key": key}, timeout=60
            )

        await http.post(
            "/v1/assets",
            json={"code": "GOLD", "name": "Gold", "decimals": 0},
            headers={"Idempotency-Key": "a"},
        )
        await http.post("/v1/wallets", json={"user_id": "w"}, headers={"Idempotency-Key": "w"})
        small, large = [cmd("top_up", "w", 10)], [cmd("top_up", "w", 1000)]
        async with holding_wallet(pool, "w") as holder:
            first = asyncio.create_task(send_to(small, "B"))
            await lock_waits(pool, lambda w: any(holder in x["blockers"] for x in w))
            second = asyncio.create_task(send_to(large, "B"))
            await lock_waits(pool, lambda w: len(w) >= 2)  # the second waits for the first's claim
        answers = [await asyncio.wait_for(task, 60) for task in (first, second)]
        assert [a.status_code for a in answers] == [200, 422]
        assert await stream_balance(pool, "w") == 10
        assert (await send_to(small, "B")).headers["idempotent-replayed"] == "true"
