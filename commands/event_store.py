"""Access to the event store's command functions (migrations/0001_event_store.sql).

Each command is one SQL function call: one round trip, in its own implicit transaction, that claims
the Idempotency-Key, locks the one stream it must check, decides, appends and records the outcome.
The wallet's row lock is held only while PostgreSQL runs that function, never across a network
round trip, which is what bounds a hot wallet's throughput (see README, "Concurrency").
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec

from domain.errors import ERRORS_BY_CODE, DomainError

_DEFINE_ASSET = "SELECT status, body, replayed FROM tally_define_asset($1, $2, $3::jsonb, $4, $5, $6, $7)"
_OPEN_WALLET = "SELECT status, body, replayed FROM tally_open_wallet($1, $2, $3::jsonb, $4, $5, $6::jsonb)"
_POST_TRANSACTION = (
    "SELECT status, body, replayed FROM tally_post_transaction("
    "$1, $2, $3::jsonb, $4, $5, $6, $7, $8, $9, $10, $11::jsonb, $12, $13::jsonb, $14)"
)


class IdempotencyKeyReused(Exception):
    """The Idempotency-Key was first used for a different request (method, path, body)."""

    code = "idempotency_key_reused"


class CommandContext(msgspec.Struct, frozen=True, kw_only=True):
    """Who asks and under which Idempotency-Key; ``fingerprint`` identifies the exact request."""

    command_id: str
    fingerprint: bytes
    metadata: dict[str, str] = msgspec.field(default_factory=dict)

    def metadata_json(self) -> str:
        """The metadata stored with the command and its events: the caller's, plus the command id
        (so the audit trail leads from every event to the request that caused it)."""
        return _json({**self.metadata, "command_id": self.command_id})

    @staticmethod
    def fingerprint_of(*parts: str | bytes) -> bytes:
        digest = hashlib.sha256()
        for part in parts:
            raw = part.encode() if isinstance(part, str) else part
            digest.update(len(raw).to_bytes(8, "big"))
            digest.update(raw)
        return digest.digest()


class Accepted(msgspec.Struct, frozen=True):
    """A command's stored success body (JSON text) and whether this call replayed it."""

    body: str
    replayed: bool


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


class EventStore:
    """The write side's handle on PostgreSQL. ``on_append`` is called after every new event commits
    (the app uses it to wake projectors); it must not block."""

    def __init__(self, pool: asyncpg.Pool, on_append: Callable[[], None] | None = None) -> None:
        self._pool = pool
        self._on_append = on_append

    async def define_asset(self, ctx: CommandContext, *, code: str, name: str, decimals: int) -> Accepted:
        return await self._execute(
            _DEFINE_ASSET, ctx.command_id, ctx.fingerprint, ctx.metadata_json(), uuid.uuid4(),
            code, name, decimals,
        )  # fmt: skip

    async def open_wallet(self, ctx: CommandContext, *, user_id: str, metadata: dict[str, str]) -> Accepted:
        return await self._execute(
            _OPEN_WALLET, ctx.command_id, ctx.fingerprint, ctx.metadata_json(), uuid.uuid4(),
            user_id, _json(metadata),
        )  # fmt: skip

    async def post_transaction(
        self,
        ctx: CommandContext,
        *,
        event_type: str,
        kind: str,
        user_id: str,
        asset: str,
        amount: int,
        user_delta: int,
        entries: list[dict[str, Any]],
        reference: str | None,
        metadata: dict[str, str],
        expected_version: int | None,
    ) -> Accepted:
        return await self._execute(
            _POST_TRANSACTION, ctx.command_id, ctx.fingerprint, ctx.metadata_json(), uuid.uuid4(),
            event_type, kind, user_id, asset, amount, user_delta, _json(entries), reference,
            _json(metadata), expected_version,
        )  # fmt: skip

    async def _execute(self, sql: str, *args: Any) -> Accepted:
        try:
            row = await self._pool.fetchrow(sql, *args)
        except asyncpg.RaiseError as exc:
            raise _rejection_from(exc) from None
        assert row is not None
        status: int = row["status"]
        body: str = row["body"]
        replayed: bool = row["replayed"]
        if status >= 400:
            problem = msgspec.json.decode(body)
            error = ERRORS_BY_CODE[problem.pop("code")](problem.pop("detail"), **problem)
            error.replayed = replayed
            raise error
        if not replayed and self._on_append is not None:
            self._on_append()
        return Accepted(body=body, replayed=replayed)


def _rejection_from(exc: asyncpg.RaiseError) -> Exception:
    """Rejections the SQL functions raise (rolled back, so not recorded under the key)."""
    code = exc.args[0] if exc.args else ""
    detail = getattr(exc, "detail", None) or code
    if code == IdempotencyKeyReused.code:
        return IdempotencyKeyReused(detail)
    error_class: type[DomainError] | None = ERRORS_BY_CODE.get(code)
    if error_class is None:
        return exc
    return error_class(detail)
