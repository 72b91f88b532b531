"""The write side's handle on PostgreSQL: one SQL function call per command (commands/sql).

Each call claims the Idempotency-Key, locks the one stream it must check, decides, appends and
records the outcome, in one round trip and one implicit transaction. The wallet's row lock is held
only while PostgreSQL runs that function, never across a network round trip or the Python event
loop (see README, "Concurrency").

What crosses to SQL is a ``CommandRecord``: the domain command exactly as the caller asked it, and
its envelope (the key, the request's fingerprint, its context). The SQL answers with the domain
outcome (``accepted`` or a rejection's code) and the response body; this module turns a rejection
into its DomainError. HTTP statuses are chosen in api/errors.py, nowhere else.

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
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
import msgspec

from domain import ACCEPTED, REJECTIONS, DefineAsset, OpenWallet, TransactionCommand

log = logging.getLogger("tally.event_store")

_DEFINE_ASSET = "SELECT outcome, body, replayed FROM tally_define_asset($1::jsonb)"
_OPEN_WALLET = "SELECT outcome, body, replayed FROM tally_open_wallet($1::jsonb)"
_POST_TRANSACTIONS = "SELECT idx, outcome, body, replayed FROM tally_post_transactions($1::jsonb)"

_Outcome = tuple[str, str, bool]  # outcome, body, replayed


class CommandContext(msgspec.Struct, frozen=True, kw_only=True):
    """Who asks and under which Idempotency-Key: ``client_id`` is the calling client, whose namespace
    the key is in, and ``created_by`` its name (recorded on the events). ``fingerprint`` identifies
    the exact request, and ``metadata`` (request path and id, user agent) is stored with the command
    and its event."""

    command_id: str
    client_id: str
    created_by: str
    fingerprint: bytes
    metadata: dict[str, str] = msgspec.field(default_factory=dict)

    @staticmethod
    def fingerprint_of(*parts: str | bytes) -> bytes:
        digest = hashlib.sha256()
        for part in parts:
            raw = part.encode() if isinstance(part, str) else part
            digest.update(len(raw).to_bytes(8, "big"))
            digest.update(raw)
        return digest.digest()


class CommandRecord(msgspec.Struct, frozen=True):
    """One command as the SQL functions read it (by field name): the envelope, and the domain
    command as the caller asked it (a transaction command carries its ``kind`` tag)."""

    key: str
    client: str  # the client's id: the key's namespace
    fingerprint: str  # PostgreSQL's hex form of bytea: "\\x…"
    context: dict[str, str]
    command: DefineAsset | OpenWallet | TransactionCommand

    @classmethod
    def of(cls, ctx: CommandContext, command: DefineAsset | OpenWallet | TransactionCommand) -> CommandRecord:
        context = {**ctx.metadata, "created_by": ctx.created_by}
        return cls(ctx.command_id, ctx.client_id, "\\x" + ctx.fingerprint.hex(), context, command)


class Accepted(msgspec.Struct, frozen=True):
    """A command's stored success body (JSON text) and whether this call replayed it."""

    body: str
    replayed: bool


_ENCODER = msgspec.json.Encoder()


def _json(value: Any) -> str:
    return _ENCODER.encode(value).decode()


def outcome_of(outcome: str, body: str, replayed: bool) -> Accepted:
    """The stored outcome as an Accepted, or the rejection it records, raised."""
    if outcome == ACCEPTED:
        return Accepted(body=body, replayed=replayed)
    problem = msgspec.json.decode(body)
    problem.pop("code", None)
    error = REJECTIONS[outcome](problem.pop("detail"), **problem)
    error.replayed = replayed
    raise error


class EventStore:
    """``on_append`` is called after new events commit (the app uses it to wake projectors); it must
    not block."""

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
        self._queue: list[tuple[CommandRecord, asyncio.Future[_Outcome]]] = []
        self._in_flight = 0
        self._flushers: set[asyncio.Task[None]] = set()  # references, so tasks are not collected

    async def define_asset(self, ctx: CommandContext, command: DefineAsset) -> Accepted:
        return await self._execute(_DEFINE_ASSET, CommandRecord.of(ctx, command))

    async def open_wallet(self, ctx: CommandContext, command: OpenWallet) -> Accepted:
        return await self._execute(_OPEN_WALLET, CommandRecord.of(ctx, command))

    async def post_transaction(self, ctx: CommandContext, command: TransactionCommand) -> Accepted:
        future: asyncio.Future[_Outcome] = asyncio.get_running_loop().create_future()
        self._queue.append((CommandRecord.of(ctx, command), future))
        if self._in_flight < self._max_in_flight:
            self._in_flight += 1
            flusher = asyncio.create_task(self._flush())
            self._flushers.add(flusher)
            flusher.add_done_callback(self._flushers.discard)
        return outcome_of(*await future)

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

    async def _run_batch(self, batch: Sequence[tuple[CommandRecord, asyncio.Future[_Outcome]]]) -> None:
        try:
            rows = await self._pool.fetch(_POST_TRANSACTIONS, _json([record for record, _ in batch]))
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
        if self._on_append is not None and any(r["outcome"] == ACCEPTED and not r["replayed"] for r in rows):
            self._on_append()
        for row in rows:
            future = batch[row["idx"] - 1][1]
            if not future.done():  # its caller may have gone (cancelled); the outcome is stored anyway
                future.set_result((row["outcome"], row["body"], row["replayed"]))

    async def _execute(self, sql: str, record: CommandRecord) -> Accepted:
        row = await self._pool.fetchrow(sql, _json(record))
        assert row is not None
        if row["outcome"] == ACCEPTED and not row["replayed"] and self._on_append is not None:
            self._on_append()
        return outcome_of(row["outcome"], row["body"], row["replayed"])
