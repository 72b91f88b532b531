"""Group commit: commands that queue while others run share one call and one transaction, and
decide exactly as they would alone."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import msgspec
import pytest

from commands import EventStore, handle
from commands.event_store import _POST_TRANSACTIONS
from domain import (
    MAX_AMOUNT,
    IdempotencyKeyReused,
    InsufficientFunds,
    SpendCredits,
    TopUpCredits,
    VersionMismatch,
    WalletNotFound,
)
from tests.helpers import (
    ctx,
    define_asset,
    holding_wallet,
    lock_waits,
    open_wallet,
    record,
    run_batch,
    stream_balance,
)


async def test_one_batch_decides_each_command_as_alone(pool: asyncpg.Pool) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    for user in ("ann", "ben"):
        await open_wallet(setup, user)
    # One call at a time: the first call starts when the event loop next runs, and by then all eight
    # commands are queued, so they go in one batch together.
    store = EventStore(pool, max_in_flight=1)
    calls = [
        handle(store, TopUpCredits(user_id="ben", asset="GOLD", amount=50), ctx("t1", "a")),
        handle(store, SpendCredits(user_id="ben", asset="GOLD", amount=30), ctx("s1", "b")),
        handle(store, SpendCredits(user_id="ben", asset="GOLD", amount=30), ctx("s2", "c")),
        handle(store, SpendCredits(user_id="ben", asset="GOLD", amount=30), ctx("s1", "b")),
        handle(store, SpendCredits(user_id="ben", asset="GOLD", amount=1), ctx("s1", "x")),
        handle(store, TopUpCredits(user_id="nobody", asset="GOLD", amount=5), ctx("n1", "d")),
        handle(
            store, TopUpCredits(user_id="ann", asset="GOLD", amount=5, expected_version=9), ctx("v1", "e")
        ),
        handle(store, TopUpCredits(user_id="ann", asset="GOLD", amount=7), ctx("a1", "f")),
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
    assert await pool.fetchval("SELECT outcome FROM commands WHERE command_id = 'v1'") == "version_mismatch"
    # They really went together: the three new events were written by one transaction (the rows'
    # xmin; a writer_xid may be an earlier writer's, commands/sql/tally_writer_xid.sql).
    transactions = await pool.fetchval(
        "SELECT count(DISTINCT xmin::text) FROM events WHERE event_type <> 'WalletOpened' "
        "AND stream_version > 1"
    )
    assert transactions == 1


async def test_a_failing_command_does_not_sink_its_batch(pool: asyncpg.Pool) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "ann")
    store = EventStore(pool, max_in_flight=1)

    async def top_up(amount: int) -> object:
        # Built without validation (msgspec checks bounds when decoding a request), past the
        # domain's bounds: bigint cannot hold 2**70, so the batch holding it fails in PostgreSQL.
        return await store.post_transaction(ctx(), TopUpCredits(user_id="ann", asset="GOLD", amount=amount))

    results = await asyncio.gather(top_up(1), top_up(2), top_up(2**70), top_up(4), return_exceptions=True)
    assert [isinstance(r, BaseException) for r in results] == [False, False, True, False]
    assert await stream_balance(pool, "ann") == 7


async def test_hot_wallet_batches_keep_the_floor(pool: asyncpg.Pool) -> None:
    """Many batches racing on one wallet: exactly the affordable spends succeed."""
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "hot")
    await handle(setup, TopUpCredits(user_id="hot", asset="GOLD", amount=1_000), ctx())
    stores = [EventStore(pool, max_in_flight=2, max_batch=7) for _ in range(3)]  # three "API processes"
    spends = [
        handle(stores[i % 3], SpendCredits(user_id="hot", asset="GOLD", amount=30), ctx()) for i in range(60)
    ]
    results = await asyncio.gather(*spends, return_exceptions=True)
    accepted = [r for r in results if not isinstance(r, BaseException)]
    assert len(accepted) == 1_000 // 30
    assert all(isinstance(r, InsufficientFunds) for r in results if isinstance(r, BaseException))
    assert await stream_balance(pool, "hot") == 1_000 % 30
    # Batches of three "processes" took turns on the wallet, each in its own transaction.
    assert (
        await pool.fetchval("SELECT count(DISTINCT xmin::text) FROM events WHERE event_type = 'CreditsSpent'")
        > 1
    )


@pytest.mark.parametrize("max_batch", [1, 3])
async def test_batch_size_does_not_change_outcomes(pool: asyncpg.Pool, max_batch: int) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "u")
    store = EventStore(pool, max_in_flight=1, max_batch=max_batch)
    results = await asyncio.gather(
        *(handle(store, TopUpCredits(user_id="u", asset="GOLD", amount=i), ctx()) for i in range(1, 11))
    )
    assert len({r.body for r in results}) == 10
    assert await stream_balance(pool, "u") == 55


async def test_a_retried_key_racing_its_own_batch_does_not_deadlock(pool: asyncpg.Pool) -> None:
    """Found in review: batch A = [K1, K2] holds the wallet while a retry of K2 (batch B) claims K2
    and waits for the wallet: a cycle, when keys were claimed in wallet order. Now a batch that
    waits for a wallet (A, retrying a held wallet) takes it before any key, and a group batch (B)
    never waits for a wallet. Staged for real: A is seen waiting for the wallet's holder; B then
    runs to its end while A waits, holding no key of A's, and leaves K2 free."""
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "alice")
    k1 = record(TopUpCredits(user_id="alice", asset="GOLD", amount=10), "K1")
    k2 = record(TopUpCredits(user_id="alice", asset="GOLD", amount=20), "K2")

    async def batch(*records: object, lock_wait_ms: int | None) -> list[asyncpg.Record]:
        async with pool.acquire() as conn:
            return await run_batch(conn, *records, lock_wait_ms=lock_wait_ms)  # type: ignore[arg-type]

    async with holding_wallet(pool, "alice") as holder:
        a = asyncio.create_task(batch(k1, k2, lock_wait_ms=30_000))
        await lock_waits(pool, lambda w: any(x["blockers"] == [holder] for x in w))
        rows_b = await asyncio.wait_for(batch(k2, lock_wait_ms=None), 30)
        assert [(r["outcome"], r["replayed"]) for r in rows_b] == [("wallet_locked", False)]
        assert not a.done()
    rows_a = await asyncio.wait_for(a, 30)
    assert [(r["outcome"], r["replayed"]) for r in rows_a] == [("accepted", False), ("accepted", False)]
    [again] = await run_batch(pool, k2, lock_wait_ms=None)  # the retry, later: a replay
    assert (again["outcome"], again["replayed"], again["body"]) == ("accepted", True, rows_a[1]["body"])
    assert await stream_balance(pool, "alice") == 30


async def test_a_group_batch_leaves_a_held_wallet_and_decides_the_rest(pool: asyncpg.Pool) -> None:
    """A wallet another session holds (an operator's SELECT … FOR UPDATE) is not waited for: its
    commands come back `wallet_locked` with nothing recorded and their keys free (a repeat of one
    in the batch too), while the batch's other commands are decided and committed."""
    setup = EventStore(pool)
    await define_asset(setup)
    for user in ("held", "free"):
        await open_wallet(setup, user)
    held = record(TopUpCredits(user_id="held", asset="GOLD", amount=5), "H")
    free = record(TopUpCredits(user_id="free", asset="GOLD", amount=7), "F")
    async with holding_wallet(pool, "held"):
        rows = await asyncio.wait_for(run_batch(pool, held, free, held, lock_wait_ms=None), 30)
        assert [(r["outcome"], r["replayed"]) for r in rows] == [
            ("wallet_locked", False),
            ("accepted", False),
            ("wallet_locked", True),
        ]
        assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'H'") == 0
        assert await stream_balance(pool, "free") == 7
    [later] = await run_batch(pool, held, lock_wait_ms=None)
    assert (later["outcome"], later["replayed"]) == ("accepted", False)
    assert await stream_balance(pool, "held") == 5


async def test_a_batch_waiting_for_a_held_wallet_gives_up_after_its_lock_wait(pool: asyncpg.Pool) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "held")
    held = record(TopUpCredits(user_id="held", asset="GOLD", amount=5), "H")
    async with holding_wallet(pool, "held"):
        with pytest.raises(asyncpg.LockNotAvailableError):
            await asyncio.wait_for(run_batch(pool, held, lock_wait_ms=200), 30)
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'H'") == 0
    [later] = await run_batch(pool, held, lock_wait_ms=200)
    assert (later["outcome"], later["replayed"]) == ("accepted", False)


async def test_a_repeated_key_within_one_batch_replays_its_first_occurrence(pool: asyncpg.Pool) -> None:
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "alice")
    first = record(TopUpCredits(user_id="alice", asset="GOLD", amount=10), "K", "r")
    again = record(TopUpCredits(user_id="alice", asset="GOLD", amount=10), "K", "r")
    other = record(TopUpCredits(user_id="alice", asset="GOLD", amount=99), "K", "another request")
    rows = await run_batch(pool, first, again, other)
    assert [(r["outcome"], r["replayed"]) for r in rows] == [
        ("accepted", False), ("accepted", True), ("idempotency_key_reused", False),
    ]  # fmt: skip
    assert rows[0]["body"] == rows[1]["body"]
    assert await stream_balance(pool, "alice") == 10


async def test_a_kind_that_is_no_flow_is_refused(pool: asyncpg.Pool) -> None:
    """Python sends the kind the caller asked for and the SQL takes the legs from the flows table;
    a kind with no flow (only a direct caller could send one) applies nothing."""
    setup = EventStore(pool)
    await define_asset(setup)
    await open_wallet(setup, "alice")
    forged = msgspec.to_builtins(record(TopUpCredits(user_id="alice", asset="GOLD", amount=5), "F"))
    forged["command"]["kind"] = "gift"
    with pytest.raises(asyncpg.DataError, match="unknown kind gift"):
        await pool.fetch(_POST_TRANSACTIONS, json.dumps([forged]), None)
    assert await stream_balance(pool, "alice") == 0
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'F'") == 0


async def test_the_decider_refuses_what_the_http_api_would_have(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """The SQL is the rule: an amount outside 1..10^15 never moves credits, whoever calls (found in
    review: a spend of -1000 credited the user). Python builds such commands unchecked; the HTTP API
    refuses them before they get here."""
    await define_asset(store)
    await open_wallet(store, "ann")
    for amount in (0, -1000, MAX_AMOUNT + 1):
        with pytest.raises(asyncpg.DataError, match="not a valid transaction command"):
            await handle(store, SpendCredits(user_id="ann", asset="GOLD", amount=amount), ctx())
    accepted = await handle(store, TopUpCredits(user_id="ann", asset="GOLD", amount=MAX_AMOUNT), ctx())
    assert json.loads(accepted.body)["balance_after"] == MAX_AMOUNT
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE outcome IS NULL") == 0
    assert await stream_balance(pool, "ann") == MAX_AMOUNT


async def test_a_key_refused_then_claimed_within_a_batch_records_the_claimants_request(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """Found by the model-based test: a key's first occurrence is refused (no such wallet) and a
    later one, another request, claims it; the outcome must be recorded under the later request,
    so that a retry of it replays and a retry of the refused one is told the key was reused."""
    await define_asset(store)
    await open_wallet(store, "ann")
    refused = record(TopUpCredits(user_id="nobody", asset="GOLD", amount=5), "K", "the refused request")
    claimant = record(TopUpCredits(user_id="ann", asset="GOLD", amount=7), "K", "the claimant's request")
    rows = await run_batch(pool, refused, claimant)
    assert [(r["outcome"], r["replayed"]) for r in rows] == [("wallet_not_found", False), ("accepted", False)]

    [again] = await run_batch(pool, claimant)
    assert (again["outcome"], again["replayed"], again["body"]) == ("accepted", True, rows[1]["body"])
    [other] = await run_batch(pool, refused)
    assert (other["outcome"], other["replayed"]) == ("idempotency_key_reused", False)
    assert await stream_balance(pool, "ann") == 7
