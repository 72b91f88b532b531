"""GET /v1/events: every event once, in commit order, paged by cursors that stay valid; filters;
bad input refused with nothing changed; a key limited to some assets sees only theirs. (Long polls
and the stream, which need real concurrent requests: tests/integration/test_feed.py.)"""

from __future__ import annotations

from typing import Any

import asyncpg
import pytest

from tests.api.support import (
    Client,
    assert_problem,
    define_asset,
    get_json,
    open_wallet,
    spend,
    top_up,
)
from tests.api.test_auth import bearer, make_key

ITEM_FIELDS = {"event_id", "type", "stream_id", "version", "cursor", "recorded_at", "data"}
_COMMIT_ORDER = "SELECT event_id::text FROM events ORDER BY writer_xid, global_position"


async def follow(
    client: Client, after: str | None = None, until: int = 0, **params: Any
) -> tuple[list[dict], str]:
    """Page from ``after`` until a page is empty and at least ``until`` events came (waiting for
    events whose transactions are not finished yet); the items and the last next_cursor."""
    items: list[dict[str, Any]] = []
    cursor = after
    while True:
        query = dict(params)
        if cursor is not None:
            query["after"] = cursor
        if len(items) < until:
            query["wait"] = 10
        page = await get_json(client, "/v1/events", **query)
        assert set(page) == {"items", "next_cursor"}
        if page["items"]:
            assert (
                page["next_cursor"] == page["items"][-1]["cursor"] or "types" in params or "user_id" in params
            )
        items.extend(page["items"])
        cursor = page["next_cursor"]
        if not page["items"] and len(items) >= until:
            return items, cursor


async def _ledger(client: Client) -> list[dict[str, Any]]:
    await define_asset(client)
    await define_asset(client, "GEMS")
    made = []
    for user in ("ann", "bob"):
        made.append(await open_wallet(client, user))
        made.append(await top_up(client, user, 50))
        made.append(await top_up(client, user, 5, asset="GEMS"))
    made.append(await spend(client, "ann", 20))
    made.append(await spend(client, "bob", 1, asset="GEMS"))
    return made


async def test_paging_from_the_start_gives_every_event_once_in_commit_order(
    client: Client, pool: asyncpg.Pool
) -> None:
    await _ledger(client)
    total = await pool.fetchval("SELECT count(*) FROM events")
    items, last = await follow(client, limit=3, until=total)
    assert [i["event_id"] for i in items] == [r["event_id"] for r in await pool.fetch(_COMMIT_ORDER)]
    assert all(set(i) == ITEM_FIELDS for i in items)
    spent = next(i for i in items if i["type"] == "CreditsSpent")
    assert spent["stream_id"] == "wallet:ann"
    assert (spent["data"]["amount"], spent["data"]["balance_after"]) == (20, 30)
    entries = sorted((e["account"], e["amount"]) for e in spent["data"]["entries"])
    assert entries == [("system:revenue", 20), ("user:ann", -20)]
    versions: dict[str, list[int]] = {}
    for item in items:
        versions.setdefault(item["stream_id"], []).append(item["version"])
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values()), versions
    # A cursor stays valid: any item's cursor, read again later, gives what followed it.
    middle = items[len(items) // 2]
    again, _ = await follow(client, after=middle["cursor"], limit=100)
    assert [i["event_id"] for i in again] == [i["event_id"] for i in items[len(items) // 2 + 1 :]]
    # Nothing new: an empty page, and the cursor stays where it was.
    assert await get_json(client, "/v1/events", after=last) == {"items": [], "next_cursor": last}


async def test_a_commands_consistency_token_is_a_cursor(client: Client) -> None:
    await define_asset(client)
    await open_wallet(client, "ann")
    first = await top_up(client, "ann", 10)
    second = await spend(client, "ann", 4)
    items, _ = await follow(client, after=first["consistency_token"], until=1)
    # What followed the token; and, if a transaction older than it still ran when it was read, from
    # just before that one (its own event again: at least once, tests/integration/test_feed.py).
    ids = [i["data"].get("transaction_id") for i in items]
    assert ids[-1] == second["transaction_id"]
    assert set(ids) <= {first["transaction_id"], second["transaction_id"], None}
    assert items[-1]["cursor"] == second["consistency_token"]


async def test_filters_by_type_and_user(client: Client, pool: asyncpg.Pool) -> None:
    await _ledger(client)
    total = await pool.fetchval("SELECT count(*) FROM events")
    everything, _ = await follow(client, until=total)
    spends, _ = await follow(client, types="CreditsSpent", until=2)
    assert [i["event_id"] for i in spends] == [
        i["event_id"] for i in everything if i["type"] == "CreditsSpent"
    ]
    both = ["CreditsSpent,WalletOpened", "CreditsToppedUp"]
    several, _ = await follow(client, types=both, until=8)
    wanted = {"CreditsSpent", "WalletOpened", "CreditsToppedUp"}
    assert [i["event_id"] for i in several] == [i["event_id"] for i in everything if i["type"] in wanted]
    bobs, _ = await follow(client, user_id="bob", limit=2, until=4)
    assert [i["event_id"] for i in bobs] == [
        i["event_id"] for i in everything if i["stream_id"] == "wallet:bob"
    ]


async def test_a_filters_window_moves_the_cursor_past_what_it_left_out(
    client: Client, pool: asyncpg.Pool
) -> None:
    """A page examines a bounded window; with nothing matching in it, next_cursor still moves on."""
    from projections.feed import FeedFilter, read_feed
    from projections.positions import ORIGIN, Position

    await _ledger(client)
    total = await pool.fetchval("SELECT count(*) FROM events")
    await follow(client, until=total)  # every event is readable now
    where = FeedFilter(types=("CreditsSpent",))
    seen, cursor, rounds = [], ORIGIN, 0
    while True:
        page, more = await read_feed(pool, cursor, 1, where, window=2)
        seen.extend(page.items)
        cursor, rounds = Position.parse(page.next_cursor), rounds + 1
        if not more:
            break
    assert [i.type for i in seen] == ["CreditsSpent", "CreditsSpent"]
    assert rounds >= total // 2  # two events examined per page


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"after": "abc"}, "cursor"),
        ({"after": "12"}, "cursor"),
        ({"after": "1.2.3"}, "cursor"),
        ({"after": "-1.2"}, "cursor"),
        ({"after": "18446744073709551616.1"}, "cursor"),  # past the largest xid8
        ({"after": "1.9223372036854775808"}, "cursor"),  # past the largest bigint
        ({"types": "CreditsSpent,NoSuchThing"}, "NoSuchThing"),
        ({"types": ","}, "none given"),
        ({"limit": "0"}, "limit"),
        ({"limit": "1001"}, "limit"),
        ({"wait": "31"}, "wait"),
        ({"wait": "-1"}, "wait"),
        ({"user_id": "a b"}, "user_id"),
    ],
)
async def test_bad_input_is_400(client: Client, params: dict[str, str], fragment: str) -> None:
    response = await client.get("/v1/events", params=params)
    body = assert_problem(response, 400, "invalid_request")
    assert fragment in str(body), body
    if "limit" not in params and "wait" not in params:  # the stream has neither
        assert_problem(await client.get("/v1/events/stream", params=params), 400, "invalid_request")


async def test_a_key_limited_to_some_assets_sees_only_their_events(
    client: Client, pool: asyncpg.Pool
) -> None:
    await _ledger(client)
    total = await pool.fetchval("SELECT count(*) FROM events")
    everything, _ = await follow(client, until=total)
    gems = bearer(await make_key(pool, ["events:read"], assets=["GEMS"]))
    client.headers.update(gems)
    seen, _ = await follow(client)
    shown = [
        i for i in everything
        if i["type"] == "WalletOpened" or i["data"].get("asset", i["data"].get("code")) == "GEMS"
    ]  # fmt: skip
    assert [i["event_id"] for i in seen] == [i["event_id"] for i in shown]
    assert {i["type"] for i in seen} == {"AssetDefined", "WalletOpened", "CreditsToppedUp", "CreditsSpent"}


async def test_the_feed_needs_events_read(client: Client, pool: asyncpg.Pool) -> None:
    client.headers.update(bearer(await make_key(pool, ["ledger:read"])))
    for path in ("/v1/events", "/v1/events/stream"):
        body = assert_problem(await client.get(path), 403, "forbidden")
        assert body["scope"] == "events:read"
