"""The query endpoints: assets, wallets, history (keyset paging), transactions, system balances,
read-your-writes, and the OpenAPI document."""

from __future__ import annotations

from datetime import datetime

import asyncpg

from api.app import create_app
from api.settings import Settings
from projections.positions import Position
from tests.api.support import (
    Client,
    as_read,
    assert_problem,
    bonus,
    define_asset,
    get,
    get_json,
    open_wallet,
    post,
    spend,
    sync_token,
    top_up,
)
from tests.helpers import api_client, apply_projection

# --- assets ----------------------------------------------------------------------------------


async def test_assets_are_listed_sorted_by_code(client: Client) -> None:
    token = await sync_token(client)
    assert await get_json(client, "/v1/assets", token) == {"items": []}

    made = {}
    for code, decimals in [("SILVER", 2), ("AAA", 0), ("GEMS", 18), ("GOLD", 4)]:
        made[code] = await define_asset(client, code, name=f"{code} name", decimals=decimals)
    listed = await get_json(client, "/v1/assets", made["GOLD"]["consistency_token"])
    assert [a["code"] for a in listed["items"]] == ["AAA", "GEMS", "GOLD", "SILVER"]
    for item in listed["items"]:
        expected = made[item["code"]]
        assert set(item) == {"code", "name", "decimals", "created_at"}
        assert (item["name"], item["decimals"]) == (expected["name"], expected["decimals"])
        assert datetime.fromisoformat(item["created_at"]) == datetime.fromisoformat(expected["created_at"])


# --- wallets ---------------------------------------------------------------------------------


async def test_get_wallet_returns_balances_version_and_etag(client: Client) -> None:
    await define_asset(client, "GOLD")
    await define_asset(client, "GEMS")
    opened = await open_wallet(client, "alice", {"tier": "gold", "country": "NL"})
    await top_up(client, "alice", 500, "GOLD")
    await bonus(client, "alice", 30, "GEMS")
    last = await spend(client, "alice", 120, "GOLD")

    response = await get(client, "/v1/wallets/alice", last["consistency_token"])
    assert response.status_code == 200
    assert response.headers["etag"] == '"4"'
    body = response.json()
    assert set(body) == {"user_id", "version", "balances", "metadata", "created_at"}
    assert body["user_id"] == "alice"
    assert body["version"] == 4
    assert body["balances"] == [
        {"asset": "GEMS", "balance": 30, "held": 0, "available": 30},
        {"asset": "GOLD", "balance": 380, "held": 0, "available": 380},
    ]
    assert body["metadata"] == {"tier": "gold", "country": "NL"}
    assert body["created_at"] == opened["created_at"]


async def test_a_new_wallet_reads_as_empty(client: Client) -> None:
    opened = await open_wallet(client, "bob")
    response = await get(client, "/v1/wallets/bob", opened["consistency_token"])
    assert response.status_code == 200
    assert response.headers["etag"] == '"1"'
    assert response.json() == {
        "user_id": "bob",
        "version": 1,
        "balances": [],
        "metadata": {},
        "created_at": opened["created_at"],
    }


async def test_wallets_are_independent(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await open_wallet(client, "bob")
    await top_up(client, "alice", 10)
    last = await top_up(client, "bob", 20)
    alice = await get_json(client, "/v1/wallets/alice", last["consistency_token"])
    bob = await get_json(client, "/v1/wallets/bob", last["consistency_token"])
    assert alice["balances"] == [{"asset": "GOLD", "balance": 10, "held": 0, "available": 10}]
    assert bob["balances"] == [{"asset": "GOLD", "balance": 20, "held": 0, "available": 20}]
    assert (alice["version"], bob["version"]) == (2, 2)


# --- transactions ----------------------------------------------------------------------------


async def test_get_transaction_returns_what_the_command_returned(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    posted = [
        await top_up(client, "alice", 100, reference="psp-1", metadata={"source": "card"}),
        await bonus(client, "alice", 5),
        await spend(client, "alice", 50, metadata={"sku": "sword"}),
    ]
    for tx in posted:
        response = await get(client, f"/v1/transactions/{tx['transaction_id']}", tx["consistency_token"])
        assert response.status_code == 200
        assert response.json() == as_read(tx)


async def test_get_transaction_accepts_an_uppercase_uuid(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    tx = await top_up(client, "alice", 100)
    found = await get_json(
        client, f"/v1/transactions/{tx['transaction_id'].upper()}", tx["consistency_token"]
    )
    assert found["transaction_id"] == tx["transaction_id"]


# --- history ---------------------------------------------------------------------------------


async def _walk(client: Client, user_id: str, token: str, **params: object) -> list[list[dict]]:
    """Every page of a wallet's history, following next_cursor."""
    pages: list[list[dict]] = []
    cursor = None
    while True:
        query = dict(params)
        if cursor is not None:
            query["cursor"] = cursor
        page = await get_json(client, f"/v1/wallets/{user_id}/transactions", token, **query)
        assert set(page) == {"items", "next_cursor"}
        pages.append(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return pages
        assert len(pages) < 100, "paging does not end"


async def test_history_is_newest_first_and_matches_the_commands(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    posted = [
        await top_up(client, "alice", 100),
        await bonus(client, "alice", 10),
        await spend(client, "alice", 60),
    ]
    page = await get_json(client, "/v1/wallets/alice/transactions", posted[-1]["consistency_token"])
    assert page["next_cursor"] is None
    assert page["items"] == list(reversed(posted))


async def test_history_of_a_wallet_without_transactions_is_empty(client: Client) -> None:
    opened = await open_wallet(client, "alice")
    page = await get_json(client, "/v1/wallets/alice/transactions", opened["consistency_token"])
    assert page == {"items": [], "next_cursor": None}


async def test_history_pages_cover_everything_once(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    posted = []
    for i in range(11):
        posted.append(await top_up(client, "alice", i + 1))
    token = posted[-1]["consistency_token"]

    for limit in (1, 2, 3, 7, 10, 11, 12, 200):
        pages = await _walk(client, "alice", token, limit=limit)
        assert all(len(page) <= limit for page in pages), limit
        assert all(len(page) == limit for page in pages[:-1]), limit
        assert pages[-1] or len(pages) == 1, limit
        items = [item for page in pages for item in page]
        ids = [item["transaction_id"] for item in items]
        assert len(ids) == len(set(ids)), f"a transaction appears twice with limit {limit}"
        assert items == list(reversed(posted)), f"gaps or wrong order with limit {limit}"
        assert [item["wallet_version"] for item in items] == list(range(12, 1, -1))


async def test_a_page_is_stable_while_new_transactions_arrive(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    posted = [await top_up(client, "alice", i + 1) for i in range(4)]
    first = await get_json(client, "/v1/wallets/alice/transactions", posted[-1]["consistency_token"], limit=2)
    assert first["items"] == [posted[3], posted[2]]
    newer = await top_up(client, "alice", 99)
    rest = await get_json(
        client,
        "/v1/wallets/alice/transactions",
        newer["consistency_token"],
        limit=2,
        cursor=first["next_cursor"],
    )
    assert rest["items"] == [posted[1], posted[0]]
    assert rest["next_cursor"] is None


async def test_history_without_a_limit_returns_a_whole_short_history(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    last = None
    for _ in range(3):
        last = await top_up(client, "alice", 1)
    assert last is not None
    page = await get_json(client, "/v1/wallets/alice/transactions", last["consistency_token"])
    assert len(page["items"]) == 3
    assert page["next_cursor"] is None


async def test_history_filters_by_asset_across_pages(client: Client) -> None:
    await define_asset(client, "GOLD")
    await define_asset(client, "GEMS")
    await open_wallet(client, "alice")
    posted = []
    for i in range(9):
        asset = "GEMS" if i % 3 == 0 else "GOLD"
        posted.append(await top_up(client, "alice", i + 1, asset))
    token = posted[-1]["consistency_token"]

    for asset in ("GEMS", "GOLD"):
        expected = [tx for tx in reversed(posted) if tx["asset"] == asset]
        for limit in (1, 2, 50):
            pages = await _walk(client, "alice", token, asset=asset, limit=limit)
            items = [item for page in pages for item in page]
            assert items == expected, (asset, limit)

    none = await get_json(client, "/v1/wallets/alice/transactions", token, asset="SILVER")
    assert none == {"items": [], "next_cursor": None}


async def test_history_shows_only_the_wallets_own_transactions(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    await open_wallet(client, "bob")
    mine = await top_up(client, "alice", 5)
    theirs = await top_up(client, "bob", 6)
    alice = await get_json(client, "/v1/wallets/alice/transactions", theirs["consistency_token"])
    bob = await get_json(client, "/v1/wallets/bob/transactions", theirs["consistency_token"])
    assert alice["items"] == [mine]
    assert bob["items"] == [theirs]


async def test_refused_commands_leave_no_history(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "alice")
    funded = await top_up(client, "alice", 10)
    assert_problem(
        await post(client, "/v1/wallets/alice/spends", {"asset": "GOLD", "amount": 11}),
        409,
        "insufficient_funds",
    )
    response = await post(
        client, "/v1/wallets/alice/top-ups", {"asset": "GOLD", "amount": 1}, headers={"If-Match": '"1"'}
    )
    assert_problem(response, 412, "version_mismatch")
    token = await sync_token(client)
    page = await get_json(client, "/v1/wallets/alice/transactions", token)
    assert page["items"] == [funded]


# --- system balances -------------------------------------------------------------------------


async def test_system_balances_of_a_known_sequence(client: Client) -> None:
    token = await sync_token(client)
    assert await get_json(client, "/v1/system/balances", token) == {"balances": []}

    await define_asset(client, "GOLD")
    await define_asset(client, "GEMS")
    await define_asset(client, "IDLE")
    await open_wallet(client, "alice")
    await open_wallet(client, "bob")
    await top_up(client, "alice", 1000, "GOLD")
    await top_up(client, "bob", 500, "GOLD")
    await bonus(client, "alice", 200, "GOLD")
    await spend(client, "alice", 300, "GOLD")
    await spend(client, "bob", 500, "GOLD")
    await bonus(client, "bob", 40, "GEMS")
    last = await spend(client, "bob", 15, "GEMS")
    assert_problem(
        await post(client, "/v1/wallets/bob/spends", {"asset": "GEMS", "amount": 26}),
        409,
        "insufficient_funds",
    )

    body = await get_json(client, "/v1/system/balances", last["consistency_token"])
    assert body == {
        "balances": [
            {"asset": "GEMS", "treasury": 0, "bonus": -40, "revenue": 15, "users": 25, "sum": 0},
            {"asset": "GOLD", "treasury": -1500, "bonus": -200, "revenue": 800, "users": 900, "sum": 0},
            {"asset": "IDLE", "treasury": 0, "bonus": 0, "revenue": 0, "users": 0, "sum": 0},
        ]
    }
    alice = await get_json(client, "/v1/wallets/alice", last["consistency_token"])
    bob = await get_json(client, "/v1/wallets/bob", last["consistency_token"])
    users_gold = sum(b["balance"] for w in (alice, bob) for b in w["balances"] if b["asset"] == "GOLD")
    assert users_gold == 900


async def test_system_balances_sum_to_zero_with_large_amounts(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "whale")
    for _ in range(5):
        await top_up(client, "whale", 10**15)
    last = await spend(client, "whale", 10**15 - 1)
    body = await get_json(client, "/v1/system/balances", last["consistency_token"])
    (gold,) = body["balances"]
    assert gold["treasury"] == -5 * 10**15
    assert gold["revenue"] == 10**15 - 1
    assert gold["users"] == 4 * 10**15 + 1
    assert gold["sum"] == 0


# --- read your writes ------------------------------------------------------------------------


async def test_every_query_reflects_the_command_whose_token_it_carries(client: Client) -> None:
    asset = await define_asset(client)
    listed = await get_json(client, "/v1/assets", asset["consistency_token"])
    assert [a["code"] for a in listed["items"]] == ["GOLD"]

    opened = await open_wallet(client, "alice")
    wallet = await get_json(client, "/v1/wallets/alice", opened["consistency_token"])
    assert wallet["version"] == 1

    for amount in (3, 4, 5):
        tx = await top_up(client, "alice", amount)
        token = tx["consistency_token"]
        wallet = await get_json(client, "/v1/wallets/alice", token)
        assert wallet["version"] == tx["wallet_version"]
        assert wallet["balances"] == [
            {"asset": "GOLD", "balance": tx["balance_after"], "held": 0, "available": tx["balance_after"]}
        ]
        history = await get_json(client, "/v1/wallets/alice/transactions", token, limit=1)
        assert history["items"] == [tx]
        assert await get_json(client, f"/v1/transactions/{tx['transaction_id']}", token) == as_read(tx)
        system = await get_json(client, "/v1/system/balances", token)
        assert system["balances"][0]["users"] == tx["balance_after"]


async def test_each_query_waits_for_every_projection_it_reads(db_url: str, pool: asyncpg.Pool) -> None:
    """No projector runs here: the test applies the projections itself, one at a time, so a
    command's token is reached by one read model and not yet by the others, for certain. Every query
    carrying the token waits for each projection it reads: it times out (503) while any of them
    lacks the write, and shows the write once all of them have it."""
    impatient = Settings(database_url=db_url, consistency_timeout=0.3)
    patient = Settings(database_url=db_url, consistency_timeout=30)
    async with (
        api_client(create_app(impatient, run_projector=False)) as early,
        api_client(create_app(patient, run_projector=False)) as late,
    ):
        await define_asset(late)
        await open_wallet(late, "alice")
        tx = await top_up(late, "alice", 7)
        token = tx["consistency_token"]
        reads = {  # the projection each query reads, and what it shows once that one has the write
            "/v1/assets": ("wallets", lambda body: [a["code"] for a in body["items"]] == ["GOLD"]),
            "/v1/wallets/alice": (
                "wallets",
                lambda body: body["balances"] == [{"asset": "GOLD", "balance": 7, "held": 0, "available": 7}],
            ),
            "/v1/wallets/alice/transactions": ("history", lambda body: body["items"] == [tx]),
            f"/v1/transactions/{tx['transaction_id']}": ("history", lambda body: body == as_read(tx)),
            "/v1/system/balances": ("system", lambda body: body["balances"][0]["users"] == 7),
        }
        applied: set[str] = set()
        for projection in ("history", "system", "wallets"):
            for path, (needs, _) in reads.items():
                if needs not in applied:
                    assert_problem(await get(early, path, token), 503, "projection_timeout")
            await apply_projection(pool, projection, Position.parse(token))
            applied.add(projection)
            for path, (needs, shows_the_write) in reads.items():
                if needs in applied:
                    assert shows_the_write(await get_json(late, path, token)), path


async def test_an_older_token_is_already_satisfied(client: Client) -> None:
    await define_asset(client)
    opened = await open_wallet(client, "alice")
    last = await top_up(client, "alice", 9)
    await get_json(client, "/v1/wallets/alice", last["consistency_token"])
    wallet = await get_json(client, "/v1/wallets/alice", opened["consistency_token"])
    assert wallet["balances"] == [{"asset": "GOLD", "balance": 9, "held": 0, "available": 9}]


# --- OpenAPI ---------------------------------------------------------------------------------


async def test_openapi_document_lists_every_endpoint(client: Client) -> None:
    response = await client.get("/docs/openapi.json")
    assert response.status_code == 200
    document = response.json()
    assert document["openapi"].startswith("3.")
    paths = document["paths"]
    expected = {
        "/v1/assets": {"get", "post"},
        "/v1/wallets": {"post"},
        "/v1/wallets/{user_id}": {"get"},
        "/v1/wallets/{user_id}/top-ups": {"post"},
        "/v1/wallets/{user_id}/bonuses": {"post"},
        "/v1/wallets/{user_id}/spends": {"post"},
        "/v1/wallets/{user_id}/transactions": {"get"},
        "/v1/transactions/{transaction_id}": {"get"},
        "/v1/system/balances": {"get"},
    }
    for path, methods in expected.items():
        assert path in paths, path
        assert methods <= set(paths[path]), (path, set(paths[path]))
    spend_parameters = {
        (p["name"].lower(), p["in"]) for p in paths["/v1/wallets/{user_id}/spends"]["post"]["parameters"]
    }
    assert {("idempotency-key", "header"), ("if-match", "header")} <= spend_parameters


async def test_docs_page_is_html(client: Client) -> None:
    response = await client.get("/docs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()
