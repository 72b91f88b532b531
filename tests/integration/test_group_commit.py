"""Group commit: commands that queue while others run share one call and one transaction, and
decide exactly as they would alone."""

from __future__ import annotations

import asyncio
import json
import uuid

import asyncpg
import pytest

from commands import EventStore, IdempotencyKeyReused, handle_spend_credits, handle_top_up_credits
from commands.event_store import _POST_TRANSACTIONS, CommandContext
from domain import InsufficientFunds, SpendCredits, TopUpCredits, VersionMismatch, WalletNotFound
from tests.helpers import ctx, define_asset, open_wallet, stream_balance


async def test_one_batch_decides_each_command_as_alone(pool: asyncpg.Pool) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    for user in ("ann", "ben"):
        await open_wallet(setup, user)
    # One call at a time: everything queued while it runs goes in the next batch together.
    store = EventStore(pool, max_in_flight=1)
    calls = [
        handle_top_up_credits(store, TopUpCredits(user_id="ben", asset="GOLD", amount=50), ctx("t1", "a")),
        handle_spend_credits(store, SpendCredits(user_id="ben", asset="GOLD", amount=30), ctx("s1", "b")),
        handle_spend_credits(store, SpendCredits(user_id="ben", asset="GOLD", amount=30), ctx("s2", "c")),
        handle_spend_credits(store, SpendCredits(user_id="ben", asset="GOLD", amount=30), ctx("s1", "b")),
        handle_spend_credits(store, SpendCredits(user_id="ben", asset="GOLD", amount=1), ctx("s1", "x")),
        handle_top_up_credits(store, TopUpCredits(user_id="nobody", asset="GOLD", amount=5), ctx("n1", "d")),
        handle_top_up_credits(
            store, TopUpCredits(user_id="ann", asset="GOLD", amount=5, expected_version=9), ctx("v1", "e")
        ),
        handle_top_up_credits(store, TopUpCredits(user_id="ann", asset="GOLD", amount=7), ctx("a1", "f")),
    ]
    results = await asyncio.gather(*calls, return_exceptions=True)

    top_up, spent, refused, replay, reused, missing, stale, ann = results
    assert not isinstance(top_up, BaseException)
    assert not top_up.replayed
    assert not isinstance(spent, BaseException)
    assert not spent.replayed
    assert isinstance(refused, InsufficientFunds)
    assert not refused.replayed
    assert not isinstance(replay, BaseException)
    assert replay.replayed
    assert replay.body == spent.body
    assert isinstance(reused, IdempotencyKeyReused)
    assert isinstance(missing, WalletNotFound)
    assert isinstance(stale, VersionMismatch)
    assert not isinstance(ann, BaseException)
    assert await stream_balance(pool, "ben") == 20
    assert await stream_balance(pool, "ann") == 7
    # Not-found rejections are not recorded, so that key is free for a later, valid request.
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'n1'") == 0
    assert await pool.fetchval("SELECT status FROM commands WHERE command_id = 'v1'") == 412
    # They really went together: the three new events were written by one transaction.
    transactions = await pool.fetchval(
        "SELECT count(DISTINCT transaction_id) FROM events WHERE stream_version > 1"
    )
    assert transactions == 1


async def test_a_failing_command_does_not_sink_its_batch(pool: asyncpg.Pool) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "ann")
    store = EventStore(pool, max_in_flight=1)

    async def top_up(amount: int) -> object:
        # Calling the store directly, past the domain's bounds: bigint cannot hold 2**70.
        return await store.post_transaction(
            ctx(uuid.uuid4().hex), event_type="CreditsToppedUp", kind="top_up", user_id="ann", asset="GOLD",
            amount=amount, user_delta=amount, entries=[{"account": "system:treasury", "amount": -amount},
                                                       {"account": "user:ann", "amount": amount}],
            reference=None, metadata={}, expected_version=None,
        )  # fmt: skip

    results = await asyncio.gather(top_up(1), top_up(2), top_up(2**70), top_up(4), return_exceptions=True)
    assert [isinstance(r, BaseException) for r in results] == [False, False, True, False]
    assert await stream_balance(pool, "ann") == 7


async def test_hot_wallet_batches_keep_the_floor(pool: asyncpg.Pool) -> None:
    """Many batches racing on one wallet: exactly the affordable spends succeed."""
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "hot")
    await handle_top_up_credits(setup, TopUpCredits(user_id="hot", asset="GOLD", amount=1_000), ctx())
    stores = [EventStore(pool, max_in_flight=2, max_batch=7) for _ in range(3)]  # three "API processes"
    spends = [
        handle_spend_credits(stores[i % 3], SpendCredits(user_id="hot", asset="GOLD", amount=30), ctx())
        for i in range(60)
    ]
    results = await asyncio.gather(*spends, return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert len(accepted) == 1_000 // 30
    assert all(isinstance(r, InsufficientFunds) for r in results if isinstance(r, BaseException))
    assert await stream_balance(pool, "hot") == 1_000 % 30


@pytest.mark.parametrize("max_batch", [1, 3])
async def test_batch_size_does_not_change_outcomes(pool: asyncpg.Pool, max_batch: int) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "u")
    store = EventStore(pool, max_in_flight=1, max_batch=max_batch)
    results = await asyncio.gather(
        *(
            handle_top_up_credits(store, TopUpCredits(user_id="u", asset="GOLD", amount=i), ctx())
            for i in range(1, 11)
        )
    )
    assert len({r.body for r in results}) == 10
    assert await stream_balance(pool, "u") == 55


def _top_up_args(key: str, user: str, amount: int, reference: str) -> tuple[object, ...]:
    entries = [
        {"account": "system:treasury", "amount": -amount},
        {"account": f"user:{user}", "amount": amount},
    ]
    fingerprint = CommandContext.fingerprint_of(key, user, str(amount), reference)
    return (key, fingerprint, json.dumps({"command_id": key}), uuid.uuid4(), "CreditsToppedUp", "top_up",
            user, "GOLD", amount, amount, json.dumps(entries), reference, "{}", None)  # fmt: skip


def _columns(*commands: tuple[object, ...]) -> list[list[object]]:
    return [list(column) for column in zip(*commands, strict=True)]


async def test_a_retried_key_racing_its_own_batch_does_not_deadlock(pool: asyncpg.Pool) -> None:
    """Found in review: batch A = [K1, K2] holds the wallet while a retry of K2 (batch B) claims K2
    and waits for the wallet: a cycle, when keys were claimed in wallet order. Keys are now all
    claimed before any wallet is locked."""
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "alice")
    # This test database only: make the first append slow, so B arrives while A holds the wallet.
    await pool.execute(
        """CREATE FUNCTION slow_append() RETURNS trigger LANGUAGE plpgsql AS $$
           BEGIN IF NEW.data ->> 'reference' = 'slow' THEN PERFORM pg_sleep(0.5); END IF; RETURN NEW; END $$;
           CREATE TRIGGER slow_append BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION slow_append()"""
    )
    k1 = _top_up_args("K1", "alice", 10, "slow")
    k2 = _top_up_args("K2", "alice", 20, "fast")
    k2_retry = (*k2[:3], uuid.uuid4(), *k2[4:])

    async def batch_b() -> list[asyncpg.Record]:
        await asyncio.sleep(0.2)
        return await pool.fetch(_POST_TRANSACTIONS, *_columns(k2_retry))

    a, b = await asyncio.gather(pool.fetch(_POST_TRANSACTIONS, *_columns(k1, k2)), batch_b())
    assert [(r["status"], r["replayed"]) for r in a] == [(201, False), (201, False)]
    assert [(r["status"], r["replayed"]) for r in b] == [(201, True)]
    assert b[0]["body"] == a[1]["body"]
    assert await stream_balance(pool, "alice") == 30


async def test_a_repeated_key_within_one_batch_replays_its_first_occurrence(pool: asyncpg.Pool) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "alice")
    first = _top_up_args("K", "alice", 10, "r")
    again = (*first[:3], uuid.uuid4(), *first[4:])
    other = _top_up_args("K", "alice", 99, "r")  # same key, another request
    rows = await pool.fetch(_POST_TRANSACTIONS, *_columns(first, again, other))
    assert [(r["status"], r["replayed"]) for r in rows] == [(201, False), (201, True), (422, False)]
    assert rows[0]["body"] == rows[1]["body"]
    assert await stream_balance(pool, "alice") == 10


async def test_legs_that_do_not_match_the_kind_are_refused(pool: asyncpg.Pool) -> None:
    """Found in review: the SQL trusted the planned legs, so a bug (or a direct caller) could post a
    "spend" that credits the user. The function now requires exactly the flow's legs."""
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "alice")
    forged = list(_top_up_args("F", "alice", 5, "r"))
    forged[4:6] = ["CreditsSpent", "spend"]  # a "spend" whose legs credit the user
    with pytest.raises(asyncpg.DataError, match="do not match"):
        await pool.fetch(_POST_TRANSACTIONS, *_columns(tuple(forged)))
    assert await stream_balance(pool, "alice") == 0
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'F'") == 0
