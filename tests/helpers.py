"""Small builders shared by the integration tests."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg

from commands import (
    Accepted,
    CommandContext,
    EventStore,
    handle_define_asset,
    handle_grant_bonus,
    handle_open_wallet,
    handle_spend_credits,
    handle_top_up_credits,
)
from domain import DefineAsset, GrantBonus, OpenWallet, SpendCredits, TopUpCredits
from projections.projector import catch_up


def ctx(key: str | None = None, request: str = "") -> CommandContext:
    key = key or uuid.uuid4().hex
    return CommandContext(command_id=key, fingerprint=CommandContext.fingerprint_of(request or key))


async def define_asset(store: EventStore, code: str = "GOLD") -> Accepted:
    return await handle_define_asset(store, DefineAsset(code=code, name=code.title(), decimals=0), ctx())


async def open_wallet(store: EventStore, user_id: str) -> Accepted:
    return await handle_open_wallet(store, OpenWallet(user_id=user_id), ctx())


async def top_up(store: EventStore, user_id: str, amount: int, asset: str = "GOLD") -> Accepted:
    return await handle_top_up_credits(
        store, TopUpCredits(user_id=user_id, asset=asset, amount=amount), ctx()
    )


async def bonus(store: EventStore, user_id: str, amount: int, asset: str = "GOLD") -> Accepted:
    return await handle_grant_bonus(store, GrantBonus(user_id=user_id, asset=asset, amount=amount), ctx())


async def spend(
    store: EventStore, user_id: str, amount: int, asset: str = "GOLD", key: str | None = None
) -> Accepted:
    command = SpendCredits(user_id=user_id, asset=asset, amount=amount)
    return await handle_spend_credits(store, command, ctx(key, request=f"spend {user_id} {amount} {asset}"))


async def stream_balance(pool: asyncpg.Pool, user_id: str, asset: str = "GOLD") -> int:
    """The write side's snapshot of a wallet balance."""
    value = await pool.fetchval(
        "SELECT coalesce((state -> 'balances' ->> $2)::numeric, 0) FROM streams WHERE stream_id = $1",
        f"wallet:{user_id}", asset,
    )  # fmt: skip
    return int(value)


async def event_balance(pool: asyncpg.Pool, user_id: str, asset: str = "GOLD") -> int:
    """The balance replayed from the events alone."""
    value = await pool.fetchval(
        """SELECT coalesce(sum((leg ->> 'amount')::numeric), 0)
             FROM events, jsonb_array_elements(data -> 'entries') leg
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
