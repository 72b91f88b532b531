"""Request bodies, and the Litestar DTO that decodes them.

``StrictBody[T]`` is how every command route gets its body: decoded once, from the raw bytes,
strictly (``api.errors.decode_strict``: a string, float or boolean is never taken for an amount,
and unknown fields are refused rather than silently dropped), and described in the OpenAPI document
as ``T``. Litestar's own decoding would convert leniently and leave a strict pass to do again."""

from __future__ import annotations

from collections.abc import Generator
from typing import Any, TypeVar

import msgspec
from litestar.dto import AbstractDTO, DTOFieldDefinition
from litestar.dto._backend import DTOBackend
from litestar.openapi.spec import Reference, Schema
from litestar.typing import FieldDefinition

from api.errors import InvalidRequest, decode_strict
from domain.values import (
    DEFAULT_HOLD_SECONDS,
    Amount,
    AssetCode,
    AssetName,
    Decimals,
    HoldSeconds,
    Metadata,
    Reason,
    UserId,
)
from domain.values import Reference as TxReference

T = TypeVar("T")


class StrictBody(AbstractDTO[T]):
    """``dto=StrictBody[Model]`` on a route whose ``data`` is a ``Model`` (a msgspec Struct)."""

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[DTOFieldDefinition, None, None]:
        raise NotImplementedError("StrictBody decodes with msgspec directly; it has no field definitions")

    @classmethod
    def detect_nested_field(cls, field_definition: FieldDefinition) -> bool:
        return False

    @classmethod
    def create_for_field_definition(
        cls, field_definition: FieldDefinition, handler_id: str, backend_cls: type[DTOBackend] | None = None
    ) -> None:
        """No per-handler backend: ``decode_bytes`` needs only the model type."""

    @classmethod
    def create_openapi_schema(
        cls, field_definition: FieldDefinition, handler_id: str, schema_creator: Any
    ) -> Reference | Schema:
        schema: Reference | Schema = schema_creator.for_field_definition(
            FieldDefinition.from_annotation(
                cls.model_type, kwarg_definition=field_definition.kwarg_definition
            )
        )
        return schema

    def decode_bytes(self, value: bytes) -> T:
        return decode_strict(value, self.model_type)

    def decode_builtins(self, value: dict[str, Any]) -> T:
        try:
            return msgspec.convert(value, self.model_type, strict=True)
        except msgspec.ValidationError as exc:
            raise InvalidRequest(str(exc)) from None

    def data_to_encodable_type(self, data: Any) -> Any:
        return data


class DefineAssetRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    code: AssetCode
    name: AssetName
    decimals: Decimals


class OpenWalletRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    user_id: UserId
    metadata: Metadata = msgspec.field(default_factory=dict)


class MoveCreditsRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A top-up, bonus or spend of ``amount`` minor units of ``asset``."""

    asset: AssetCode
    amount: Amount
    reference: TxReference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class ReverseRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Give back ``amount`` (default: all that remains) of the transaction."""

    amount: Amount | None = None
    reason: Reason | None = None
    reference: TxReference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class PlaceHoldRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Reserve ``amount`` of ``asset`` for ``expires_in_seconds`` (1 s to 30 days; default 3600)."""

    asset: AssetCode
    amount: Amount
    expires_in_seconds: HoldSeconds = DEFAULT_HOLD_SECONDS
    reference: TxReference | None = None
    metadata: Metadata = msgspec.field(default_factory=dict)


class CaptureRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Capture ``amount`` (default: all that remains); ``final`` (default true) releases the rest."""

    amount: Amount | None = None
    final: bool = True


class VoidRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Optional: a void may be sent with no body."""

    reason: Reason | None = None


class Problem(msgspec.Struct, frozen=True, kw_only=True):
    """RFC 9457 problem details; ``code`` is stable and meant for programs."""

    type: str
    title: str
    status: int
    detail: str
    code: str
