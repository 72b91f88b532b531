"""Domain rejections. Each carries a stable ``code``; the API maps codes to HTTP in one place."""

from __future__ import annotations

from typing import Any, ClassVar


class DomainError(Exception):
    """A command the ledger refuses. ``extra`` holds machine-readable details for the caller."""

    code: ClassVar[str] = "domain_error"

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


class AssetNotFound(DomainError):
    code = "asset_not_found"


ERRORS_BY_CODE: dict[str, type[DomainError]] = {
    cls.code: cls
    for cls in (InsufficientFunds, VersionMismatch, WalletExists, AssetExists, WalletNotFound, AssetNotFound)
}
