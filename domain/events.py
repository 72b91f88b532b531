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


TransactionEvent = CreditsToppedUp | BonusGranted | CreditsSpent
Event = AssetDefined | WalletOpened | TransactionEvent

EVENT_TYPES: Final[dict[str, type[Event]]] = {
    cls.__name__: cls for cls in (AssetDefined, WalletOpened, CreditsToppedUp, BonusGranted, CreditsSpent)
}


class UnknownEventType(ValueError):
    """A stored event of a type this release has no class for."""


def decode_event(event_type: str, data: bytes | str) -> Event:
    """The stored event as its class; UnknownEventType or msgspec.ValidationError if it is not one."""
    cls = EVENT_TYPES.get(event_type)
    if cls is None:
        raise UnknownEventType(f"no event type {event_type!r}")
    return msgspec.json.decode(data, type=cls)
