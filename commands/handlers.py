"""One handler per command, named after it. Each validates nothing HTTP-specific: it receives a
valid domain command and returns the stored outcome, or raises a domain rejection."""

from __future__ import annotations

import msgspec

from commands.event_store import Accepted, CommandContext, EventStore
from domain import (
    DefineAsset,
    GrantBonus,
    OpenWallet,
    SpendCredits,
    TopUpCredits,
    TransactionCommand,
    plan_transaction,
)


async def handle_define_asset(store: EventStore, command: DefineAsset, ctx: CommandContext) -> Accepted:
    return await store.define_asset(ctx, code=command.code, name=command.name, decimals=command.decimals)


async def handle_open_wallet(store: EventStore, command: OpenWallet, ctx: CommandContext) -> Accepted:
    return await store.open_wallet(ctx, user_id=command.user_id, metadata=command.metadata)


async def handle_top_up_credits(store: EventStore, command: TopUpCredits, ctx: CommandContext) -> Accepted:
    return await _post_transaction(store, command, ctx)


async def handle_grant_bonus(store: EventStore, command: GrantBonus, ctx: CommandContext) -> Accepted:
    return await _post_transaction(store, command, ctx)


async def handle_spend_credits(store: EventStore, command: SpendCredits, ctx: CommandContext) -> Accepted:
    return await _post_transaction(store, command, ctx)


async def _post_transaction(store: EventStore, command: TransactionCommand, ctx: CommandContext) -> Accepted:
    plan = plan_transaction(command)
    return await store.post_transaction(
        ctx,
        event_type=plan.event_type.__name__,
        kind=plan.kind.value,
        user_id=command.user_id,
        asset=command.asset,
        amount=command.amount,
        user_delta=plan.user_delta,
        entries=msgspec.to_builtins(plan.entries),
        reference=command.reference,
        metadata=command.metadata,
        expected_version=command.expected_version,
    )
