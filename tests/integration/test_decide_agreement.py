"""The write side's SQL function and the pure domain decide alike, on any command sequence.

The write side enforces the state-dependent rules (floor, expected version) inside
tally_post_transactions for speed; domain.decide is the specification. Hypothesis drives the same
random sequence through both and compares every outcome and balance.
"""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from commands import EventStore, handle_grant_bonus, handle_spend_credits, handle_top_up_credits
from domain import (
    DomainError,
    GrantBonus,
    SpendCredits,
    TopUpCredits,
    TransactionCommand,
    WalletOpened,
    WalletState,
    decide,
    evolve,
)
from tests.helpers import ctx, define_asset, open_wallet, stream_balance

HANDLERS = {
    TopUpCredits: handle_top_up_credits,
    GrantBonus: handle_grant_bonus,
    SpendCredits: handle_spend_credits,
}

steps = st.lists(
    st.tuples(
        st.sampled_from((TopUpCredits, GrantBonus, SpendCredits)),
        st.sampled_from(("GOLD", "GEMS")),
        st.integers(min_value=1, max_value=1000),
        st.one_of(st.none(), st.integers(min_value=0, max_value=12)),
    ),
    min_size=1,
    max_size=25,
)


async def _run(db_url: str, sequence: list[tuple[type, str, int, int | None]]) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        store = EventStore(pool)
        user = uuid.uuid4().hex[:12]
        await open_wallet(store, user)
        state = evolve(WalletState(user_id=user, version=0), WalletOpened(user_id=user, metadata={}))
        for kind, asset, amount, expected in sequence:
            command: TransactionCommand = kind(
                user_id=user, asset=asset, amount=amount, expected_version=expected
            )
            try:
                events = decide(state, command, transaction_id="spec")
                expected_outcome = "accepted"
            except DomainError as exc:
                expected_outcome = exc.code
            try:
                await HANDLERS[kind](store, command, ctx())
                outcome = "accepted"
            except DomainError as exc:
                outcome = exc.code
            assert outcome == expected_outcome, (command, state)
            if outcome == "accepted":
                state = evolve(state, events[0])
            for a in ("GOLD", "GEMS"):
                assert await stream_balance(pool, user, a) == state.balance(a)
        assert (
            await pool.fetchval("SELECT version FROM streams WHERE stream_id = $1", f"wallet:{user}")
            == state.version
        )
    finally:
        await pool.close()


async def _prepare(db_url: str) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        store = EventStore(pool)
        await define_asset(store, "GOLD")
        await define_asset(store, "GEMS")
    finally:
        await pool.close()


def test_sql_and_domain_decide_alike(db_url: str) -> None:
    # db_url is created by an async fixture; this test drives its own event loop per example.
    asyncio.run(_prepare(db_url))
    sequences_run: list[int] = []

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(steps)
    def check(sequence: list[tuple[type, str, int, int | None]]) -> None:
        asyncio.run(_run(db_url, sequence))
        sequences_run.append(len(sequence))

    check()
    assert len(sequences_run) >= 20  # hypothesis really drove sequences through both deciders
