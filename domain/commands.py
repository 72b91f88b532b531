"""Commands: what a caller asks the ledger to do (imperative names).

A transaction command is tagged with its flow's kind (``"kind": "spend"`` when encoded), so the
write side receives exactly what the caller asked, kind included, and nothing it would have to
re-check: the legs come from the flows table (domain/flows.py, commands/sql/tally_legs.sql).
"""

from __future__ import annotations

import msgspec

from domain.values import Amount, AssetCode, AssetName, Decimals, Metadata, Reference, UserId


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
Command = DefineAsset | OpenWallet | TransactionCommand


def kind_of(command: TransactionCommand | type[TransactionCommand]) -> str:
    """The flow kind a transaction command (or command class) asks for: its tag."""
    cls = command if isinstance(command, type) else type(command)
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag
