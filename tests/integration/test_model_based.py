"""The SQL decider against a model of its rules (tests/model.py), through concurrent batches.

Hypothesis drives a ledger through random steps: wallets are opened, and batches of top-ups,
bonuses and spends are sent to ``tally_post_transactions``, two or three batches at once, each on
its own connection and so in its own transaction. The start is staged: every batch's transaction
first waits at a gate (an advisory lock the test holds) until all of them are seen waiting there,
then the gate opens and they run together. Commands repeat keys within a batch and across the
concurrent batches (same request or another), from one client or two (the same key from two
clients is two commands), name wallets and assets that do not exist, and carry If-Match versions,
right or wrong.

Concurrent batches commit in some order; the model runs them one after the other. So the test
looks for an order of the step's batches in which the model gives every command exactly the
outcome the database gave: the outcome code, whether it was replayed, the entries, the balance
after and the wallet version of an accepted command, the figures of a refused one, and for a
replay, byte for byte the body first given under that key. Then every wallet's balances and
version must equal the model's. Such an order exists because every key and wallet a batch uses is
locked until its commit, and the wallets and assets it checks exist before the step (batches
create no streams); a lost update, a doubled effect, a deadlock or an answer given while another
batch held its key fails.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import uuid
from typing import Any, ClassVar

import asyncpg
import msgspec
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from commands import CommandContext, CommandRecord, EventStore, handle
from commands.event_store import (
    _CAPTURE_HOLD,
    _PLACE_HOLD,
    _POST_TRANSACTIONS,
    _REVERSE_TRANSACTION,
    _VOID_HOLD,
)
from domain import FLOWS, FLOWS_BY_KIND, CaptureHold, OpenWallet, PlaceHold, ReverseTransaction, VoidHold
from tests.helpers import TEST_CLIENT_ID, define_asset, lock_waits, run_batch
from tests.helpers import ctx as helper_ctx
from tests.model import Command, Ledger, Lifecycle, Outcome, Wallet

USERS = ("ann", "ben", "cat")
NEVER_OPENED = "zed"
ASSETS = ("GOLD", "GEMS")
UNDEFINED_ASSET = "NOPE"
KEYS = tuple(f"k{i}" for i in range(6))
# Two clients: every key lives in its client's namespace (the model sees "<client id>/<key>").
OTHER_CLIENT_ID = "7e570000-0000-4000-8000-000000000002"
CLIENTS = (TEST_CLIENT_ID, TEST_CLIENT_ID, OTHER_CLIENT_ID)

commands = st.fixed_dictionaries({
    "kind": st.sampled_from([f.kind for f in FLOWS for _ in range(2 if f.user_sign < 0 else 1)]),
    "user": st.sampled_from((*USERS, *USERS[:2], NEVER_OPENED)),
    "asset": st.sampled_from((*ASSETS, ASSETS[0], UNDEFINED_ASSET)),
    "amount": st.integers(min_value=1, max_value=60),
    # A few keys every step may repeat, or (mostly) one of its own.
    "key": st.one_of(st.sampled_from(KEYS), st.integers(min_value=0, max_value=10**9).map("f{}".format)),
    "client": st.sampled_from(CLIENTS),
    "request": st.integers(min_value=0, max_value=1),  # the same key with another request
    "expected_version": st.one_of(st.none(), st.none(), st.integers(min_value=1, max_value=6)),
})  # fmt: skip
batches = st.lists(st.lists(commands, min_size=1, max_size=6), min_size=2, max_size=3)

# The gate: a two-key advisory lock only this test takes (class 31250; Tally's key claims use their
# own class, tally_key_lock_class, and its other locks are one-key locks).
_CLOSE_GATE = "SELECT pg_advisory_lock(31250, 1)"
_OPEN_GATE = "SELECT pg_advisory_unlock(31250, 1)"
_PASS_GATE = "SELECT pg_advisory_xact_lock_shared(31250, 1)"
_STATE = "SELECT stream_id, version, state FROM streams WHERE stream_type = 'wallet' AND stream_id LIKE $1"
# The writing transactions: the rows' xmin (a writer_xid may be an earlier writer's,
# commands/sql/tally_writer_xid.sql).
_WRITERS = "SELECT count(DISTINCT xmin::text) FROM events WHERE event_id = ANY($1::uuid[])"


class LedgerMachine(RuleBasedStateMachine):
    db_url: ClassVar[str]
    concurrent_steps = 0  # steps in which more than one of the batches released together wrote

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(_open_pool(self.db_url))
        self.ns = uuid.uuid4().hex[:8]  # this example's wallets and keys, apart from every other's
        self.model = Ledger(assets=set(ASSETS))
        self.first_bodies: dict[str, str] = {}

    def teardown(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()

    def _command(self, spec: dict[str, Any]) -> Command:
        fingerprint = hashlib.sha256(json.dumps([spec, spec["request"]], sort_keys=True).encode()).digest()
        return Command(
            key=f"{spec['client']}/{self.ns}-{spec['key']}", fingerprint=fingerprint, kind=spec["kind"],
            user_id=f"{self.ns}-{spec['user']}", asset=spec["asset"], amount=spec["amount"],
            expected_version=spec["expected_version"],
        )  # fmt: skip

    @initialize()
    def open_two_wallets(self) -> None:
        for user in USERS[:2]:
            self.open_wallet(user)

    @rule(user=st.sampled_from(USERS))
    def open_wallet(self, user: str) -> None:
        user_id = f"{self.ns}-{user}"
        ctx = helper_ctx(f"{self.ns}-open-{user}", "open")
        self.loop.run_until_complete(handle(EventStore(self.pool), OpenWallet(user_id=user_id), ctx))
        self.model.open_wallet(user_id)

    @rule(specs=batches)
    def run_concurrently(self, specs: list[list[dict[str, Any]]]) -> None:
        sent = [[self._command(spec) for spec in batch] for batch in specs]
        answers = self.loop.run_until_complete(self._send_at_once(sent))
        for order in itertools.permutations(range(len(sent))):
            trial = self.model.copy()
            predicted = {i: trial.run_batch(sent[i]) for i in order}
            if all(_agree(predicted[i], answers[i]) for i in range(len(sent))):
                self.model = trial
                break
        else:
            serial = self.model.copy()
            raise AssertionError(
                "no serial order of the batches explains the answers:\n"
                + "\n".join(
                    f"{c}\n  sql:   {dict(a)}\n  model: {m}"
                    for i in range(len(sent))
                    for c, a, m in zip(sent[i], answers[i], serial.run_batch(sent[i]), strict=True)
                )
            )
        self._check_replays(sent, answers)
        self.loop.run_until_complete(self._check_wallets())
        self.loop.run_until_complete(self._count_writers(answers))

    async def _send_at_once(self, sent: list[list[Command]]) -> list[list[asyncpg.Record]]:
        async with self.pool.acquire() as gate:
            await gate.execute(_CLOSE_GATE)
            gate_pid = await gate.fetchval("SELECT pg_backend_pid()")
            try:
                racing = [asyncio.create_task(self._send(batch)) for batch in sent]
                await lock_waits(
                    self.pool, lambda waits: sum(gate_pid in w["blockers"] for w in waits) == len(sent)
                )
            finally:
                await gate.execute(_OPEN_GATE)
        return await asyncio.gather(*racing)

    async def _send(self, batch: list[Command]) -> list[asyncpg.Record]:
        records = [_record(command) for command in batch]
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_PASS_GATE)
            return await run_batch(conn, *records)

    def _check_replays(self, sent: list[list[Command]], answers: list[list[asyncpg.Record]]) -> None:
        for batch, rows in zip(sent, answers, strict=True):
            for command, row in zip(batch, rows, strict=True):
                if row["outcome"] == "idempotency_key_reused" or row["outcome"].endswith("_not_found"):
                    continue
                first = self.first_bodies.setdefault(command.key, row["body"])
                assert row["body"] == first, (command, row["body"], first)

    async def _check_wallets(self) -> None:
        for row in await self.pool.fetch(_STATE, f"wallet:{self.ns}-%"):
            wallet = self.model.wallets[row["stream_id"].removeprefix("wallet:")]
            balances = {a: b for a, b in json.loads(row["state"])["balances"].items()}
            assert (row["version"], balances) == (wallet.version, wallet.balances), row["stream_id"]

    async def _count_writers(self, answers: list[list[asyncpg.Record]]) -> None:
        writing = [
            [
                json.loads(r["body"])["transaction_id"]
                for r in rows
                if r["outcome"] == "accepted" and not r["replayed"]
            ]
            for rows in answers
        ]
        writing = [ids for ids in writing if ids]
        if len(writing) > 1:
            transactions = await self.pool.fetchval(_WRITERS, [i for ids in writing for i in ids])
            assert transactions == len(writing)  # each batch committed alone, in its own transaction
            LedgerMachine.concurrent_steps += 1


async def _open_pool(url: str) -> asyncpg.Pool:
    return await asyncpg.create_pool(url, min_size=5, max_size=6)  # 3 batches, the gate, the probe


def _record(command: Command) -> CommandRecord:
    flow = FLOWS_BY_KIND[command.kind]
    domain_command = flow.command(
        user_id=command.user_id, asset=command.asset, amount=command.amount,
        expected_version=command.expected_version,
    )  # fmt: skip
    client_id, key = command.key.split("/", 1)
    context = CommandContext(
        command_id=key, client_id=client_id, created_by=client_id, fingerprint=command.fingerprint
    )
    return CommandRecord.of(context, domain_command)


def _agree(predicted: list[Outcome], rows: list[asyncpg.Record]) -> bool:
    for outcome, row in zip(predicted, rows, strict=True):
        if (row["outcome"], row["replayed"]) != (outcome.outcome, outcome.replayed):
            return False
        body = json.loads(row["body"])
        if outcome.outcome != "accepted" and body.get("code") != outcome.outcome:
            return False
        if any(body.get(name) != value for name, value in outcome.facts.items()):
            return False
    return True


async def _define_assets(db_url: str) -> None:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=2)
    try:
        await pool.execute(
            "INSERT INTO clients (client_id, name, scopes) VALUES ($1, 'model-other', '{admin}')",
            uuid.UUID(OTHER_CLIENT_ID),
        )
        for code in ASSETS:
            await define_asset(EventStore(pool), code)
    finally:
        await pool.close()


def test_the_sql_decider_agrees_with_the_model_under_concurrent_batches(db_url: str) -> None:
    # db_url is created by an async fixture; the state machine drives its own event loop.
    asyncio.run(_define_assets(db_url))
    machine = type("Machine", (LedgerMachine,), {"db_url": db_url})
    LedgerMachine.concurrent_steps = 0
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=60,
            stateful_step_count=12,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
    # The interesting case was common: in many steps, several of the batches that started together
    # (seen at the gate) wrote, each in a transaction of its own.
    assert LedgerMachine.concurrent_steps >= 10


# --- the purchase lifecycle ------------------------------------------------------------------
# Reversals and holds against tests/model.py's Lifecycle: each step sends two or three commands at
# once (top-ups, spends, holds, captures, voids, reversals of what earlier steps made, and now and
# then an id that names nothing), each on its own connection in its own transaction, released
# together from the gate; the model must explain the answers in some serial order. Then the
# wallets' balances, versions and held amounts must be the model's, and a command sent again
# under its key must replay its first answer, byte for byte.

ops = st.fixed_dictionaries({
    "op": st.sampled_from(
        ("top_up", "spend", "hold", "hold", "capture", "capture", "void", "reverse", "reverse")
    ),
    "user": st.sampled_from(USERS[:2]),
    "amount": st.one_of(st.none(), st.integers(min_value=1, max_value=120)),
    "final": st.booleans(),
    "pick": st.integers(min_value=0, max_value=50),  # which earlier transaction or hold (or none)
})  # fmt: skip


class LifecycleMachine(RuleBasedStateMachine):
    db_url: ClassVar[str]
    concurrent_steps = 0

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.pool = self.loop.run_until_complete(_open_pool(self.db_url))
        self.ns = uuid.uuid4().hex[:8]
        self.model = Lifecycle()
        self.sent: list[tuple[str, str, str]] = []  # (sql, payload, first body) of accepted commands

    def teardown(self) -> None:
        self.loop.run_until_complete(self.pool.close())
        self.loop.close()

    @initialize()
    def open_and_fund(self) -> None:
        for user in USERS[:2]:
            user_id = f"{self.ns}-{user}"
            ctx = helper_ctx(f"{self.ns}-open-{user}", "open")
            self.loop.run_until_complete(handle(EventStore(self.pool), OpenWallet(user_id=user_id), ctx))
            self.model.wallets[user_id] = Wallet()
            self.run_concurrently([{"op": "top_up", "user": user, "amount": 300, "final": True, "pick": 0}])

    def _resolve(self, spec: dict[str, Any]) -> dict[str, Any]:
        """The operation with its user, and the earlier transaction or hold it names (or a new id)."""
        op = {
            "op": spec["op"],
            "user_id": f"{self.ns}-{spec['user']}",
            "asset": "GOLD",
            "final": spec["final"],
        }
        op["amount"] = (
            spec["amount"] if spec["amount"] is not None or spec["op"] in ("capture", "reverse") else 50
        )
        known = sorted(self.model.transactions if spec["op"] == "reverse" else self.model.holds)
        chosen = known[spec["pick"] % len(known)] if known and spec["pick"] < 48 else str(uuid.uuid4())
        op["target" if spec["op"] == "reverse" else "hold_id"] = chosen
        return op

    @rule(specs=st.lists(ops, min_size=2, max_size=3))
    def run_concurrently(self, specs: list[dict[str, Any]]) -> None:
        resolved = [self._resolve(spec) for spec in specs]
        calls = [_lifecycle_call(op) for op in resolved]
        rows = self.loop.run_until_complete(self._send_at_once(calls))
        answers = [json.loads(row["body"]) for row in rows]
        for order in itertools.permutations(range(len(resolved))):
            trial = self.model.copy()
            predicted = {i: trial.decide(resolved[i], answers[i]) for i in order}
            if all(_agree([predicted[i]], [rows[i]]) for i in range(len(resolved))):
                self.model = trial
                break
        else:
            raise AssertionError(
                f"no serial order explains the answers: {resolved} -> {[dict(r) for r in rows]}"
            )
        for (sql, payload), row in zip(calls, rows, strict=True):
            if row["outcome"] == "accepted":
                self.sent.append((sql, payload, row["body"]))
        if sum(row["outcome"] == "accepted" for row in rows) > 1:
            LifecycleMachine.concurrent_steps += 1
        self.loop.run_until_complete(self._check_wallets())

    @rule(pick=st.integers(min_value=0, max_value=10**6))
    def send_again(self, pick: int) -> None:
        if not self.sent:
            return
        sql, payload, body = self.sent[pick % len(self.sent)]
        row = self.loop.run_until_complete(self._send_at_once([(sql, payload)]))[0]
        assert (row["outcome"], row["replayed"], row["body"]) == ("accepted", True, body)

    async def _send_at_once(self, calls: list[tuple[str, str]]) -> list[asyncpg.Record]:
        async with self.pool.acquire() as gate:
            await gate.execute(_CLOSE_GATE)
            gate_pid = await gate.fetchval("SELECT pg_backend_pid()")
            try:
                racing = [asyncio.create_task(self._send(sql, payload)) for sql, payload in calls]
                await lock_waits(
                    self.pool, lambda waits: sum(gate_pid in w["blockers"] for w in waits) == len(calls)
                )
            finally:
                await gate.execute(_OPEN_GATE)
        return await asyncio.gather(*racing)

    async def _send(self, sql: str, payload: str) -> asyncpg.Record:
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(_PASS_GATE)
            if sql == _POST_TRANSACTIONS:
                [row] = await conn.fetch(sql, payload, 60_000)
                return row
            row = await conn.fetchrow(sql, payload)
            assert row is not None
            return row

    async def _check_wallets(self) -> None:
        for row in await self.pool.fetch(_HELD, f"wallet:{self.ns}-%"):
            user_id = row["stream_id"].removeprefix("wallet:")
            wallet = self.model.wallets[user_id]
            balances = json.loads(row["state"])["balances"]
            assert (row["version"], balances) == (wallet.version, wallet.balances), user_id
            assert row["held"] == self.model.held(user_id, "GOLD"), user_id


_HELD = """
SELECT stream_id, version, state, tally_held(state, 'GOLD', now()) AS held
  FROM streams WHERE stream_type = 'wallet' AND stream_id LIKE $1
"""


def _lifecycle_call(op: dict[str, Any]) -> tuple[str, str]:
    """The SQL and the command record of one operation, under a fresh key."""
    command: Any
    if op["op"] in ("top_up", "spend"):
        command = FLOWS_BY_KIND[op["op"]].command(user_id=op["user_id"], asset="GOLD", amount=op["amount"])
        return _POST_TRANSACTIONS, msgspec.json.encode([CommandRecord.of(helper_ctx(), command)]).decode()
    if op["op"] == "hold":
        sql, command = _PLACE_HOLD, PlaceHold(user_id=op["user_id"], asset="GOLD", amount=op["amount"])
    elif op["op"] == "capture":
        sql, command = (
            _CAPTURE_HOLD,
            CaptureHold(hold_id=op["hold_id"], amount=op["amount"], final=op["final"]),
        )
    elif op["op"] == "void":
        sql, command = _VOID_HOLD, VoidHold(hold_id=op["hold_id"])
    else:
        sql, command = (
            _REVERSE_TRANSACTION,
            ReverseTransaction(transaction_id=op["target"], amount=op["amount"]),
        )
    return sql, msgspec.json.encode(CommandRecord.of(helper_ctx(), command)).decode()


def test_the_lifecycle_agrees_with_the_model_under_concurrent_commands(db_url: str) -> None:
    asyncio.run(_define_assets(db_url))
    machine = type("Machine", (LifecycleMachine,), {"db_url": db_url})
    LifecycleMachine.concurrent_steps = 0
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=40,
            stateful_step_count=10,
            deadline=None,
            suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
        ),
    )
    assert LifecycleMachine.concurrent_steps >= 10
