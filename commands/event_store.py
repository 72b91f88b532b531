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
import collections
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from typing import Any

import asyncpg
import msgspec
from asyncpg.pool import PoolConnectionProxy

from commands.errors import (
    LOCK_NOT_AVAILABLE,
    Overloaded,
    Unavailable,
    close_broken,
    describe,
    is_transient,
)
from domain import (
    ACCEPTED,
    RECORDED_OUTCOMES,
    REJECTIONS,
    CaptureHold,
    DefineAsset,
    LifecycleCommand,
    OpenWallet,
    PlaceHold,
    ReverseTransaction,
    TransactionCommand,
    VoidHold,
)

log = logging.getLogger("tally.event_store")

_DEFINE_ASSET = "SELECT outcome, body, replayed FROM tally_define_asset($1::jsonb)"
_OPEN_WALLET = "SELECT outcome, body, replayed FROM tally_open_wallet($1::jsonb)"
_POST_TRANSACTIONS = "SELECT idx, outcome, body, replayed FROM tally_post_transactions($1::jsonb, $2::int)"
_REVERSE_TRANSACTION = "SELECT outcome, body, replayed FROM tally_reverse_transaction($1::jsonb)"
_PLACE_HOLD = "SELECT outcome, body, replayed FROM tally_place_hold($1::jsonb)"
_CAPTURE_HOLD = "SELECT outcome, body, replayed FROM tally_capture_hold($1::jsonb)"
_VOID_HOLD = "SELECT outcome, body, replayed FROM tally_void_hold($1::jsonb)"
_POST_ATOMIC = (
    "SELECT idx, outcome, body, replayed, applied FROM tally_post_atomic($1::jsonb, $2::int, $3::bool)"
)
_BATCH_ANSWER = (
    "SELECT same_request, applied, outcome, body, replayed "
    "FROM tally_batch_answer($1::uuid, $2::text, $3::bytea)"
)
_CLAIM_BATCH = "SELECT pg_advisory_lock(tally_batch_lock_class(), tally_key_lock($1::uuid, $2::text))"
_LET_GO_OF_BATCH = "SELECT pg_advisory_unlock(tally_batch_lock_class(), tally_key_lock($1::uuid, $2::text))"
_RECORD_BATCH = "SELECT tally_record_batch($1::uuid, $2::text, $3::bytea, $4::bool, $5::bool, $6::jsonb)"
# A non-atomic batch is decided in transactions of at most this many commands: each claimed key
# holds an entry of PostgreSQL's shared lock table until its transaction ends (README, "Faults and
# limits"). An atomic batch is one transaction, whatever its size.
BATCH_CHUNK = 1000
# Not a decision: the command's wallet was held by another transaction (its key was let go).
WALLET_LOCKED = "wallet_locked"
# Not a decision either: a command of a batch that could not be decided now (retry it, with its key).
UNAVAILABLE = "unavailable"

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
    # The request's fingerprint as Tally computed it before fingerprints sorted the keys of JSON
    # objects (they were hashed in the order sent), when that differs: a key recorded then keeps
    # replaying (tally_replay).
    legacy_fingerprint: bytes | None = None
    # The assets the client's key is limited to (None: every asset). A command on a transaction or
    # hold learns its asset in SQL, which checks it there.
    assets: tuple[str, ...] | None = None

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
    command: DefineAsset | OpenWallet | TransactionCommand | LifecycleCommand
    legacy_fingerprint: str | None = None  # same form; see CommandContext
    assets: tuple[str, ...] | None = None  # see CommandContext

    @classmethod
    def of(
        cls, ctx: CommandContext, command: DefineAsset | OpenWallet | TransactionCommand | LifecycleCommand
    ) -> CommandRecord:
        context = {**ctx.metadata, "created_by": ctx.created_by}
        legacy = None if ctx.legacy_fingerprint is None else "\\x" + ctx.legacy_fingerprint.hex()
        return cls(
            ctx.command_id, ctx.client_id, "\\x" + ctx.fingerprint.hex(), context, command, legacy, ctx.assets
        )


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


class BatchResult(msgspec.Struct, frozen=True):
    """A batch's answer: each command's (outcome, body, replayed), in request order, and whether the
    batch was applied (an atomic batch with a refused command applies none; a non-atomic batch is
    always applied, command by command). An outcome may be ``unavailable``: not decided now."""

    outcomes: list[tuple[str, str, bool]]
    applied: bool


class RecordedBatch(msgspec.Struct, frozen=True):
    """The answer recorded under a batch's key, and whether it was recorded for this very request."""

    same_request: bool
    result: BatchResult


class _Pending:
    """A transaction command waiting for its batch: its record, the future its caller awaits, its
    wallet, and the moment its caller stops waiting (loop time)."""

    __slots__ = ("deadline", "future", "record", "resent", "wallet")

    def __init__(self, record: CommandRecord, future: asyncio.Future[_Outcome], wallet: str, deadline: float):
        self.record = record
        self.future = future
        self.wallet = wallet
        self.deadline = deadline
        self.resent = False  # sent again once after its key was recorded meanwhile (_recorded_meanwhile)


class BatchSession:
    """One batch's connection (EventStore.batch): its recorded answer, its decision, its record."""

    def __init__(self, store: EventStore, conn: PoolConnectionProxy[asyncpg.Record]) -> None:
        self._store = store
        self._conn = conn

    async def answer(self, client: str, key: str, fingerprint: bytes) -> RecordedBatch | None:
        """The answer recorded under a batch's key, or None."""
        rows = await self._conn.fetch(_BATCH_ANSWER, client, key, fingerprint, timeout=self._store._timeout)
        if not rows:
            return None
        if any(r["body"] is None for r in rows):  # a command's row is never removed: tampering
            raise RuntimeError(f"batch {key} of client {client} names a command that is not recorded")
        outcomes = [(r["outcome"], r["body"], r["replayed"]) for r in rows]
        return RecordedBatch(rows[0]["same_request"], BatchResult(outcomes, rows[0]["applied"]))

    async def post(
        self, records: Sequence[CommandRecord], *, atomic: bool, reject: bool = False
    ) -> BatchResult:
        """Decide a batch of transaction commands, each under its own key, in request order per
        wallet.

        Atomic: one transaction that waits for its wallets (at most ``lock_wait``) and applies every
        command or, when one is refused or ``reject`` (the caller refused one before sending it),
        none. Non-atomic: transactions of up to BATCH_CHUNK commands that never wait for a wallet
        another transaction holds; those commands are then sent again, waiting for their wallets
        (``unavailable`` when one stays held past ``lock_wait``; a wallet with an undecided command
        has its later commands undecided too, so none is decided out of order)."""
        if atomic:
            rows = await self._send(_POST_ATOMIC, records, self._store._lock_wait_ms(), reject)
            return BatchResult(
                [(r["outcome"], r["body"], r["replayed"]) for r in rows], bool(rows and rows[0]["applied"])
            )
        outcomes: list[tuple[str, str, bool]] = []
        stuck_wallets: set[str] = set()  # wallets, and keys, with an undecided command
        stuck_keys: set[str] = set()
        for start in range(0, len(records), BATCH_CHUNK):
            chunk = records[start : start + BATCH_CHUNK]
            later = {i for i, r in enumerate(chunk) if _wallet_of(r) in stuck_wallets or r.key in stuck_keys}
            send = [r for i, r in enumerate(chunk) if i not in later]
            decided = iter(await self._post_chunk(send) if send else [])
            for i, record in enumerate(chunk):
                outcome = (
                    _not_decided(
                        f"an earlier command of wallet {_wallet_of(record)} in this batch was not decided"
                    )
                    if i in later
                    else next(decided)
                )
                if outcome[0] == UNAVAILABLE:
                    stuck_wallets.add(_wallet_of(record))
                    stuck_keys.add(record.key)
                outcomes.append(outcome)
        return BatchResult(outcomes, applied=True)

    async def _post_chunk(self, records: Sequence[CommandRecord]) -> list[tuple[str, str, bool]]:
        rows = await self._send(_POST_TRANSACTIONS, records, None)
        outcomes = [(r["outcome"], r["body"], r["replayed"]) for r in rows]
        held = [i for i, (outcome, _, _) in enumerate(outcomes) if outcome == WALLET_LOCKED]
        if not held:
            return outcomes
        # The commands of wallets another transaction held, again, waiting for those wallets: all
        # together or, when one of them stays held, group by group (a group: the wallets that
        # share a key, which must be decided together), so the others are decided.
        groups = _groups(records, held)
        attempts = [held] if len(groups) == 1 else [held, *groups]
        for group in attempts:
            try:
                retried = await self._send(
                    _POST_TRANSACTIONS, [records[i] for i in group], self._store._lock_wait_ms()
                )
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if group is held and len(attempts) > 1:
                    continue  # group by group, then
                for i in group:
                    outcomes[i] = _not_decided(f"the command could not be decided: {describe(exc)}")
                continue
            for row in retried:
                outcomes[group[row["idx"] - 1]] = (row["outcome"], row["body"], row["replayed"])
            if group is held:
                break
        for i, (outcome, _, _) in enumerate(outcomes):
            if outcome == WALLET_LOCKED:  # cannot happen: a call that waits locks its wallets first
                outcomes[i] = _not_decided(f"wallet {_wallet_of(records[i])} stayed locked")
        return outcomes

    async def _send(self, sql: str, records: Sequence[CommandRecord], *args: Any) -> list[asyncpg.Record]:
        """One call of a batch function, sent once more if a key was recorded meanwhile (then it
        replays); anything else is raised, for the caller to tell apart."""
        payload = _json(list(records))
        timeout = self._store._timeout + 1
        try:
            return await self._conn.fetch(sql, payload, *args, timeout=timeout)
        except asyncpg.UniqueViolationError as exc:
            if not _recorded_meanwhile(exc):
                raise
            return await self._conn.fetch(sql, payload, *args, timeout=timeout)

    async def record(
        self,
        client: str,
        key: str,
        fingerprint: bytes,
        *,
        atomic: bool,
        result: BatchResult,
        keys: Sequence[str],
    ) -> bool:
        """Record a batch's answer under its key; False when one was recorded first (answer that
        one). Each command's response is kept here only when its own key does not record it
        (migrations/0010_batches.sql)."""
        results = []
        for key_of, (outcome, body, replayed) in zip(keys, result.outcomes, strict=True):
            entry: dict[str, Any] = {"key": key_of, "outcome": outcome, "replayed": replayed}
            if not (result.applied and outcome in RECORDED_OUTCOMES):
                entry["body"] = msgspec.Raw(body.encode())
            results.append(entry)
        recorded: bool = await self._conn.fetchval(
            _RECORD_BATCH, client, key, fingerprint, atomic, result.applied, _json(results),
            timeout=self._store._timeout,
        )  # fmt: skip
        return recorded


class EventStore:
    """``on_append`` is called after new events commit (the app uses it to wake projectors); it must
    not block.

    Every call is bounded: a command waits at most ``timeout`` seconds, queued and running (then
    Unavailable); at most ``max_queue`` commands wait for a batch, and at most ``max_queue // 4``
    for one wallet (beyond: Overloaded); a wallet locked by another transaction is waited for at
    most ``lock_wait`` seconds, by that wallet's commands only (then Unavailable).

    Wallets are *held* while a batch of this process has them (in flight, or retrying them): their
    later commands are parked apart, per wallet, and rejoin the queue when the wallet is let go. So
    this process's batches never contend for a row, and a wallet held for long (another session
    locked it) parks only its own commands: it cannot fill the queue every other wallet needs."""

    def __init__(
        self,
        pool: asyncpg.Pool,
        on_append: Callable[[], None] | None = None,
        *,
        max_in_flight: int = 4,
        max_batch: int = 100,
        max_queue: int = 2000,
        timeout: float = 10.0,
        lock_wait: float = 2.0,
        max_batches: int = 2,
    ) -> None:
        self._pool = pool
        self._on_append = on_append
        self._max_in_flight = max_in_flight
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._max_parked = max(1, max_queue // 4)
        self._timeout = timeout
        self._lock_wait = lock_wait
        self._queue: collections.deque[_Pending] = collections.deque()
        self._parked: dict[str, collections.deque[_Pending]] = {}
        self._held: collections.Counter[str] = collections.Counter()  # holders per wallet
        self._retries: dict[str, list[_Pending]] = {}  # per wallet being retried: commands to retry
        self._in_flight = 0
        self._retry_slots = asyncio.Semaphore(max_in_flight)
        self._batch_slots = asyncio.Semaphore(max_batches)
        self._tasks: set[asyncio.Task[None]] = set()  # references, so tasks are not collected

    @property
    def queued(self) -> int:
        """Commands waiting for a batch (not those parked behind a held wallet)."""
        return len(self._queue)

    async def define_asset(self, ctx: CommandContext, command: DefineAsset) -> Accepted:
        return await self._execute(_DEFINE_ASSET, CommandRecord.of(ctx, command))

    async def open_wallet(self, ctx: CommandContext, command: OpenWallet) -> Accepted:
        return await self._execute(_OPEN_WALLET, CommandRecord.of(ctx, command))

    async def reverse_transaction(self, ctx: CommandContext, command: ReverseTransaction) -> Accepted:
        return await self._execute(_REVERSE_TRANSACTION, CommandRecord.of(ctx, command))

    async def place_hold(self, ctx: CommandContext, command: PlaceHold) -> Accepted:
        return await self._execute(_PLACE_HOLD, CommandRecord.of(ctx, command))

    async def capture_hold(self, ctx: CommandContext, command: CaptureHold) -> Accepted:
        return await self._execute(_CAPTURE_HOLD, CommandRecord.of(ctx, command))

    async def void_hold(self, ctx: CommandContext, command: VoidHold) -> Accepted:
        return await self._execute(_VOID_HOLD, CommandRecord.of(ctx, command))

    async def post_transaction(self, ctx: CommandContext, command: TransactionCommand) -> Accepted:
        loop = asyncio.get_running_loop()
        item = _Pending(
            CommandRecord.of(ctx, command), loop.create_future(), command.user_id, loop.time() + self._timeout
        )
        self._enqueue(item)
        try:
            async with asyncio.timeout(self._timeout):
                outcome = await asyncio.shield(item.future)
        except asyncio.CancelledError:
            item.future.cancel()  # its caller went away: not sent if not taken yet
            raise
        except TimeoutError:
            if item.future.done() and not item.future.cancelled():
                return outcome_of(*item.future.result())  # decided just now (or failed: raised)
            # Still waiting, it will not run; already in a batch, its outcome is stored anyway.
            item.future.cancel()
            raise Unavailable(
                f"the command was not decided within {self._timeout:g} s; "
                "retry with the same Idempotency-Key: it replays or applies once"
            ) from None
        return outcome_of(*outcome)

    @contextlib.asynccontextmanager
    async def batch(self, client: str | None = None, key: str | None = None) -> AsyncIterator[BatchSession]:
        """A session for one batch (POST /v1/batches): one connection for all of it, taken when one
        of at most ``max_batches`` turns per process is free (waiting at most ``timeout``: then
        Overloaded). Given the batch's ``client`` and ``key``, the session holds that key's claim
        (a session advisory lock, tally_batch_lock_class) from before its recorded answer is looked
        up until its own is recorded: two batches under one key, even different ones, are decided
        one after the other, and the second finds the first's answer (or 422); it waits at most the
        connection's lock timeout (TALLY_LOCK_TIMEOUT), then Unavailable."""
        try:
            async with asyncio.timeout(self._timeout):
                await self._batch_slots.acquire()
        except TimeoutError:
            raise Overloaded(f"batches of this process stayed busy for {self._timeout:g} s") from None
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                claimed = False
                try:
                    if client is not None and key is not None:
                        await conn.execute(_CLAIM_BATCH, client, key, timeout=self._timeout + 1)
                        claimed = True
                    yield BatchSession(self, conn)
                except BaseException as exc:
                    if not isinstance(exc, asyncpg.PostgresError):  # no answer from the server
                        close_broken(conn, exc)  # closed: the claim went with the session
                        claimed = False
                    raise
                finally:
                    if claimed:
                        await _let_go_of_batch(conn, client, key, self._timeout)
        except Exception as exc:
            if is_transient(exc) and not isinstance(exc, Unavailable):
                raise Unavailable(f"the batch could not be decided: {describe(exc)}") from exc
            raise
        finally:
            self._batch_slots.release()
            if self._on_append is not None:  # whatever committed (a non-atomic batch's chunks)
                self._on_append()

    async def post_batch(
        self, records: Sequence[CommandRecord], *, atomic: bool, reject: bool = False
    ) -> BatchResult:
        """A batch without a key of its own (see BatchSession.post)."""
        async with self.batch() as session:
            return await session.post(records, atomic=atomic, reject=reject)

    def _lock_wait_ms(self) -> int:
        return max(1, round(self._lock_wait * 1000))

    def _enqueue(self, item: _Pending) -> None:
        if item.wallet in self._held:
            parked = self._parked.setdefault(item.wallet, collections.deque())
            if len(parked) >= self._max_parked:
                raise Overloaded(f"{len(parked)} commands are already waiting for wallet {item.wallet}")
            parked.append(item)
            return
        if len(self._queue) >= self._max_queue:
            raise Overloaded(f"{len(self._queue)} commands are already waiting in this process")
        self._queue.append(item)
        self._kick()

    def _start(self, coroutine: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _kick(self) -> None:
        """Start a flusher if commands wait and fewer than ``max_in_flight`` run."""
        if self._queue and self._in_flight < self._max_in_flight:
            self._in_flight += 1
            self._start(self._flush())

    def _hold(self, wallets: set[str]) -> None:
        self._held.update(wallets)

    def _let_go(self, wallets: set[str]) -> None:
        """One holder lets go of each wallet; a wallet nobody holds any more takes its parked
        commands back to the head of the queue (they are older than what arrived meanwhile)."""
        for wallet in wallets:
            self._held[wallet] -= 1
            if self._held[wallet] <= 0:
                del self._held[wallet]
                parked = self._parked.pop(wallet, None)
                if parked:
                    self._queue.extendleft(reversed(parked))
        self._kick()

    def _take(self) -> list[_Pending]:
        """The next batch: queued commands in order, skipping those whose caller gave up, and
        parking those of a wallet that another batch took meanwhile."""
        batch: list[_Pending] = []
        wallets: set[str] = set()
        while self._queue and len(batch) < self._max_batch:
            item = self._queue.popleft()
            if item.future.done():
                continue
            if item.wallet in self._held and item.wallet not in wallets:
                self._parked.setdefault(item.wallet, collections.deque()).append(item)
                continue
            wallets.add(item.wallet)
            batch.append(item)
        self._hold(wallets)
        return batch

    async def _flush(self) -> None:
        """Run batches while there are commands to take; at most ``max_in_flight`` of these run.

        The count is decremented in the same step that finds nothing to take (no await between),
        so a command queued at any moment either finds a flusher that will take it, or starts one,
        or is parked behind a held wallet, whose last holder puts it back and kicks the queue."""
        try:
            while batch := self._take():
                try:
                    await self._run_batch(batch)
                finally:
                    self._let_go({item.wallet for item in batch})
        finally:
            self._in_flight -= 1

    async def _run_batch(self, batch: Sequence[_Pending], lock_wait: float | None = None) -> None:
        """Run one batch: a group batch (``lock_wait`` None), which never waits for a wallet, or the
        retry of one held wallet's commands, which waits for it at most ``lock_wait`` seconds.
        Commands whose callers gave up while it waited for a connection are not sent."""
        try:
            async with self._pool.acquire(timeout=self._timeout) as conn:
                batch = [item for item in batch if not item.future.done()]
                if not batch:
                    return
                try:
                    rows = await conn.fetch(
                        _POST_TRANSACTIONS,
                        _json([item.record for item in batch]),
                        None if lock_wait is None else max(1, round(lock_wait * 1000)),
                        timeout=self._timeout + 1,
                    )
                except BaseException as exc:
                    close_broken(conn, exc)
                    raise
        except asyncio.CancelledError:  # the loop is going away: nobody may wait forever
            for item in batch:
                item.future.cancel()
            raise
        except Exception as exc:
            await self._batch_failed(batch, exc, lock_wait)
            return
        if self._on_append is not None and any(r["outcome"] == ACCEPTED and not r["replayed"] for r in rows):
            self._on_append()
        for row in rows:
            item = batch[row["idx"] - 1]
            if row["outcome"] == WALLET_LOCKED:
                if lock_wait is None:
                    self._retry(item)
                elif not item.future.done():  # cannot happen: a waiting batch locks its wallets first
                    item.future.set_exception(Unavailable(f"wallet {item.wallet} is locked"))
            elif not item.future.done():  # its caller may have gone; the outcome is stored anyway
                item.future.set_result((row["outcome"], row["body"], row["replayed"]))

    async def _batch_failed(self, batch: Sequence[_Pending], exc: Exception, lock_wait: float | None) -> None:
        one_key_busy = getattr(exc, "sqlstate", None) == LOCK_NOT_AVAILABLE and lock_wait is None
        if is_transient(exc) and not (one_key_busy and len(batch) > 1):
            # Nothing to learn by retrying now. The batch applied nothing, or committed as its
            # connection died: either way each command's key replays or applies it once.
            log.warning("a batch of %d commands failed: %r", len(batch), exc)
            error = Unavailable(f"the command could not be decided: {describe(exc)}")
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(error)
            return
        if _recorded_meanwhile(exc):
            # The batch applied nothing; each command sent again replays what was recorded, or
            # applies once. Once: a second time would be a bug, not a race.
            log.warning(
                "a key of a batch of %d commands was recorded meanwhile; sending them again", len(batch)
            )
            for item in batch:
                if not item.future.done():
                    if item.resent:
                        item.future.set_exception(exc)
                        continue
                    item.resent = True
                    await self._run_batch([item], lock_wait)
            return
        if len(batch) == 1:
            if not batch[0].future.done():
                batch[0].future.set_exception(exc)
            return
        # A command the batch function refused (a bug, not a decision), or a key another transaction
        # held past the lock timeout (a group batch waits for keys only): retrying one by one finds
        # that command, and decides the others. Safe, since the batch rolled back.
        log.warning("a batch of %d commands failed (%s); retrying them one by one", len(batch), exc)
        for item in batch:
            if not item.future.done():
                await self._run_batch([item], lock_wait)

    def _retry(self, item: _Pending) -> None:
        """Hand a command whose wallet another transaction held to that wallet's retry: one per
        wallet at a time, which holds the wallet (its later commands park behind it)."""
        pending = self._retries.get(item.wallet)
        if pending is not None:
            pending.append(item)
            return
        self._retries[item.wallet] = [item]
        self._hold({item.wallet})
        self._start(self._retry_wallet(item.wallet))

    async def _retry_wallet(self, wallet: str) -> None:
        """Retry the commands of a wallet another transaction held, as batches that wait for that
        wallet's lock, each at most ``lock_wait`` and no longer than its latest caller waits; at
        most ``max_in_flight`` such retries run at once, so a few held wallets cannot take every
        connection. A command whose caller gave up is not sent; those left when no retry can run
        in time are answered Unavailable at once."""
        loop = asyncio.get_running_loop()
        try:
            while pending := self._retries[wallet]:
                self._retries[wallet] = []
                items = [item for item in pending if not item.future.done()]
                patience = max((item.deadline for item in items), default=0.0) - loop.time()
                if patience <= 0:
                    for item in items:  # their callers' own timeouts are due: nothing to answer
                        item.future.cancel()
                    continue
                try:
                    async with asyncio.timeout(patience):
                        await self._retry_slots.acquire()
                except TimeoutError:
                    _fail(items, Unavailable(f"wallet {wallet} is locked by another transaction"))
                    continue
                try:
                    wait = min(self._lock_wait, max(i.deadline for i in items) - loop.time())
                    if wait <= 0:
                        _fail(items, Unavailable(f"wallet {wallet} is locked by another transaction"))
                        continue
                    await self._run_batch(items, lock_wait=wait)
                finally:
                    self._retry_slots.release()
        finally:
            del self._retries[wallet]
            self._let_go({wallet})

    async def _execute(self, sql: str, record: CommandRecord) -> Accepted:
        try:
            return await self._execute_once(sql, record)
        except asyncpg.UniqueViolationError as exc:
            if not _recorded_meanwhile(exc):
                raise
            return await self._execute_once(sql, record)  # it replays what was recorded, or applies once

    async def _execute_once(self, sql: str, record: CommandRecord) -> Accepted:
        try:
            async with asyncio.timeout(self._timeout), self._pool.acquire(timeout=self._timeout) as conn:
                try:
                    row = await conn.fetchrow(sql, _json(record), timeout=self._timeout + 1)
                except BaseException as exc:
                    close_broken(conn, exc)
                    raise
        except Exception as exc:
            if is_transient(exc):
                raise Unavailable(f"the command could not be decided: {describe(exc)}") from exc
            raise
        assert row is not None
        if row["outcome"] == ACCEPTED and not row["replayed"] and self._on_append is not None:
            self._on_append()
        return outcome_of(row["outcome"], row["body"], row["replayed"])


def _recorded_meanwhile(exc: BaseException) -> bool:
    """The command's key was recorded by a transaction that took no claim on it (`tally keys adopt`
    moving an earlier key to this client, or the release before this one during an upgrade) while
    this one decided it: the primary key of `commands` refused the second record, and the
    transaction rolled back (commands/sql/tally_claim_command.sql)."""
    return isinstance(exc, asyncpg.UniqueViolationError) and exc.constraint_name == "commands_pkey"


async def _let_go_of_batch(
    conn: PoolConnectionProxy[asyncpg.Record], client: Any, key: Any, wait: float
) -> None:
    """Let go of a batch key's claim; a connection that cannot is closed (the claim goes with it),
    never handed back to the pool still holding it."""
    try:
        await conn.execute(_LET_GO_OF_BATCH, client, key, timeout=wait + 1)
    except BaseException as exc:
        conn.terminate()
        if not isinstance(exc, Exception):
            raise  # a cancellation goes on
        log.warning(
            "could not let go of batch key %s of client %s (%r); its connection is closed", key, client, exc
        )


def _groups(records: Sequence[CommandRecord], indexes: Sequence[int]) -> list[list[int]]:
    """``indexes`` grouped by wallet, wallets that share a key in one group, in request order."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    by_key: dict[str, str] = {}
    for i in indexes:
        wallet = root(_wallet_of(records[i]))
        other = by_key.setdefault(records[i].key, wallet)
        parent[root(other)] = wallet
    groups: dict[str, list[int]] = {}
    for i in indexes:
        groups.setdefault(root(_wallet_of(records[i])), []).append(i)
    return list(groups.values())


def _not_decided(detail: str) -> tuple[str, str, bool]:
    """The outcome of a batch's command that could not be decided now (503: retry it)."""
    return UNAVAILABLE, _json({"code": UNAVAILABLE, "detail": detail}), False


def _wallet_of(record: CommandRecord) -> str:
    command = record.command
    assert isinstance(command, TransactionCommand)
    return command.user_id


def _fail(items: Sequence[_Pending], error: Exception) -> None:
    for item in items:
        if not item.future.done():
            item.future.set_exception(error)
