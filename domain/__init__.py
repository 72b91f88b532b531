"""Tally's vocabulary, shared by every layer: commands, events, outcomes and the flows.

Nothing here touches a database, the network, the clock or randomness. The rules themselves run in
SQL, under the wallet's row lock (commands/sql); tests/model.py is the Python model of them that
tests/integration/test_model_based.py checks the SQL against.
"""

from domain.commands import (
    Command,
    DefineAsset,
    GrantBonus,
    OpenWallet,
    SpendCredits,
    TopUpCredits,
    TransactionCommand,
    kind_of,
)
from domain.errors import (
    ACCEPTED,
    RECORDED_OUTCOMES,
    REJECTIONS,
    AssetExists,
    AssetNotFound,
    DomainError,
    IdempotencyKeyReused,
    InsufficientFunds,
    VersionMismatch,
    WalletExists,
    WalletNotFound,
)
from domain.events import (
    EVENT_TYPES,
    AssetDefined,
    BonusGranted,
    CreditsSpent,
    CreditsToppedUp,
    Entry,
    Event,
    TransactionEvent,
    TransactionRecorded,
    UnknownEventType,
    WalletOpened,
    decode_event,
)
from domain.flows import FLOWS, FLOWS_BY_KIND, Flow, SystemAccount
from domain.values import MAX_AMOUNT, MAX_BIGINT, system_account, user_account

__all__ = [
    "ACCEPTED",
    "EVENT_TYPES",
    "FLOWS",
    "FLOWS_BY_KIND",
    "MAX_AMOUNT",
    "MAX_BIGINT",
    "RECORDED_OUTCOMES",
    "REJECTIONS",
    "AssetDefined",
    "AssetExists",
    "AssetNotFound",
    "BonusGranted",
    "Command",
    "CreditsSpent",
    "CreditsToppedUp",
    "DefineAsset",
    "DomainError",
    "Entry",
    "Event",
    "Flow",
    "GrantBonus",
    "IdempotencyKeyReused",
    "InsufficientFunds",
    "OpenWallet",
    "SpendCredits",
    "SystemAccount",
    "TopUpCredits",
    "TransactionCommand",
    "TransactionEvent",
    "TransactionRecorded",
    "UnknownEventType",
    "VersionMismatch",
    "WalletExists",
    "WalletNotFound",
    "WalletOpened",
    "decode_event",
    "kind_of",
    "system_account",
    "user_account",
]
