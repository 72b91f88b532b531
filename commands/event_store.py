"""Access to the event store's command functions (migrations/0001_event_store.sql, 0004).

Each command runs inside one SQL function call: one round trip, in its own implicit transaction,
that claims the Idempotency-Key, locks the one stream it must check, decides, appends and records
the outcome. The wallet's row lock is held only while PostgreSQL runs that function, never across
a network round trip or the Python event loop (see README, "Concurrency").

Transaction commands are also *group-committed*: while ``max_in_flight`` calls are already running,
newly arriving commands wait in a queue and the next free call takes all of them (up to
``max_batch``) as one batch, one transaction, one commit. Alone, a command still goes at once, in a
batch of one. Measured in bench/: a commit per command costs most of PostgreSQL's CPU per spend,
and on a hot wallet the row lock is held through each commit's WAL flush.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import uuid
from collections.abc import Callable
from typing import Any

import asyncpg
import msgspec

from domain.errors import ERRORS_BY_CODE, DomainError

log = logging.getLogger("tally.event_store")

_DEFINE_ASSET = "SELECT status, body, replayed FROM tally_define_asset($1, $2, $3::jsonb, $4, $5, $6, $7)"
_OPEN_WALLET = "SELECT status, body, replayed FROM tally_open_wallet($1, $2, $3::jsonb, $4, $5, $6::jsonb)"
_POST_TRANSACTIONS = (
    "SELECT idx, status, body, replayed FROM tally_post_transactions("
    "$1::text[], $2::bytea[], $3::jsonb[], $4::uuid[], $5::text[], $6::text[], $7::text[], $8::text[],"
    " $9::bigint[], $10::bigint[], $11::jsonb[], $12::text[], $13::jsonb[], $14::bigint[])"
)


class IdempotencyKeyReused(Exception):
    """The Idempotency-Key was first used for a different request (method, path, body)."""

    code = "idempotency_key_reused"


_Args = tuple[Any, ...]
_Outcome = tuple[int, str, bool]  # status, body, replayed


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

    def __init__(
        self,
        pool: asyncpg.Pool,
        on_append: Callable[[], None] | None = None,
        *,
        max_in_flight: int = 4,
        max_batch: int = 100,
    ) -> None:
        self._pool = pool
        self._on_append = on_append
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._queue: list[tuple[_Args, asyncio.Future[_Outcome]]] = []
        self._in_flight = 0
        self._flushers: set[asyncio.Task[None]] = set()  # references, so tasks are not collected

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
        args = (
            ctx.command_id, ctx.fingerprint, ctx.metadata_json(), uuid.uuid4(), event_type, kind,
            user_id, asset, amount, user_delta, _json(entries), reference, _json(metadata),
            expected_version,
        )  # fmt: skip
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((args, future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return self._outcome(*await future)

    async def _flush(self) -> None:
        """Run batches while commands are queued; at most ``max_in_flight`` of these run at once.

        The count is decremented in the same step that finds the queue empty (no await between),
        so a command queued at any moment either finds a flusher that will take it, or starts one.
        """
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._run_batch(batch)
        finally:
            self._in_flight -= 1

    async def _run_batch(self, batch: list[tuple[_Args, asyncio.Future[_Outcome]]]) -> None:
        try:
            rows = await self._pool.fetch(
                _POST_TRANSACTIONS, *(list(column) for column in zip(*(a for a, _ in batch), strict=True))
            )
        except asyncio.CancelledError:  # the loop is going away: nobody may wait forever
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            # Retrying one by one is safe whatever happened: a batch that rolled back applied
            # nothing, and one that committed before its connection died replays its outcomes.
            if len(batch) == 1:
                if not batch[0][1].done():
                    batch[0][1].set_exception(exc)
                return
            log.warning("a batch of %d commands failed (%s); retrying them one by one", len(batch), exc)
            for item in batch:
                await self._run_batch([item])
            return
        if self._on_append is not None and any(r["status"] == 201 and not r["replayed"] for r in rows):
            self._on_append()
        for row in rows:
            future = batch[row["idx"] - 1][1]
            if not future.done():  # its caller may have gone (cancelled); the outcome is stored anyway
                future.set_result((row["status"], row["body"], row["replayed"]))

    async def _execute(self, sql: str, *args: Any) -> Accepted:
        try:
            row = await self._pool.fetchrow(sql, *args)
        except asyncpg.RaiseError as exc:
            raise _rejection_from(exc) from None
        assert row is not None
        accepted = self._outcome(row["status"], row["body"], row["replayed"])
        if not accepted.replayed and self._on_append is not None:
            self._on_append()
        return accepted

    @staticmethod
    def _outcome(status: int, body: str, replayed: bool) -> Accepted:
        """The stored outcome as an Accepted, or the rejection it records, raised."""
        if status < 400:
            return Accepted(body=body, replayed=replayed)
        problem = msgspec.json.decode(body)
        code = problem.pop("code")
        if code == IdempotencyKeyReused.code:
            raise IdempotencyKeyReused(problem["detail"])
        error = ERRORS_BY_CODE[code](problem.pop("detail"), **problem)
        error.replayed = replayed
        raise error


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
