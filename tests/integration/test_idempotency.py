"""Exactly-once commands under the Idempotency-Key, with real concurrent duplicates."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from commands import EventStore, IdempotencyKeyReused, handle_spend_credits, handle_top_up_credits
from domain import InsufficientFunds, SpendCredits, TopUpCredits, WalletNotFound
from tests.helpers import ctx, define_asset, open_wallet, stream_balance, top_up


async def test_concurrent_duplicates_have_one_effect(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "dup")
    command = TopUpCredits(user_id="dup", asset="GOLD", amount=500)

    results = await asyncio.gather(
        *(handle_top_up_credits(store, command, ctx("same-key", "same request")) for _ in range(30))
    )

    assert sum(not r.replayed for r in results) == 1
    assert len({r.body for r in results}) == 1
    assert await stream_balance(pool, "dup") == 500
    assert await pool.fetchval("SELECT count(*) FROM events WHERE stream_id = 'wallet:dup'") == 2


async def test_retry_replays_the_first_outcome(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "retry")
    command = TopUpCredits(user_id="retry", asset="GOLD", amount=5)
    first = await handle_top_up_credits(store, command, ctx("k", "r"))
    second = await handle_top_up_credits(store, command, ctx("k", "r"))
    assert (first.replayed, second.replayed) == (False, True)
    assert first.body == second.body
    assert await stream_balance(pool, "retry") == 5


async def test_same_key_for_another_request_is_refused(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "reuse")
    await handle_top_up_credits(store, TopUpCredits(user_id="reuse", asset="GOLD", amount=5), ctx("k", "a"))
    with pytest.raises(IdempotencyKeyReused):
        await handle_top_up_credits(
            store, TopUpCredits(user_id="reuse", asset="GOLD", amount=6), ctx("k", "b")
        )
    assert await stream_balance(pool, "reuse") == 5


async def test_insufficient_funds_is_recorded_and_replayed(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "poor")
    command = SpendCredits(user_id="poor", asset="GOLD", amount=10)
    with pytest.raises(InsufficientFunds) as first:
        await handle_spend_credits(store, command, ctx("spend-1", "s"))
    assert first.value.replayed is False

    await top_up(store, "poor", 100)  # the wallet could now afford it, but the decision stands
    with pytest.raises(InsufficientFunds) as again:
        await handle_spend_credits(store, command, ctx("spend-1", "s"))
    assert again.value.replayed is True
    assert again.value.detail == first.value.detail
    assert await stream_balance(pool, "poor") == 100


async def test_not_found_is_not_recorded(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    command = TopUpCredits(user_id="later", asset="GOLD", amount=10)
    with pytest.raises(WalletNotFound):
        await handle_top_up_credits(store, command, ctx("early", "t"))
    assert await pool.fetchval("SELECT count(*) FROM commands WHERE command_id = 'early'") == 0

    await open_wallet(store, "later")
    accepted = await handle_top_up_credits(store, command, ctx("early", "t"))
    assert accepted.replayed is False
    assert await stream_balance(pool, "later") == 10
