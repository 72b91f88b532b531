"""The domain's rules, and hypothesis over any sequence of commands."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from domain import (
    MAX_AMOUNT,
    CreditsSpent,
    CreditsToppedUp,
    GrantBonus,
    InsufficientFunds,
    SpendCredits,
    TopUpCredits,
    TransactionCommand,
    VersionMismatch,
    WalletOpened,
    WalletState,
    decide,
    evolve,
    plan_transaction,
)
from domain.model import TransactionEvent


def opened(user_id: str = "u") -> WalletState:
    return evolve(WalletState(user_id=user_id, version=0), WalletOpened(user_id=user_id, metadata={}))


def test_top_up_moves_treasury_to_user() -> None:
    plan = plan_transaction(TopUpCredits(user_id="u", asset="GOLD", amount=10))
    assert {(e.account, e.amount) for e in plan.entries} == {("system:treasury", -10), ("user:u", 10)}


def test_bonus_moves_bonus_pool_to_user() -> None:
    plan = plan_transaction(GrantBonus(user_id="u", asset="GOLD", amount=3))
    assert {(e.account, e.amount) for e in plan.entries} == {("system:bonus", -3), ("user:u", 3)}


def test_spend_moves_user_to_revenue() -> None:
    plan = plan_transaction(SpendCredits(user_id="u", asset="GOLD", amount=4))
    assert {(e.account, e.amount) for e in plan.entries} == {("user:u", -4), ("system:revenue", 4)}


def test_spend_beyond_balance_is_refused_with_the_figures() -> None:
    state = evolve(
        opened(), decide(opened(), TopUpCredits(user_id="u", asset="GOLD", amount=5), transaction_id="t")[0]
    )
    with pytest.raises(InsufficientFunds) as refused:
        decide(state, SpendCredits(user_id="u", asset="GOLD", amount=6), transaction_id="t2")
    assert refused.value.extra == {"balance": 5, "amount": 6}


def test_spending_the_whole_balance_is_allowed() -> None:
    state = evolve(
        opened(), decide(opened(), TopUpCredits(user_id="u", asset="GOLD", amount=5), transaction_id="t")[0]
    )
    [event] = decide(state, SpendCredits(user_id="u", asset="GOLD", amount=5), transaction_id="t2")
    assert isinstance(event, CreditsSpent)
    assert event.balance_after == 0


def test_expected_version_must_match() -> None:
    with pytest.raises(VersionMismatch):
        decide(
            opened(),
            TopUpCredits(user_id="u", asset="GOLD", amount=1, expected_version=7),
            transaction_id="t",
        )
    [event] = decide(
        opened(), TopUpCredits(user_id="u", asset="GOLD", amount=1, expected_version=1), transaction_id="t"
    )
    assert isinstance(event, CreditsToppedUp)


def test_amount_bounds_are_part_of_the_command_type() -> None:
    for bad in (0, -1, MAX_AMOUNT + 1, "5", 1.0, True):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert({"user_id": "u", "asset": "GOLD", "amount": bad}, SpendCredits)
    assert (
        msgspec.convert({"user_id": "u", "asset": "GOLD", "amount": MAX_AMOUNT}, SpendCredits).amount
        == MAX_AMOUNT
    )


ASSETS = ("GOLD", "GEMS")
USERS = ("ann", "ben", "cat")
commands = st.builds(
    lambda kind, user, asset, amount: kind(user_id=user, asset=asset, amount=amount),
    st.sampled_from((TopUpCredits, GrantBonus, SpendCredits)),
    st.sampled_from(USERS),
    st.sampled_from(ASSETS),
    st.integers(min_value=1, max_value=MAX_AMOUNT),
)


@settings(max_examples=300)
@given(st.lists(commands, max_size=60))
def test_any_sequence_of_commands_keeps_every_invariant(sequence: list[TransactionCommand]) -> None:
    wallets = {u: opened(u) for u in USERS}
    system: dict[tuple[str, str], int] = {}
    for i, command in enumerate(sequence):
        state = wallets[command.user_id]
        before = state.balance(command.asset)
        try:
            [event] = decide(state, command, transaction_id=str(i))
        except InsufficientFunds:
            assert isinstance(command, SpendCredits)
            assert before < command.amount
            continue
        assert isinstance(event, TransactionEvent)
        # Balanced, closed-loop: exactly one user leg (this user) and one system leg, summing to 0.
        assert sum(e.amount for e in event.entries) == 0
        users = [e for e in event.entries if e.account.startswith("user:")]
        assert [e.account for e in users] == [f"user:{command.user_id}"]
        for entry in event.entries:
            if entry.account.startswith("system:"):
                system[(entry.account, command.asset)] = (
                    system.get((entry.account, command.asset), 0) + entry.amount
                )
        wallets[command.user_id] = evolve(state, event)
        assert wallets[command.user_id].version == state.version + 1
        assert event.balance_after == wallets[command.user_id].balance(command.asset)

    for asset in ASSETS:
        user_total = sum(w.balance(asset) for w in wallets.values())
        system_total = sum(v for (_, a), v in system.items() if a == asset)
        assert user_total + system_total == 0
        assert all(w.balance(asset) >= 0 for w in wallets.values())
