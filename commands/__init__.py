"""The write side: command handlers over the PostgreSQL event store. Knows nothing of HTTP."""

from commands.event_store import Accepted, CommandContext, EventStore, IdempotencyKeyReused
from commands.handlers import (
    handle_define_asset,
    handle_grant_bonus,
    handle_open_wallet,
    handle_spend_credits,
    handle_top_up_credits,
)

__all__ = [
    "Accepted",
    "CommandContext",
    "EventStore",
    "IdempotencyKeyReused",
    "handle_define_asset",
    "handle_grant_bonus",
    "handle_open_wallet",
    "handle_spend_credits",
    "handle_top_up_credits",
]
