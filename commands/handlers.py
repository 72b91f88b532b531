"""One handler per command, named after it, and the registry that finds it by command type.

A handler receives a valid domain command and its context (nothing HTTP-specific) and returns the
stored outcome, or raises the domain rejection."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Final

from commands.event_store import Accepted, CommandContext, EventStore
from domain import (
    CaptureHold,
    Command,
    DefineAsset,
    GrantBonus,
    OpenWallet,
    PlaceHold,
    ReverseTransaction,
    SpendCredits,
    TopUpCredits,
    VoidHold,
)


async def handle_define_asset(store: EventStore, command: DefineAsset, ctx: CommandContext) -> Accepted:
    return await store.define_asset(ctx, command)


async def handle_open_wallet(store: EventStore, command: OpenWallet, ctx: CommandContext) -> Accepted:
    return await store.open_wallet(ctx, command)


async def handle_top_up_credits(store: EventStore, command: TopUpCredits, ctx: CommandContext) -> Accepted:
    return await store.post_transaction(ctx, command)


async def handle_grant_bonus(store: EventStore, command: GrantBonus, ctx: CommandContext) -> Accepted:
    return await store.post_transaction(ctx, command)


async def handle_spend_credits(store: EventStore, command: SpendCredits, ctx: CommandContext) -> Accepted:
    return await store.post_transaction(ctx, command)


async def handle_reverse_transaction(
    store: EventStore, command: ReverseTransaction, ctx: CommandContext
) -> Accepted:
    return await store.reverse_transaction(ctx, command)


async def handle_place_hold(store: EventStore, command: PlaceHold, ctx: CommandContext) -> Accepted:
    return await store.place_hold(ctx, command)


async def handle_capture_hold(store: EventStore, command: CaptureHold, ctx: CommandContext) -> Accepted:
    return await store.capture_hold(ctx, command)


async def handle_void_hold(store: EventStore, command: VoidHold, ctx: CommandContext) -> Accepted:
    return await store.void_hold(ctx, command)


COMMAND_HANDLERS: Final[dict[type[Any], Callable[[EventStore, Any, CommandContext], Awaitable[Accepted]]]] = {
    DefineAsset: handle_define_asset,
    OpenWallet: handle_open_wallet,
    TopUpCredits: handle_top_up_credits,
    GrantBonus: handle_grant_bonus,
    SpendCredits: handle_spend_credits,
    ReverseTransaction: handle_reverse_transaction,
    PlaceHold: handle_place_hold,
    CaptureHold: handle_capture_hold,
    VoidHold: handle_void_hold,
}


async def handle(store: EventStore, command: Command, ctx: CommandContext) -> Accepted:
    """Run ``command`` through its handler."""
    return await COMMAND_HANDLERS[type(command)](store, command, ctx)
