"""The write side: command handlers over the PostgreSQL event store (its functions: commands/sql).
Knows nothing of HTTP."""

from commands.event_store import Accepted, CommandContext, CommandRecord, EventStore
from commands.handlers import (
    COMMAND_HANDLERS,
    handle,
    handle_define_asset,
    handle_grant_bonus,
    handle_open_wallet,
    handle_spend_credits,
    handle_top_up_credits,
)

__all__ = [
    "COMMAND_HANDLERS",
    "Accepted",
    "CommandContext",
    "CommandRecord",
    "EventStore",
    "handle",
    "handle_define_asset",
    "handle_grant_bonus",
    "handle_open_wallet",
    "handle_spend_credits",
    "handle_top_up_credits",
]
