"""Commands: what a caller asks the ledger to do (imperative names).

A transaction command is tagged with its flow's kind (``"kind": "spend"`` when encoded), so the
write side receives exactly what the caller asked, kind included, and nothing it would have to
re-check: the legs come from the flows table (domain/flows.py, commands/sql/tally_legs.sql).
"""

from __future__ import annotations

import msgspec

from domain.values import (
    DEFAULT_HOLD_SECONDS,
    Amount,
    AssetCode,
    AssetName,
    Decimals,
    HoldSeconds,
    Metadata,
    Reason,
    Reference,
    UserId,
)


class DefineAsset(msgspec.Struct, frozen=True, kw_only=True):
    code: AssetCode
    name: AssetName
    decimals: Decimals


class OpenWallet(msgspec.Struct, frozen=True, kw_only=True):
    user_id: UserId
    metadata: Metadata = msgspec.field(default_factory=dict)


class _MoveCredits(msgspec.Struct, frozen=True, kw_only=True, tag_field="kind"):
    user_id: UserId
    asset: AssetCode
    amount: Amount
    reference: Reference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)
    # If-Match: the wallet version the caller decided on; the command is refused at any other.
    expected_version: int | None = None


class TopUpCredits(_MoveCredits, frozen=True, kw_only=True, tag="top_up"):
    """A real-money purchase: treasury -> user. ``reference`` carries the payment reference."""


class GrantBonus(_MoveCredits, frozen=True, kw_only=True, tag="bonus"):
    """An incentive: bonus pool -> user."""


class SpendCredits(_MoveCredits, frozen=True, kw_only=True, tag="spend"):
    """The user pays: user -> revenue. Refused when the wallet holds less than ``amount``."""


TransactionCommand = TopUpCredits | GrantBonus | SpendCredits


class ReverseTransaction(msgspec.Struct, frozen=True, kw_only=True):
    """Give back ``amount`` (default: all that remains) of a transaction: its legs negated, on its
    wallet. The reversals of one transaction never exceed it; a reversal is not reversed."""

    transaction_id: str
    amount: Amount | None = None
    reason: Reason | None = None
    reference: Reference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class PlaceHold(msgspec.Struct, frozen=True, kw_only=True):
    """Reserve ``amount`` of a wallet's available balance until ``expires_in_seconds`` from now."""

    user_id: UserId
    asset: AssetCode
    amount: Amount
    expires_in_seconds: HoldSeconds = DEFAULT_HOLD_SECONDS
    reference: Reference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class CaptureHold(msgspec.Struct, frozen=True, kw_only=True):
    """Spend ``amount`` (default: all that remains) of an active hold; ``final`` releases the rest."""

    hold_id: str
    amount: Amount | None = None
    final: bool = True


class VoidHold(msgspec.Struct, frozen=True, kw_only=True):
    """End an active hold, releasing what remains of it."""

    hold_id: str
    reason: Reason | None = None


LifecycleCommand = ReverseTransaction | PlaceHold | CaptureHold | VoidHold
Command = DefineAsset | OpenWallet | TransactionCommand | LifecycleCommand


def kind_of(command: TransactionCommand | type[TransactionCommand]) -> str:
    """The flow kind a transaction command (or command class) asks for: its tag."""
    cls = command if isinstance(command, type) else type(command)
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag
