"""Demo data for ``make run``. Idempotent by construction: every command carries a fixed
Idempotency-Key, in the namespace of the client ``tally-seed`` (made by migrations/0007_clients.sql;
it holds no secret), so a second run replays the first run's outcomes and adds nothing."""

from __future__ import annotations

import msgspec

from commands import CommandContext, EventStore, handle
from domain import Command, DefineAsset, DomainError, GrantBonus, OpenWallet, SpendCredits, TopUpCredits
from domain.values import SEED_CLIENT

DEMO_ASSETS: tuple[Command, ...] = (
    DefineAsset(code="GOLD", name="Gold coins", decimals=0),
    DefineAsset(code="DIAMOND", name="Diamonds", decimals=0),
    DefineAsset(code="LOYALTY", name="Loyalty points", decimals=2),
)
DEMO_WALLETS: tuple[Command, ...] = (
    OpenWallet(user_id="alice", metadata={"tier": "gold"}),
    OpenWallet(user_id="bob", metadata={}),
)
DEMO_TRANSACTIONS: tuple[Command, ...] = (
    TopUpCredits(user_id="alice", asset="GOLD", amount=1_000, reference="demo-payment-1"),
    GrantBonus(user_id="alice", asset="DIAMOND", amount=50, reference="welcome"),
    SpendCredits(user_id="alice", asset="GOLD", amount=250, reference="demo-order-1"),
    TopUpCredits(user_id="bob", asset="GOLD", amount=300, reference="demo-payment-2"),
    GrantBonus(user_id="bob", asset="LOYALTY", amount=1_250, reference="signup"),
)


def _ctx(key: str, command: msgspec.Struct) -> CommandContext:
    # The fields only, not a transaction command's `kind` tag: the fingerprints of earlier seeds
    # (made before commands were tagged) stay the same, so seeding an existing database replays.
    fingerprint = CommandContext.fingerprint_of(
        "SEED", key, msgspec.json.encode(msgspec.structs.asdict(command))
    )
    return CommandContext(
        command_id=f"seed:{key}", client_id=SEED_CLIENT, created_by="tally-seed", fingerprint=fingerprint
    )


async def seed(store: EventStore) -> tuple[int, int]:
    """Apply the demo commands; returns (new effects, replayed)."""
    new = replayed = 0
    for i, command in enumerate((*DEMO_ASSETS, *DEMO_WALLETS, *DEMO_TRANSACTIONS)):
        ctx = _ctx(f"{i}:{type(command).__name__}", command)
        try:
            accepted = await handle(store, command, ctx)
        except DomainError as exc:  # e.g. the demo wallet was opened by hand first
            replayed += exc.replayed
            new += not exc.replayed
            continue
        replayed += accepted.replayed
        new += not accepted.replayed
    return new, replayed
