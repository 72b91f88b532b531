"""The projector never skips an event, whatever order transactions commit in."""

from __future__ import annotations

import asyncpg
import pytest

from commands import EventStore
from projections.projector import project_batch
from projections.queries import WalletIncomplete, get_wallet, wallet_history
from tests.helpers import begin_top_up, define_asset, open_wallet, projected, top_up_in


async def _rm_balance(pool: asyncpg.Pool, user_id: str) -> int | None:
    value = await pool.fetchval(
        "SELECT balance FROM rm_balances WHERE user_id = $1 AND asset = 'GOLD'", user_id
    )
    return None if value is None else int(value)


async def test_late_commit_of_an_earlier_position_is_not_skipped(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    await define_asset(store)
    await open_wallet(store, "early")
    await open_wallet(store, "late")
    await projected(pool)

    slow = await pool.acquire()
    fast = await pool.acquire()
    try:
        # `slow` draws the lower global_position but commits last.
        slow_tx = await begin_top_up(slow, "early", 7)
        fast_tx = await begin_top_up(fast, "late", 11)
        await fast_tx.commit()
        visible = await pool.fetch(
            "SELECT data ->> 'user_id' AS who FROM events WHERE data ->> 'kind' = 'top_up'"
        )
        assert [r["who"] for r in visible] == ["late"]  # committed; `early` is still in flight
        # While `slow` is open, a projection must not move past it, so it applies nothing yet.
        applied, _ = await project_batch(pool, "wallets", 100)
        assert applied == 0
        assert await _rm_balance(pool, "late") is None
        await slow_tx.commit()
    finally:
        await pool.release(slow)
        await pool.release(fast)

    positions = await pool.fetch(
        "SELECT data ->> 'user_id' AS who, global_position FROM events WHERE data ->> 'kind' = 'top_up'"
    )
    by_user = {r["who"]: r["global_position"] for r in positions}
    assert by_user["early"] < by_user["late"]  # the out-of-order case really happened

    await projected(pool)
    assert await _rm_balance(pool, "early") == 7
    assert await _rm_balance(pool, "late") == 11
    totals = await pool.fetch("SELECT account, balance FROM rm_system_balances WHERE asset = 'GOLD'")
    assert {r["account"]: int(r["balance"]) for r in totals} == {
        "treasury": -18, "bonus": 0, "revenue": 0, "users": 18,
    }  # fmt: skip
    history = await pool.fetchval("SELECT count(*) FROM rm_transactions")
    assert history == 2


async def test_each_event_is_applied_once_across_repeated_runs(pool: asyncpg.Pool, store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "once")
    conn = await pool.acquire()
    try:
        for amount in (1, 2, 3):
            tx = await begin_top_up(conn, "once", amount)
            await tx.commit()
    finally:
        await pool.release(conn)
    for _ in range(3):
        await projected(pool)
    assert await _rm_balance(pool, "once") == 6
    applied = await pool.fetchval("SELECT events_applied FROM projection_checkpoints WHERE name = 'wallets'")
    events = await pool.fetchval("SELECT count(*) FROM events")
    assert applied == events


async def _versions_committed_out_of_order(pool: asyncpg.Pool, store: EventStore) -> None:
    """Wallet w's version 3 written with a lower writer_xid than version 2's, as releases before
    migration 0011 wrote it: the lower id is taken first (a top-up of x), version 2 commits, then
    version 3 is appended."""
    await define_asset(store)
    await open_wallet(store, "w")
    await open_wallet(store, "x")
    await projected(pool)
    early = await pool.acquire()
    late = await pool.acquire()
    try:
        early_tx = await begin_top_up(early, "x", 1)  # takes the lower transaction id first
        late_tx = await begin_top_up(late, "w", 20)  # wallet w version 2, higher transaction id
        await late_tx.commit()
        # As a wallet written before migration 0011 was: since, version 3 would carry version 2's
        # writer_xid (commands/sql/tally_writer_xid.sql); databases that ran earlier releases may
        # hold such histories, which the projections must still get right.
        await pool.execute("UPDATE streams SET last_writer_xid = '0' WHERE stream_id = 'wallet:w'")
        await top_up_in(early, "w", 300)  # w version 3
        await early_tx.commit()
    finally:
        await pool.release(early)
        await pool.release(late)


async def test_a_wallet_is_never_served_with_a_version_gap(pool: asyncpg.Pool, store: EventStore) -> None:
    """Found in review: one wallet's versions can be applied out of order (a transaction's id comes
    from its first write, before it waits for the wallet). Between two batches the read model held
    version 3 without version 2's delta; it now says it is incomplete until the gap is filled."""
    await _versions_committed_out_of_order(pool, store)

    # The lower transaction id goes first: x's top-up and w's version 3, not yet w's version 2.
    applied, _ = await project_batch(pool, "wallets", 2)
    assert applied == 2
    assert await pool.fetchval("SELECT version FROM rm_wallets WHERE user_id = 'w'") == 3
    with pytest.raises(WalletIncomplete):
        await get_wallet(pool, "w")

    await projected(pool)
    wallet = await get_wallet(pool, "w")
    assert (wallet.version, wallet.balances[0].balance) == (3, 320)


async def test_a_history_page_is_never_served_with_a_version_gap(
    pool: asyncpg.Pool, store: EventStore
) -> None:
    """The same out-of-order case for the history: version 3 applied before version 2."""
    await _versions_committed_out_of_order(pool, store)

    applied, _ = await project_batch(pool, "history", 2)
    assert applied == 2
    assert await pool.fetchval(
        "SELECT array_agg(wallet_version) FROM rm_transactions WHERE user_id = 'w'"
    ) == [3]
    with pytest.raises(WalletIncomplete):
        await wallet_history(pool, "w", asset=None, limit=10, cursor=None)
    with pytest.raises(WalletIncomplete):
        await wallet_history(pool, "w", asset="GOLD", limit=1, cursor="v4")

    await projected(pool)
    page = await wallet_history(pool, "w", asset=None, limit=10, cursor=None)
    assert [t.wallet_version for t in page.items] == [3, 2]
    beyond = await wallet_history(pool, "w", asset=None, limit=10, cursor="v99")  # a cursor from nowhere
    assert [t.wallet_version for t in beyond.items] == [3, 2]
