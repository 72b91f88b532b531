"""Webhooks against real receivers (tests/receiver.py) and real server and projector processes: every
event acknowledged at least once, each signature valid by the `standardwebhooks` library, each
wallet's events sent in order (one only after the previous was acknowledged), failures and
time-outs retried, a dead endpoint not holding up a live one and parked after the retry period,
and a dispatcher killed mid-delivery replaced by its standby, which sends the delivery again."""

from __future__ import annotations

import asyncio
import collections
import os
import signal
import sys
import uuid
from typing import Any

import asyncpg
import httpx
import msgspec
from standardwebhooks import Webhook

from projections.dispatcher import DISPATCHER_LOCK_KEY
from tests.conftest import serving
from tests.helpers import AUTH
from tests.receiver import Received, receiving

WEBHOOK_KEY = "test-webhook-key-0123456789abcdef"
FAST = {
    "TALLY_WEBHOOK_KEY": WEBHOOK_KEY,
    "TALLY_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
    "TALLY_WEBHOOK_TIMEOUT": "0.5",
    "TALLY_WEBHOOK_BACKOFF": "0.05",
}


async def _post(http: httpx.AsyncClient, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    response = await http.post(path, json=body, headers={"Idempotency-Key": uuid.uuid4().hex})
    assert response.status_code in {200, 201, 202}, response.text
    result: dict[str, Any] = response.json()
    return result


async def _ledger(http: httpx.AsyncClient, users: list[str]) -> None:
    await _post(http, "/v1/assets", {"code": "GOLD", "name": "Gold", "decimals": 0})
    for user in users:
        await _post(http, "/v1/wallets", {"user_id": user})


async def _moves(http: httpx.AsyncClient, users: list[str], per_user: int) -> list[str]:
    """Top-ups then a spend per user, the users' commands concurrent: the transaction ids (each the
    id of its event)."""

    async def one_user(user: str) -> list[str]:
        made = []
        for n in range(per_user):
            flow = "spends" if n == per_user - 1 else "top-ups"
            made.append(
                (await _post(http, f"/v1/wallets/{user}/{flow}", {"asset": "GOLD", "amount": 1}))[
                    "transaction_id"
                ]
            )
        return made

    return [tx for user_txs in await asyncio.gather(*(one_user(u) for u in users)) for tx in user_txs]


def _version(entry: Received) -> tuple[str, int]:
    event = msgspec.json.decode(entry.body)
    return event["stream_id"], event["version"]


def _check_order(log: list[Received]) -> None:
    """No event of a wallet was sent before the previous one delivered was acknowledged."""
    acked: dict[str, dict[int, float]] = collections.defaultdict(dict)
    for entry in log:
        if entry.status is not None and 200 <= entry.status < 300:
            stream, version = _version(entry)
            acked[stream].setdefault(version, entry.answered_at or 0.0)
    for entry in log:
        stream, version = _version(entry)
        earlier = [v for v in acked[stream] if v < version]
        if earlier:
            assert entry.at >= acked[stream][max(earlier)], (
                f"{stream} v{version} sent before v{max(earlier)} was acknowledged"
            )


async def test_every_event_is_delivered_signed_in_wallet_order_through_failures_and_timeouts(
    db_url: str, pool: asyncpg.Pool
) -> None:
    attempts: collections.Counter[str] = collections.Counter()

    def flaky(entry: Received) -> int | str:
        attempts[entry.headers["webhook-id"]] += 1
        return {1: 500, 2: "hang"}.get(attempts[entry.headers["webhook-id"]], 204)

    users = ["ann", "bob", "cid"]
    async with (
        receiving(flaky) as receiver,
        serving(db_url, env=FAST) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http,
    ):
        await _ledger(http, users)
        hook = await _post(http, "/v1/webhooks", {"url": f"{receiver.url}/all"})
        assert hook["secret"].startswith("whsec_")
        expected = await _moves(http, users, 4)
        await receiver.until(lambda r: {e.headers["webhook-id"] for e in r.acknowledged()} >= set(expected))
        moves = {"CreditsToppedUp", "CreditsSpent"}
        acked = {
            e.headers["webhook-id"]: msgspec.json.decode(e.body)["type"] for e in receiver.acknowledged()
        }
        assert {event_id for event_id, kind in acked.items() if kind in moves} == set(expected)
        # Besides, at most events committed just before the subscription whose transactions were not
        # all finished yet (the feed's head had not reached them): its setup's.
        assert {kind for kind in acked.values() if kind not in moves} <= {"AssetDefined", "WalletOpened"}
        for entry in receiver.log:  # every attempt signed with the subscription's secret
            event = Webhook(hook["secret"]).verify(entry.body, entry.headers)
            assert event["event_id"] == entry.headers["webhook-id"]
        assert min(attempts.values()) == 3  # each failed, timed out, then was acknowledged
        _check_order(receiver.log)
        view = (await http.get(f"/v1/webhooks/{hook['webhook_id']}")).json()
        counts = [view[k] for k in ("pending", "parked", "attempts", "failures")]
        assert counts == [0, 0, 3 * len(expected), 2 * len(expected)]
        deliveries = (
            await http.get(f"/v1/webhooks/{hook['webhook_id']}/deliveries", params={"limit": 200})
        ).json()
        assert {d["attempts"] for d in deliveries["items"]} == {3}
        assert all(d["status"] == "delivered" and d["last_status"] == 204 for d in deliveries["items"])
        # `tally webhooks replay` sends them all again, and the events from before the subscription.
        before = len(receiver.log)
        replay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "api.cli", "webhooks", "replay", hook["webhook_id"],
            env={**os.environ, "DATABASE_URL": db_url, "TALLY_LOG_LEVEL": "warning"},
        )  # fmt: skip
        assert await asyncio.wait_for(replay.wait(), 60) == 0
        everything = await pool.fetch(
            "SELECT event_id::text FROM events ORDER BY writer_xid, global_position"
        )
        await receiver.until(
            lambda r: (
                {e.headers["webhook-id"] for e in r.acknowledged() if e in r.log[before:]}
                >= {row["event_id"] for row in everything}
            )
        )
        _check_order(receiver.log[before:])


async def test_a_dead_endpoint_does_not_hold_up_a_live_one_and_is_parked(db_url: str) -> None:
    env = {**FAST, "TALLY_WEBHOOK_RETRY_SECONDS": "3"}
    users = ["ann", "bob"]
    async with (
        receiving(lambda e: "hang" if e.path == "dead" else 204) as receiver,
        serving(db_url, env=env) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http,
    ):
        await _ledger(http, users)
        dead = await _post(http, "/v1/webhooks", {"url": f"{receiver.url}/dead"})
        await _post(http, "/v1/webhooks", {"url": f"{receiver.url}/live"})
        expected = await _moves(http, users, 3)
        await receiver.until(lambda r: len(r.acknowledged("live")) == len(expected))
        stuck = (await http.get(f"/v1/webhooks/{dead['webhook_id']}")).json()
        assert stuck["pending"] + stuck["parked"] == len(expected)
        assert stuck["attempts"] == stuck["failures"]  # none acknowledged
        # Each of the dead one's deliveries is retried for 3 s after it was enqueued, then parked.
        deadline = asyncio.get_running_loop().time() + 60
        while (await http.get(f"/v1/webhooks/{dead['webhook_id']}")).json()["parked"] < len(expected):
            assert asyncio.get_running_loop().time() < deadline, (
                "the dead endpoint's deliveries were never parked"
            )
            await asyncio.sleep(0.2)
        parked = (
            await http.get(f"/v1/webhooks/{dead['webhook_id']}/deliveries", params={"status": "parked"})
        ).json()
        assert len(parked["items"]) == len(expected)
        assert all("no answer within" in d["last_error"] for d in parked["items"])
        # Each wallet's first was retried until the period ran out; those queued behind it had waited
        # that long already, and were parked at their first failed attempt.
        assert max(d["attempts"] for d in parked["items"]) >= 2
        assert min(d["attempts"] for d in parked["items"]) >= 1
        assert all(d["last_status"] is None and d["next_attempt_at"] is None for d in parked["items"])
        metrics = (await http.get("/metrics")).text
        dead_id, attempts = dead["webhook_id"], sum(d["attempts"] for d in parked["items"])
        assert (
            f'tally_webhook_deliveries{{status="parked",webhook="{dead_id}"}} {float(len(expected))}'
            in metrics
        )
        assert f'tally_webhook_failures{{webhook="{dead_id}"}} {float(attempts)}' in metrics
        _check_order([e for e in receiver.log if e.path == "live"])
        # The live one had everything while the dead one was still being tried.
        last_live = max(e.answered_at or 0.0 for e in receiver.acknowledged("live"))
        assert any(e.path == "dead" and e.at > last_live for e in receiver.log)


_ACTIVE = f"""
SELECT a.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
 WHERE l.locktype = 'advisory' AND l.objid = {DISPATCHER_LOCK_KEY} AND l.granted
   AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def test_a_dispatcher_killed_mid_delivery_is_replaced_and_the_delivery_sent_again(
    db_url: str, pool: asyncpg.Pool
) -> None:
    """Two `tally projector` processes (each runs a dispatcher; one is active). The receiver holds
    the first delivery unanswered; the active process is killed; the standby takes over and sends
    the same event again (same webhook-id), which is then acknowledged."""
    env = {
        **os.environ, **FAST, "DATABASE_URL": db_url, "TALLY_LOG_LEVEL": "warning",
        "TALLY_PROJECTOR_POLL_INTERVAL": "0.2", "TALLY_WEBHOOK_TIMEOUT": "30",
    }  # fmt: skip
    first: list[str] = []

    def hold_the_first(entry: Received) -> int | str:
        if not first:
            first.append(entry.headers["webhook-id"])
            return "hang"
        return 204

    async with (
        receiving(hold_the_first) as receiver,
        serving(db_url, env=FAST, projector=False) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http,
    ):
        projectors = []
        try:
            projectors.append(
                await asyncio.create_subprocess_exec(sys.executable, "-m", "api.cli", "projector", env=env)
            )
            await _ledger(http, ["ann"])
            hook = await _post(http, "/v1/webhooks", {"url": f"{receiver.url}/hook"})
            projectors.append(
                await asyncio.create_subprocess_exec(sys.executable, "-m", "api.cli", "projector", env=env)
            )
            moved = await _post(http, "/v1/wallets/ann/top-ups", {"asset": "GOLD", "amount": 5})
            await receiver.until(lambda r: len(r.log) >= 1)
            active = await pool.fetch(_ACTIVE)
            assert len(active) == 1
            pids = await _pids_of(pool, active[0]["pid"])
            victim = next(p for p in projectors if p.pid in pids)
            victim.send_signal(signal.SIGKILL)
            await victim.wait()
            await receiver.until(lambda r: len(r.acknowledged()) >= 1)
            assert first == [moved["transaction_id"]]
            assert [e.headers["webhook-id"] for e in receiver.acknowledged()] == first
            assert [e.headers["webhook-id"] for e in receiver.log] == first * 2  # sent again, never skipped
            [delivery] = (await http.get(f"/v1/webhooks/{hook['webhook_id']}/deliveries")).json()["items"]
            assert (delivery["status"], delivery["attempts"]) == (
                "delivered",
                1,
            )  # the killed attempt left nothing
        finally:
            for process in projectors:
                if process.returncode is None:
                    process.terminate()
                    await process.wait()


async def _pids_of(pool: asyncpg.Pool, backend_pid: int) -> set[int]:
    """The OS process behind a database session: the dispatcher names its sessions
    tally-dispatcher:<pid>."""
    name = await pool.fetchval("SELECT application_name FROM pg_stat_activity WHERE pid = $1", backend_pid)
    assert name.startswith("tally-dispatcher:"), name
    return {int(name.partition(":")[2])}


async def test_a_replay_while_a_delivery_is_in_flight_sends_everything_again_in_order(db_url: str) -> None:
    """Found in review: an answer to an attempt begun before a replay was taken for the replayed
    delivery's acknowledgement, so that event was never sent again, and the replayed ones went out
    of order. Wallet ann's version 3 is held unanswered while its subscription is replayed from the
    start; then the old attempt gets its 204."""
    held: list[str] = []

    def hold_version_3(entry: Received) -> int | str:
        if _version(entry) == ("wallet:ann", 3) and not held:
            held.append(entry.headers["webhook-id"])
            return "hang"
        return 204

    async with (
        receiving(hold_version_3) as receiver,
        serving(db_url, env={**FAST, "TALLY_WEBHOOK_TIMEOUT": "30"}) as server,
        httpx.AsyncClient(base_url=server.url, headers=AUTH, timeout=60) as http,
    ):
        await _ledger(http, ["ann"])
        hook = await _post(http, "/v1/webhooks", {"url": f"{receiver.url}/hook"})
        await _moves(http, ["ann"], 3)  # versions 2, 3 and 4
        await receiver.until(lambda r: bool(held))
        replayed_at = asyncio.get_running_loop().time()
        replayed = await _post(http, f"/v1/webhooks/{hook['webhook_id']}/replay", {"after": "0.0"})
        # 2 (delivered) and 3 (in flight) set pending again; and 4, if it was enqueued already.
        assert replayed["replayed"] in {2, 3}
        receiver.release.set()  # the attempt from before the replay is answered now

        def again(r: Any) -> list[int]:
            return [
                _version(e)[1]
                for e in r.acknowledged()
                if e.at > replayed_at and _version(e)[0] == "wallet:ann"
            ]

        await receiver.until(lambda r: again(r) == [1, 2, 3, 4])
        _check_order([e for e in receiver.log if e.at > replayed_at])
        page = (await http.get(f"/v1/webhooks/{hook['webhook_id']}/deliveries", params={"limit": 200})).json()
        assert {d["status"] for d in page["items"]} == {"delivered"}
