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
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from commands import CommandContext, CommandRecord, EventStore, handle
from domain import FLOWS, FLOWS_BY_KIND, OpenWallet
from tests.helpers import TEST_CLIENT_ID, define_asset, lock_waits, run_batch
from tests.helpers import ctx as helper_ctx
from tests.model import Command, Ledger, Outcome

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

# The gate: a two-key advisory lock only this test takes (Tally's own are one-key locks).
_CLOSE_GATE = "SELECT pg_advisory_lock(31250, 1)"
_OPEN_GATE = "SELECT pg_advisory_unlock(31250, 1)"
_PASS_GATE = "SELECT pg_advisory_xact_lock_shared(31250, 1)"
_STATE = "SELECT stream_id, version, state FROM streams WHERE stream_type = 'wallet' AND stream_id LIKE $1"
_WRITERS = "SELECT count(DISTINCT writer_xid) FROM events WHERE event_id = ANY($1::uuid[])"


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
