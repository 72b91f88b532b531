"""Assets, wallets, the three flows, and the rules that keep the ledger balanced.

Sign convention: an account's balance is credits minus debits, an entry's amount is positive for a
credit. Every transaction's entries sum to zero, so the balances of an asset always sum to zero.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Final

import msgspec

from domain.errors import InsufficientFunds, VersionMismatch

# `(?!\n)` before `$`: in Python's re (which msgspec and Litestar use), `$` also matches before a
# trailing newline, so "GOLD\n" would pass a bare `^...$`. The lookahead keeps the pattern valid
# for the JSON Schema (ECMA 262) the OpenAPI document publishes, where `\Z` does not exist.
ASSET_CODE_PATTERN: Final = r"^[A-Z][A-Z0-9_]{1,15}(?!\n)$"
USER_ID_PATTERN: Final = r"^[A-Za-z0-9._@-]{1,64}(?!\n)$"
# The largest value PostgreSQL's bigint holds: positions, versions and cursors above it are not ours.
MAX_BIGINT: Final = 2**63 - 1
MAX_AMOUNT: Final = 10**15

TREASURY: Final = "treasury"
BONUS: Final = "bonus"
REVENUE: Final = "revenue"
SYSTEM_ACCOUNTS: Final = (TREASURY, BONUS, REVENUE)

AssetCode = Annotated[str, msgspec.Meta(pattern=ASSET_CODE_PATTERN)]
UserId = Annotated[str, msgspec.Meta(pattern=USER_ID_PATTERN)]
Amount = Annotated[int, msgspec.Meta(ge=1, le=MAX_AMOUNT)]
# PostgreSQL's text and jsonb cannot hold U+0000: refuse it at the edge (found in review: it used
# to reach the database and fail the whole group-committed batch).
NO_NUL: Final = "^[^\\x00]*$"
MetadataKey = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]
MetadataValue = Annotated[str, msgspec.Meta(max_length=512, pattern=NO_NUL)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=16)]
Reference = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=NO_NUL)]
AssetName = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=NO_NUL)]


def user_account(user_id: str) -> str:
    return f"user:{user_id}"


def system_account(name: str) -> str:
    return f"system:{name}"


class TransactionKind(StrEnum):
    TOP_UP = "top_up"
    BONUS = "bonus"
    SPEND = "spend"


# --- commands (imperative) -------------------------------------------------------------------


class DefineAsset(msgspec.Struct, frozen=True, kw_only=True):
    code: AssetCode
    name: AssetName
    decimals: Annotated[int, msgspec.Meta(ge=0, le=18)]


class OpenWallet(msgspec.Struct, frozen=True, kw_only=True):
    user_id: UserId
    metadata: Metadata = msgspec.field(default_factory=dict)


class _MoveCredits(msgspec.Struct, frozen=True, kw_only=True):
    user_id: UserId
    asset: AssetCode
    amount: Amount
    reference: Reference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)
    expected_version: int | None = None


class TopUpCredits(_MoveCredits, frozen=True, kw_only=True):
    """A real-money purchase: treasury -> user. ``reference`` carries the payment reference."""


class GrantBonus(_MoveCredits, frozen=True, kw_only=True):
    """An incentive: bonus pool -> user."""


class SpendCredits(_MoveCredits, frozen=True, kw_only=True):
    """The user pays: user -> revenue. Refused when the wallet holds less than ``amount``."""


TransactionCommand = TopUpCredits | GrantBonus | SpendCredits


# --- events (past tense) ---------------------------------------------------------------------


class Entry(msgspec.Struct, frozen=True):
    account: str
    amount: int


class AssetDefined(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    code: str
    name: str
    decimals: int


class WalletOpened(msgspec.Struct, frozen=True, kw_only=True, tag=True):
    user_id: str
    metadata: dict[str, str]


class _TransactionRecorded(msgspec.Struct, frozen=True, kw_only=True):
    transaction_id: str
    kind: str
    user_id: str
    asset: str
    amount: int
    entries: tuple[Entry, ...]
    reference: str | None
    metadata: dict[str, str]
    balance_after: int


class CreditsToppedUp(_TransactionRecorded, frozen=True, kw_only=True, tag=True):
    pass


class BonusGranted(_TransactionRecorded, frozen=True, kw_only=True, tag=True):
    pass


class CreditsSpent(_TransactionRecorded, frozen=True, kw_only=True, tag=True):
    pass


TransactionEvent = CreditsToppedUp | BonusGranted | CreditsSpent
Event = AssetDefined | WalletOpened | TransactionEvent


# --- planning and deciding -------------------------------------------------------------------


class TransactionPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What a transaction command moves, before the wallet's state is consulted."""

    kind: TransactionKind
    event_type: type[TransactionEvent]
    entries: tuple[Entry, ...]
    user_delta: int


_FLOWS: Final[dict[type[msgspec.Struct], tuple[TransactionKind, type[TransactionEvent], str, int]]] = {
    # command: (kind, event, the system account on the other side, sign of the user's leg)
    TopUpCredits: (TransactionKind.TOP_UP, CreditsToppedUp, TREASURY, +1),
    GrantBonus: (TransactionKind.BONUS, BonusGranted, BONUS, +1),
    SpendCredits: (TransactionKind.SPEND, CreditsSpent, REVENUE, -1),
}


def plan_transaction(command: TransactionCommand) -> TransactionPlan:
    """The balanced legs of a transaction command: the user's wallet against one system account.

    Credits are closed-loop: every flow has exactly one user and one system account, so no command
    can move credits from one user to another.
    """
    kind, event_type, system, sign = _FLOWS[type(command)]
    user_delta = sign * command.amount
    entries = (
        Entry(system_account(system), -user_delta),
        Entry(user_account(command.user_id), user_delta),
    )
    return TransactionPlan(kind=kind, event_type=event_type, entries=entries, user_delta=user_delta)


class WalletState(msgspec.Struct, frozen=True, kw_only=True):
    user_id: str
    version: int
    balances: dict[str, int] = msgspec.field(default_factory=dict)

    def balance(self, asset: str) -> int:
        return self.balances.get(asset, 0)


def decide(state: WalletState, command: TransactionCommand, *, transaction_id: str) -> list[Event]:
    """The events a transaction command produces on a wallet, or the domain rejection.

    The write side enforces the same rules inside one SQL function under the wallet's row lock
    (migrations/0004_group_commit.sql, tally_post_transactions), because one round trip is what keeps
    a hot wallet fast; tests/integration/test_decide_agreement.py checks that both decide alike.
    """
    if command.expected_version is not None and command.expected_version != state.version:
        raise VersionMismatch(
            f"wallet {state.user_id} is at version {state.version}, not {command.expected_version}",
            current_version=state.version,
        )
    plan = plan_transaction(command)
    balance = state.balance(command.asset)
    after = balance + plan.user_delta
    if after < 0:
        raise InsufficientFunds(
            f"wallet {state.user_id} holds {balance} {command.asset}, "
            f"less than the {command.amount} requested",
            balance=balance,
            amount=command.amount,
        )
    return [
        plan.event_type(
            transaction_id=transaction_id,
            kind=plan.kind.value,
            user_id=command.user_id,
            asset=command.asset,
            amount=command.amount,
            entries=plan.entries,
            reference=command.reference,
            metadata=dict(command.metadata),
            balance_after=after,
        )
    ]


def evolve(state: WalletState, event: Event) -> WalletState:
    """The wallet after one of its events: a new version, and the user's leg applied."""
    if isinstance(event, AssetDefined):
        return state
    if isinstance(event, WalletOpened):
        return WalletState(user_id=event.user_id, version=1)
    own = user_account(state.user_id)
    delta = sum(entry.amount for entry in event.entries if entry.account == own)
    balances = dict(state.balances)
    balances[event.asset] = balances.get(event.asset, 0) + delta
    return WalletState(user_id=state.user_id, version=state.version + 1, balances=balances)
