"""The event feed under real concurrency: a transaction that commits after a later-numbered one is
served in its place, never skipped; a consumer following the feed live while many writers commit
sees every event exactly once, each wallet's in version order; a long poll returns when an event
commits; the stream resumes after its Last-Event-ID, with keep-alives; a server with open streams
stops on SIGTERM. Real server processes, real concurrent transactions."""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import signal
import uuid
from typing import Any

import asyncpg
import httpx
import msgspec
from httpx_sse import aconnect_sse

from commands import EventStore
from domain import TopUpCredits
from projections.feed import FeedEvent, read_feed
from projections.positions import ORIGIN, Position
from projections.verify import verify
from tests.conftest import LiveServer, serving
from tests.helpers import AUTH, begin_top_up, define_asset, open_wallet, record, run_batch

_COMMIT_ORDER = "SELECT event_id::text FROM events ORDER BY writer_xid, global_position"


async def _read_until(pool: asyncpg.Pool, after: Position, count: int, within: float = 30) -> list[FeedEvent]:
    """Follow the feed from ``after`` until ``count`` events came: a transaction open anywhere in the
    cluster (autovacuum, another session) holds the frontier back a moment. A bound, not a timing."""
    deadline = asyncio.get_running_loop().time() + within
    items: list[FeedEvent] = []
    while len(items) < count:
        assert asyncio.get_running_loop().time() < deadline, f"{len(items)} of {count} events came"
        page, _ = await read_feed(pool, after, 100)
        items.extend(page.items)
        after = Position.parse(page.next_cursor)
        if not page.items:
            await asyncio.sleep(0.05)
    return items


async def test_an_event_committed_late_is_served_in_its_place_never_skipped(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    await define_asset(store)
    await open_wallet(store, "early")
    await open_wallet(store, "late")
    seen = await _read_until(pool, ORIGIN, 3)
    cursor = Position.parse(seen[-1].cursor)
    slow, fast = await pool.acquire(), await pool.acquire()
    try:
        # `slow` draws the lower position but commits last.
        slow_tx = await begin_top_up(slow, "early", 7)
        fast_tx = await begin_top_up(fast, "late", 11)
        await fast_tx.commit()
        committed = await pool.fetch("SELECT global_position FROM events WHERE data ->> 'kind' = 'top_up'")
        assert len(committed) == 1  # `late`'s is committed, `early`'s still in flight
        # A reader by position would serve `late` now, then never look below it again.
        held_back, _ = await read_feed(pool, cursor, 100)
        assert held_back.items == []
        assert held_back.next_cursor == cursor.token()
        await slow_tx.commit()
    finally:
        await pool.release(slow)
        await pool.release(fast)
    items = await _read_until(pool, cursor, 2)
    assert [msgspec.json.decode(i.data)["user_id"] for i in items] == ["early", "late"]
    positions = [int(i.cursor.partition(".")[2]) for i in items]
    assert positions[0] < positions[1]  # the out-of-order commit really happened


async def test_a_token_taken_while_an_older_transaction_runs_misses_nothing_after_it(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """A command's consistency token as a cursor: an older transaction, still running when the
    token was taken, commits later; its event sorts before the token, and still comes."""
    await define_asset(store)
    await open_wallet(store, "early")
    await open_wallet(store, "late")
    older, younger = await pool.acquire(), await pool.acquire()
    try:
        older_tx = await begin_top_up(older, "early", 7)
        [row] = await run_batch(younger, record(TopUpCredits(user_id="late", asset="GOLD", amount=11)))
        token = Position.parse(msgspec.json.decode(row["body"])["consistency_token"])
        page, _ = await read_feed(pool, token, 100)
        assert page.items == []
        restart = Position.parse(page.next_cursor)
        assert restart < token  # the older transaction still runs: from just below the frontier
        await older_tx.commit()
    finally:
        await pool.release(older)
        await pool.release(younger)
    items = await _read_until(pool, restart, 2)
    users = [msgspec.json.decode(i.data)["user_id"] for i in items]
    assert users == ["early", "late"]  # the older one's event, then the token's own (at least once)
    assert Position.parse(items[0].cursor) < token


def _metric(text: str, name: str, labels: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


async def _until(http: httpx.AsyncClient, name: str, labels: str, value: float, within: float = 30) -> None:
    """Poll /metrics until the gauge reads ``value``: how a test sees a request really waiting (a
    bound on waiting, not a timing assertion)."""
    deadline = asyncio.get_running_loop().time() + within
    while _metric((await http.get("/metrics")).text, name, labels) != value:
        assert asyncio.get_running_loop().time() < deadline, f"{name}{{{labels}}} never read {value}"
        await asyncio.sleep(0.05)


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    response = await http.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


async def _setup(http: httpx.AsyncClient, users: list[str]) -> None:
    await _post(http, "/v1/assets", {"code": "GOLD", "name": "Gold", "decimals": 0})
    for user in users:
        await _post(http, "/v1/wallets", {"user_id": user})


async def test_a_long_poll_returns_when_an_event_commits(live_server: LiveServer) -> None:
    async with httpx.AsyncClient(base_url=live_server.url, headers=AUTH, timeout=60) as http:
        await _setup(http, ["ann"])
        caught_up = (await http.get("/v1/events", params={"wait": 5})).json()
        while caught_up["items"]:
            caught_up = (await http.get("/v1/events", params={"after": caught_up["next_cursor"]})).json()
        poll = asyncio.create_task(
            http.get("/v1/events", params={"after": caught_up["next_cursor"], "wait": 30})
        )
        await _until(http, "tally_feed_consumers", 'kind="poll"', 1.0)  # it is waiting
        moved = await _post(http, "/v1/wallets/ann/top-ups", {"asset": "GOLD", "amount": 9})
        page = (await asyncio.wait_for(poll, 60)).json()
        assert [i["data"]["transaction_id"] for i in page["items"]] == [moved["transaction_id"]]
        await _until(http, "tally_feed_consumers", 'kind="poll"', 0.0)
        # With nothing to come, the wait ends empty, at the same cursor.
        quiet = (await http.get("/v1/events", params={"after": page["next_cursor"], "wait": 0.2})).json()
        assert quiet == {"items": [], "next_cursor": page["next_cursor"]}


async def test_writers_followed_live_every_event_once_each_wallet_in_order(
    live_server: LiveServer, pool: asyncpg.Pool
) -> None:
    """12 concurrent writers (group-committed in shared transactions) while a consumer long-polls
    with small pages; then the consumer has every event exactly once, each wallet's in version
    order, though positions were committed out of order."""
    users = [f"u{i}" for i in range(8)]
    seen: list[dict[str, Any]] = []
    done = asyncio.Event()
    async with httpx.AsyncClient(base_url=live_server.url, headers=AUTH, timeout=60) as http:
        await _setup(http, [*users, "early"])
        # A transaction that takes its id before the writers start and writes after they are done:
        # its event has the lowest writer_xid and the highest position, so the feed's order and the
        # positions' differ for sure (the writers' own group commits make more such pairs).
        early = await pool.acquire()
        early_tx = early.transaction()
        await early_tx.start()
        await early.execute("SELECT pg_current_xact_id()")

        async def write(n: int) -> None:
            rng = random.Random(n)
            for _ in range(25):
                user = rng.choice(users)
                if rng.random() < 0.6:
                    await _post(
                        http, f"/v1/wallets/{user}/top-ups", {"asset": "GOLD", "amount": rng.randint(1, 9)}
                    )
                else:
                    response = await http.post(
                        f"/v1/wallets/{user}/spends", json={"asset": "GOLD", "amount": rng.randint(1, 9)},
                        headers={"Idempotency-Key": uuid.uuid4().hex},
                    )  # fmt: skip
                    assert response.status_code in {201, 409}, response.text

        async def consume() -> None:
            cursor = None
            while not done.is_set() or len(seen) < await pool.fetchval("SELECT count(*) FROM events"):
                params: dict[str, Any] = {"limit": 7, "wait": 0.5}
                if cursor is not None:
                    params["after"] = cursor
                page = (await http.get("/v1/events", params=params)).json()
                seen.extend(page["items"])
                cursor = page["next_cursor"]

        consumer = asyncio.create_task(consume())
        try:
            await asyncio.gather(*(write(n) for n in range(12)))
            [row] = await run_batch(early, record(TopUpCredits(user_id="early", asset="GOLD", amount=5)))
            assert row["outcome"] == "accepted"
            await early_tx.commit()
        finally:
            await pool.release(early)
        done.set()
        await asyncio.wait_for(consumer, 120)
    expected = [r["event_id"] for r in await pool.fetch(_COMMIT_ORDER)]
    assert [i["event_id"] for i in seen] == expected  # each once, in commit order, none missing
    versions: dict[str, list[int]] = {}
    for item in seen:
        versions.setdefault(item["stream_id"], []).append(item["version"])
    assert all(v == list(range(1, len(v) + 1)) for v in versions.values())
    positions = [int(i["cursor"].partition(".")[2]) for i in seen]
    assert positions != sorted(positions)  # transactions committed out of position order
    early_event = next(i for i in seen if i["stream_id"] == "wallet:early" and i["version"] == 2)
    assert int(early_event["cursor"].partition(".")[2]) == max(positions)
    assert seen.index(early_event) < len(seen) - 1  # served before events positioned below it
    # Resumable at every cursor: from each one, what followed it, exactly.
    ids = [i["event_id"] for i in seen]
    for n in range(0, len(seen), 7):
        rest: list[str] = []
        after = Position.parse(seen[n]["cursor"])
        while len(rest) < len(seen) - n - 1:
            page, _ = await read_feed(pool, after, 1000)
            rest += [i.event_id for i in page.items]
            after = Position.parse(page.next_cursor)
        assert rest == ids[n + 1 :]
    async with pool.acquire() as conn:
        assert (await verify(conn)).ok


async def test_the_stream_resumes_after_its_last_event_id_with_keepalives(
    db_url: str, pool: asyncpg.Pool
) -> None:
    async with (
        serving(db_url, env={"TALLY_FEED_HEARTBEAT": "0.3"}) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http,
    ):
        await _setup(http, ["ann", "bob"])
        for amount in range(1, 6):
            await _post(http, "/v1/wallets/ann/top-ups", {"asset": "GOLD", "amount": amount})
        total = await pool.fetchval("SELECT count(*) FROM events")
        received: list[tuple[str, dict[str, Any]]] = []
        async with aconnect_sse(http, "GET", "/v1/events/stream") as source:
            assert source.response.headers["content-type"].startswith("text/event-stream")
            async for sse in source.aiter_sse():
                received.append((sse.id, sse.json()))
                if len(received) == 4:
                    break  # the client goes away mid-stream
        await _post(http, "/v1/wallets/bob/top-ups", {"asset": "GOLD", "amount": 100})
        keepalives = []
        headers = {"Last-Event-ID": received[-1][0]}
        async with aconnect_sse(http, "GET", "/v1/events/stream", headers=headers) as source:
            async for sse in source.aiter_sse():
                if sse.data == "":
                    keepalives.append(sse.id)  # a keep-alive: no event, just where the stream is
                    if len(received) == total + 1 and len(keepalives) >= 2:
                        break
                    continue
                received.append((sse.id, sse.json()))
        ids = [event["event_id"] for _, event in received]
        assert ids == [r["event_id"] for r in await pool.fetch(_COMMIT_ORDER)]
        assert all(sse_id == event["cursor"] for sse_id, event in received)
        assert keepalives[-1] == received[-1][0]
        # A filtered stream's keep-alive moves its id past the events the filter left out.
        async with aconnect_sse(http, "GET", "/v1/events/stream", params={"types": "AssetDefined"}) as source:
            filtered = [sse async for sse in _first(source.aiter_sse(), 2)]
        assert [s.json()["type"] for s in filtered[:1]] == ["AssetDefined"]
        assert (filtered[1].data, filtered[1].id) == ("", received[-1][0])


async def _first(events: Any, n: int) -> Any:
    count = 0
    async for event in events:
        yield event
        count += 1
        if count == n:
            return


async def test_sigterm_stops_a_server_with_open_streams(db_url: str) -> None:
    async with (
        serving(db_url) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http,
    ):
        await _setup(http, ["ann"])
        async with contextlib.AsyncExitStack() as open_streams:
            readers = []
            for _ in range(3):
                source = await open_streams.enter_async_context(
                    aconnect_sse(http, "GET", "/v1/events/stream")
                )
                readers.append(source.aiter_sse())  # kept: a reader let go would close its stream
                first = await anext(readers[-1])
                assert first.json()["type"] == "AssetDefined"
            await _until(http, "tally_feed_consumers", 'kind="stream"', 3.0)
            server.process.send_signal(signal.SIGTERM)
            code = await asyncio.wait_for(server.process.wait(), 60)
            assert code == 0
            for reader in readers:  # each stream ended whole (its reader sees the end, no broken body)
                rest = [sse.json()["type"] async for sse in reader if sse.data]
                assert rest in ([], ["WalletOpened"])
