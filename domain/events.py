"""Events: what happened (past-tense names), exactly as the events table stores them.

``event_type`` is the class name; ``data`` decodes into the class, strictly (an unknown field is an
error, not silently dropped). ``decode_event`` is how any Python reader turns a stored event into
one of these; tests/conftest.py decodes every event the suite writes with it.
"""

from __future__ import annotations

from typing import Final

import msgspec


class Entry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    account: str
    amount: int


class AssetDefined(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    code: str
    name: str
    decimals: int


class WalletOpened(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    user_id: str
    metadata: dict[str, str]


class TransactionRecorded(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A balanced transaction on the user's wallet stream; its ``kind`` is a flow's."""

    transaction_id: str
    kind: str
    user_id: str
    asset: str
    amount: int
    entries: tuple[Entry, ...]
    reference: str | None
    metadata: dict[str, str]
    balance_after: int


class CreditsToppedUp(TransactionRecorded, frozen=True, kw_only=True):
    pass


class BonusGranted(TransactionRecorded, frozen=True, kw_only=True):
    pass


class CreditsSpent(TransactionRecorded, frozen=True, kw_only=True):
    pass


class CreditsReversed(TransactionRecorded, frozen=True, kw_only=True):
    """``amount`` of transaction ``reverses`` given back: its legs negated for that amount
    (``kind`` "reversal")."""

    reverses: str
    reason: str | None


class HoldPlaced(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """``amount`` reserved until ``expires_at``; the hold's id is this event's id. Moves nothing."""

    hold_id: str
    user_id: str
    asset: str
    amount: int
    expires_at: str
    reference: str | None
    metadata: dict[str, str]


class HoldCaptured(TransactionRecorded, frozen=True, kw_only=True):
    """A spend (``kind`` "spend") of ``amount`` of hold ``hold_id``: ``released`` is what a final
    capture let go, ``hold_remaining`` what the hold still reserves (0: it ended)."""

    hold_id: str
    final: bool
    released: int
    hold_remaining: int


class HoldVoided(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    hold_id: str
    user_id: str
    asset: str
    released: int
    reason: str | None


class HoldExpired(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Recorded after ``expires_at`` by tally_expire_wallet_holds; the hold stopped holding at
    ``expires_at``."""

    hold_id: str
    user_id: str
    asset: str
    released: int
    expires_at: str


TransactionEvent = CreditsToppedUp | BonusGranted | CreditsSpent
Event = (
    AssetDefined
    | WalletOpened
    | TransactionEvent
    | CreditsReversed
    | HoldPlaced
    | HoldCaptured
    | HoldVoided
    | HoldExpired
)

EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.__name__: cls
    for cls in (
        AssetDefined, WalletOpened, CreditsToppedUp, BonusGranted, CreditsSpent, CreditsReversed, HoldPlaced,
        HoldCaptured, HoldVoided, HoldExpired,
    )
}  # fmt: skip


class UnknownEventType(ValueError):
    """A stored event of a type this release has no class for."""


def decode_event(event_type: str, data: bytes | str) -> Event:
    """The stored event as its class; UnknownEventType or msgspec.ValidationError if it is not one."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        raise UnknownEventType(f"no event type {event_type!r}")
    return msgspec.json.decode(data, type=cls)
