"""Small builders shared by the integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import AsyncIterator, Callable

import asyncpg
import msgspec
from litestar import Litestar
from litestar.testing import AsyncTestClient

from api.auth import secret_hash, secret_id_of
from commands import Accepted, CommandContext, CommandRecord, EventStore, handle
from commands.event_store import _POST_TRANSACTIONS
from domain import DefineAsset, GrantBonus, OpenWallet, SpendCredits, TopUpCredits, TransactionCommand
from projections.positions import Position
from projections.projector import catch_up, project_batch

# The application's least-privileged database role, made by `tally migrate` in the template.
APP_ROLE = "tally_test_app"

# The client every test database holds (conftest adds it to the template): every scope, and a
# fixed secret, which the HTTP test clients send.
TEST_CLIENT_ID = "7e570000-0000-4000-8000-000000000001"
TEST_CLIENT = "test-admin"
TEST_SECRET = "tally_sk_7e577e577e577e57_" + "T" * 43
AUTH = {"Authorization": f"Bearer {TEST_SECRET}"}


async def add_test_client(conn: asyncpg.Connection) -> None:
    await conn.execute(
        "INSERT INTO clients (client_id, name, scopes) VALUES ($1, $2, '{admin}')",
        uuid.UUID(TEST_CLIENT_ID), TEST_CLIENT,
    )  # fmt: skip
    await conn.execute(
        "INSERT INTO client_secrets (secret_id, client_id, secret_hash) VALUES ($1, $2, $3)",
        secret_id_of(TEST_SECRET), uuid.UUID(TEST_CLIENT_ID), secret_hash(TEST_SECRET),
    )  # fmt: skip


@contextlib.asynccontextmanager
async def api_client(app: Litestar) -> AsyncIterator[AsyncTestClient]:  # type: ignore[type-arg]
    """The app over HTTP, as the test client (every scope)."""
    async with AsyncTestClient(app) as client:
        client.headers.update(AUTH)
        yield client


def ctx(key: str | None = None, request: str = "", client_id: str = TEST_CLIENT_ID) -> CommandContext:
    """The context of a command sent by the test client (or ``client_id``) under ``key``."""
    key = key or uuid.uuid4().hex
    return CommandContext(
        command_id=key,
        client_id=client_id,
        created_by=TEST_CLIENT if client_id == TEST_CLIENT_ID else client_id,
        fingerprint=CommandContext.fingerprint_of(request or key),
    )


def record(command: TransactionCommand, key: str | None = None, request: str = "") -> CommandRecord:
    """``command`` as the batch function reads it, under ``key`` (fresh unless given)."""
    return CommandRecord.of(ctx(key, request), command)


async def run_batch(
    conn: asyncpg.Connection | asyncpg.Pool, *records: CommandRecord, lock_wait_ms: int | None = 60_000
) -> list[asyncpg.Record]:
    """One call of tally_post_transactions, on this connection (in its transaction, if one is open):
    (idx, outcome, body, replayed) per command, in order. By default the batch waits for its wallets
    (as the API's retry of a held wallet does), so races on a wallet's lock can be staged; with
    ``lock_wait_ms=None`` it is a group batch, which never waits for a wallet (``wallet_locked``)."""
    payload = msgspec.json.encode(list(records)).decode()
    return list(await conn.fetch(_POST_TRANSACTIONS, payload, lock_wait_ms))


async def define_asset(store: EventStore, code: str = "GOLD") -> Accepted:
    return await handle(store, DefineAsset(code=code, name=code.title(), decimals=0), ctx())


async def open_wallet(store: EventStore, user_id: str) -> Accepted:
    return await handle(store, OpenWallet(user_id=user_id), ctx())


async def top_up(store: EventStore, user_id: str, amount: int, asset: str = "GOLD") -> Accepted:
    return await handle(store, TopUpCredits(user_id=user_id, asset=asset, amount=amount), ctx())


async def bonus(store: EventStore, user_id: str, amount: int, asset: str = "GOLD") -> Accepted:
    return await handle(store, GrantBonus(user_id=user_id, asset=asset, amount=amount), ctx())


async def spend(
    store: EventStore, user_id: str, amount: int, asset: str = "GOLD", key: str | None = None
) -> Accepted:
    command = SpendCredits(user_id=user_id, asset=asset, amount=amount)
    return await handle(store, command, ctx(key, request=f"spend {user_id} {amount} {asset}"))


async def stream_balance(pool: asyncpg.Pool, user_id: str, asset: str = "GOLD") -> int:
    """The write side's snapshot of a wallet balance."""
    value = await pool.fetchval(
        "SELECT coalesce((state -> 'balances' ->> $2)::numeric, 0) FROM streams WHERE stream_id = $1",
        f"wallet:{user_id}", asset,
    )  # fmt: skip
    return int(value)


async def event_balance(pool: asyncpg.Pool, user_id: str, asset: str = "GOLD") -> int:
    """The balance replayed from the events alone: the legs of its transaction events."""
    value = await pool.fetchval(
        """SELECT coalesce(sum((leg ->> 'amount')::numeric), 0)
             FROM events e JOIN flows f ON f.event_type = e.event_type,
                  jsonb_array_elements(data -> 'entries') leg
            WHERE data ->> 'asset' = $2 AND leg ->> 'account' = 'user:' || $1""",
        user_id, asset,
    )  # fmt: skip
    return int(value)


async def projected(pool: asyncpg.Pool, within: float = 30.0) -> None:
    """Run every projection until it has applied every event committed before this call.

    One catch-up round is not enough: a transaction still open anywhere in the cluster (another
    test database on the same server, say) holds back the xmin the projections may read up to.
    """
    total = await pool.fetchval("SELECT count(*) FROM events")
    deadline = asyncio.get_running_loop().time() + within
    while True:
        await catch_up(pool, batch_size=500)
        applied = await pool.fetchval(
            "SELECT min(events_applied) FROM projection_checkpoints WHERE error IS NULL"
        )
        if applied >= total:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"projections applied {applied} of {total} events within {within} s")
        await asyncio.sleep(0.02)


async def apply_projection(pool: asyncpg.Pool, name: str, until: Position, within: float = 30.0) -> None:
    """Run projection ``name`` alone until its checkpoint has reached ``until`` (a consistency token)."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        _, checkpoint = await project_batch(pool, name, 500)
        if checkpoint >= until:
            return
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"projection {name} reached {checkpoint.token()}, not {until.token()}")
        await asyncio.sleep(0.02)


_LOCK_WAITS = """
SELECT pid, wait_event, pg_blocking_pids(pid) AS blockers, application_name
  FROM pg_stat_activity
 WHERE datname = current_database() AND wait_event_type = 'Lock'
"""


async def lock_waits(
    probe: asyncpg.Pool, enough: Callable[[list[asyncpg.Record]], bool], within: float = 30.0
) -> list[asyncpg.Record]:
    """Poll the sessions of this database that wait for a lock until ``enough`` says they are the
    ones expected (this is how a race test shows its race: the contenders, each in its own
    transaction, were all waiting at once). A bound on waiting, not a timing assertion."""
    deadline = asyncio.get_running_loop().time() + within
    while True:
        waits = list(await probe.fetch(_LOCK_WAITS))
        if enough(waits):
            return waits
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"the expected lock waits did not happen within {within} s: {waits}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def holding_wallet(pool: asyncpg.Pool, user_id: str) -> AsyncIterator[int]:
    """Hold the wallet's row lock (what every command on it takes) in a transaction of its own, as
    an operator's `SELECT … FOR UPDATE` would, until the block ends; yields that session's pid."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT 1 FROM streams WHERE stream_id = $1 FOR UPDATE", f"wallet:{user_id}")
        yield await conn.fetchval("SELECT pg_backend_pid()")


def free_port() -> int:
    """A loopback port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def top_up_in(conn: asyncpg.Connection, user_id: str, amount: int) -> None:
    """A GOLD top-up by tally_post_transactions on this connection (in its transaction, if open)."""
    [row] = await run_batch(conn, record(TopUpCredits(user_id=user_id, asset="GOLD", amount=amount)))
    assert row["outcome"] == "accepted"


async def begin_top_up(
    conn: asyncpg.Connection, user_id: str, amount: int
) -> asyncpg.transaction.Transaction:
    """A transaction begun on ``conn`` that has written a top-up and is left open: the caller
    commits it when the race it stages needs."""
    tx = conn.transaction()
    await tx.start()
    await top_up_in(conn, user_id, amount)
    return tx
