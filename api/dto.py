"""Request bodies. Decoded strictly (``api.errors.decode_strict``): a string, float or boolean is
never taken for an amount, and unknown fields are refused rather than silently dropped."""

from __future__ import annotations

from typing import Annotated

import msgspec

from domain.model import Amount, AssetCode, AssetName, Metadata, Reference, UserId


class DefineAssetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    code: AssetCode
    name: AssetName
    decimals: Annotated[int, msgspec.Meta(ge=0, le=18)]


class OpenWalletRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    user_id: UserId
    metadata: Metadata = msgspec.field(default_factory=dict)


class MoveCreditsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A top-up, bonus or spend of ``amount`` minor units of ``asset``."""

    asset: AssetCode
    amount: Amount
    reference: Reference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 9457 problem details; ``code`` is stable and meant for programs."""

    type: str
    title: str
    status: int
    detail: str
    code: str
