"""Outcomes: ``accepted``, or the rejection a command met. Each rejection carries a stable ``code``
(the outcome stored under the Idempotency-Key); the API maps codes to HTTP statuses in one place
(api/errors.py)."""

from __future__ import annotations

from typing import Any, ClassVar, Final

ACCEPTED: Final = "accepted"


class DomainError(Exception):
    """A command the ledger refuses. ``extra`` holds machine-readable details for the caller."""

    code: ClassVar[str] = "domain_error"
    # A decision on the ledger's state, recorded under the key and replayed; the others (not-found,
    # key reuse) are refused without a record, so the key stays free for a later, valid request.
    recorded: ClassVar[bool] = True

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra
        # True when this rejection was decided earlier under the same Idempotency-Key and is
        # being replayed.
        self.replayed = False


class InsufficientFunds(DomainError):
    code = "insufficient_funds"


class VersionMismatch(DomainError):
    code = "version_mismatch"


class WalletExists(DomainError):
    code = "wallet_exists"


class AssetExists(DomainError):
    code = "asset_exists"


class WalletNotFound(DomainError):
    code = "wallet_not_found"
    recorded = False


class AssetNotFound(DomainError):
    code = "asset_not_found"
    recorded = False


class IdempotencyKeyReused(DomainError):
    """The Idempotency-Key was first used for a different request (method, path, body)."""

    code = "idempotency_key_reused"
    recorded = False


class TransactionNotFound(DomainError):
    code = "transaction_not_found"
    recorded = False


class NotReversible(DomainError):
    """A reversal is not reversed (reverse the original again instead, while some of it remains)."""

    code = "not_reversible"


class ReversalExceedsRemaining(DomainError):
    """The reversals of one transaction never add up to more than its amount (``remaining``)."""

    code = "reversal_exceeds_remaining"


class HoldNotFound(DomainError):
    code = "hold_not_found"
    recorded = False


class CaptureExceedsHold(DomainError):
    code = "capture_exceeds_hold"


class HoldExpired(DomainError):
    """The hold's expiry passed (by the database's clock): it holds nothing and cannot be used."""

    code = "hold_expired"


class HoldNotActive(DomainError):
    """The hold was captured or voided."""

    code = "hold_not_active"


class AssetForbidden(DomainError):
    """The caller's key may not use the asset of the transaction or hold it acts on."""

    code = "forbidden"
    recorded = False


REJECTIONS: Final[dict[str, type[DomainError]]] = {
    cls.code: cls
    for cls in (
        InsufficientFunds, VersionMismatch, WalletExists, AssetExists, WalletNotFound, AssetNotFound,
        IdempotencyKeyReused, TransactionNotFound, NotReversible, ReversalExceedsRemaining, HoldNotFound,
        CaptureExceedsHold, HoldExpired, HoldNotActive, AssetForbidden,
    )
}  # fmt: skip
# The outcomes a command's row may hold (migrations/0006: commands_outcome_recorded).
RECORDED_OUTCOMES: Final = (ACCEPTED, *(code for code, cls in REJECTIONS.items() if cls.recorded))
