"""The shapes the query side serves (and the command side returns): msgspec Structs."""

from __future__ import annotations

from datetime import datetime

import msgspec


class Asset(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    code: str
    name: str
    decimals: int
    created_at: datetime
    consistency_token: str | None = None


class AssetList(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Asset]


class Balance(msgspec.Struct, frozen=True, kw_only=True):
    """``held``: what the wallet's active, unexpired holds reserve; ``available`` = balance - held,
    what a spend, a hold or a reversal of a top-up may take."""

    asset: str
    balance: int
    held: int
    available: int


class Wallet(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    user_id: str
    version: int
    balances: list[Balance]
    metadata: dict[str, str]
    created_at: datetime
    consistency_token: str | None = None


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    amount: int


class Transaction(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    transaction_id: str
    kind: str
    user_id: str
    asset: str
    amount: int
    entries: list[Entry]
    reference: str | None
    metadata: dict[str, str]
    balance_after: int
    wallet_version: int
    created_at: datetime
    consistency_token: str
    # The name of the client that sent the command; absent on transactions recorded before callers
    # had identities.
    created_by: str | None = None
    reverses: str | None = None  # a reversal: the transaction it reverses
    reason: str | None = None  # a reversal's reason, when given
    hold_id: str | None = None  # a capture: the hold it captured
    # A transaction that is not itself a reversal, read by its id: how much of it was reversed, by
    # which transactions (oldest first).
    reversed_amount: int | None = None
    reversals: list[str] | None = None


class Hold(msgspec.Struct, frozen=True, kw_only=True):
    """``status``: active, captured, voided or expired (an active hold past ``expires_at`` is
    expired, whether or not its HoldExpired is recorded yet). ``remaining`` is what it still
    reserves: 0 unless active."""

    hold_id: str
    user_id: str
    asset: str
    amount: int
    captured: int
    remaining: int
    status: str
    expires_at: datetime
    reference: str | None
    metadata: dict[str, str]
    created_at: datetime
    consistency_token: str


class HoldPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Hold]
    next_cursor: str | None


class TransactionPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[Transaction]
    next_cursor: str | None


class SystemBalance(msgspec.Struct, frozen=True, kw_only=True):
    asset: str
    treasury: int
    bonus: int
    revenue: int
    users: int
    sum: int


class SystemBalances(msgspec.Struct, frozen=True, kw_only=True):
    balances: list[SystemBalance]
