"""Queries over the read models. They read what the projections have applied so far; a caller that
must see its own write first waits on the projections the query reads (api.controllers._wait)."""

from __future__ import annotations

import uuid

import asyncpg
import msgspec

from domain import MAX_BIGINT, HoldNotFound, TransactionNotFound, WalletNotFound
from projections.read_models import (
    Asset,
    AssetList,
    Balance,
    Entry,
    Hold,
    HoldPage,
    SystemBalance,
    SystemBalances,
    Transaction,
    TransactionPage,
    Wallet,
)
from projections.reader import Reader


class WalletIncomplete(Exception):
    """The projection has applied this wallet's version N but not yet all of its events up to N
    (events of one wallet can be applied out of version order, projections/sql/tally_next_events.sql):
    answering now would show a state that never existed. It is complete again after the
    projection's next batch."""


_ASSETS = "SELECT code, name, decimals, created_at FROM rm_assets ORDER BY code"
# Held: the active holds not yet expired by the database's clock (a hold stops holding at its
# expires_at, whether or not its HoldExpired is applied yet), from the same projection as the balances.
_WALLET = """
SELECT w.version, w.events_applied, w.metadata::text AS metadata, w.created_at,
       coalesce(array_agg(b.asset ORDER BY b.asset) FILTER (WHERE b.asset IS NOT NULL), '{}') AS assets,
       coalesce(array_agg(b.balance::text ORDER BY b.asset) FILTER (WHERE b.asset IS NOT NULL), '{}')
           AS balances,
       coalesce(array_agg(h.held::text ORDER BY b.asset) FILTER (WHERE b.asset IS NOT NULL), '{}') AS held
  FROM rm_wallets w
  LEFT JOIN rm_balances b ON b.user_id = w.user_id
  LEFT JOIN LATERAL (
        SELECT coalesce(sum(r.amount - r.captured), 0) AS held FROM rm_holds r
         WHERE r.user_id = w.user_id AND r.asset = b.asset AND r.status = 'active' AND r.expires_at > now()) h
    ON true
 WHERE w.user_id = $1 AND w.created_at IS NOT NULL
 GROUP BY w.user_id
"""
_TRANSACTION_COLUMNS = """
transaction_id::text AS transaction_id, kind, user_id, asset, amount, entries::text AS entries,
reference, metadata::text AS metadata, balance_after::text AS balance_after, wallet_version,
created_at, consistency_token, created_by, reverses::text AS reverses, reason, hold_id::text AS hold_id
"""
# One statement, so the wallet's head (rm_history_wallets) and its page are read in one snapshot: a
# page is served only when the history projection has applied every event of the wallet up to the
# greatest version it applied (events_applied = version), whatever kinds those events are.
_HISTORY = f"""
SELECT h.opened, h.events_applied = h.version AS complete, t.*
  FROM rm_history_wallets h
  LEFT JOIN LATERAL (
        SELECT {_TRANSACTION_COLUMNS}
          FROM rm_transactions
         WHERE user_id = $1 AND ($2::text IS NULL OR asset = $2) AND wallet_version < $3
         ORDER BY wallet_version DESC
         LIMIT $4) t ON true
 WHERE h.user_id = $1
"""
# One transaction and, unless it is a reversal, its reversals (rm_transactions_reversals): both from
# the history projection, in one snapshot.
_TRANSACTION = f"""
SELECT {_TRANSACTION_COLUMNS},
       (SELECT coalesce(array_agg(r.transaction_id::text ORDER BY r.wallet_version), '{{}}')
          FROM rm_transactions r WHERE r.reverses = t.transaction_id) AS reversals,
       (SELECT coalesce(sum(r.amount), 0) FROM rm_transactions r WHERE r.reverses = t.transaction_id)::text
           AS reversed_amount
  FROM rm_transactions t WHERE transaction_id = $1
"""
# A hold as it stands: one still active in the read model but past its expiry is expired.
_HOLD_COLUMNS = """
h.hold_id::text AS hold_id, h.user_id, h.asset, h.amount, h.captured,
CASE WHEN h.status = 'active' AND h.expires_at <= now() THEN 'expired' ELSE h.status END AS status,
CASE WHEN h.status = 'active' AND h.expires_at > now() THEN h.amount - h.captured ELSE 0 END AS remaining,
h.expires_at, h.reference, h.metadata::text AS metadata, h.created_at, h.consistency_token, h.wallet_version
"""
_HOLD = f"""
SELECT w.events_applied = w.version AS complete, {_HOLD_COLUMNS}
  FROM rm_holds h JOIN rm_wallets w ON w.user_id = h.user_id
 WHERE h.hold_id = $1
"""
_HOLDS = f"""
SELECT w.events_applied = w.version AS complete, w.created_at IS NOT NULL AS opened, x.*
  FROM rm_wallets w
  LEFT JOIN LATERAL (
        SELECT {_HOLD_COLUMNS}
          FROM rm_holds h
         WHERE h.user_id = $1 AND ($2::text IS NULL OR h.asset = $2) AND h.wallet_version < $3
           AND (CASE WHEN h.status = 'active' AND h.expires_at <= now() THEN 'expired' ELSE h.status END = $4
                OR $4 IS NULL)
         ORDER BY h.wallet_version DESC
         LIMIT $5) x ON true
 WHERE w.user_id = $1
"""
_SYSTEM_BALANCES = """
SELECT asset,
       coalesce(sum(balance) FILTER (WHERE account = 'treasury'), 0)::text AS treasury,
       coalesce(sum(balance) FILTER (WHERE account = 'bonus'), 0)::text AS bonus,
       coalesce(sum(balance) FILTER (WHERE account = 'revenue'), 0)::text AS revenue,
       coalesce(sum(balance) FILTER (WHERE account = 'users'), 0)::text AS users
  FROM rm_system_balances
 GROUP BY asset
 ORDER BY asset
"""

_ENTRIES = msgspec.json.Decoder(list[Entry])
_METADATA = msgspec.json.Decoder(dict[str, str])
_NO_CURSOR = 2**62


async def list_assets(pool: Reader) -> AssetList:
    rows = await pool.fetch(_ASSETS)
    return AssetList(items=[Asset(**dict(r)) for r in rows])


async def get_wallet(pool: Reader, user_id: str) -> Wallet:
    row = await pool.fetchrow(_WALLET, user_id)
    if row is None:
        raise WalletNotFound(f"no wallet for user {user_id}")
    if row["events_applied"] < row["version"]:
        raise WalletIncomplete(user_id)
    return Wallet(
        user_id=user_id,
        version=row["version"],
        balances=[
            Balance(asset=a, balance=int(b), held=int(h), available=int(b) - int(h))
            for a, b, h in zip(row["assets"], row["balances"], row["held"], strict=True)
        ],
        metadata=_METADATA.decode(row["metadata"] or "{}"),
        created_at=row["created_at"],
    )


def encode_cursor(wallet_version: int) -> str:
    return f"v{wallet_version}"


def decode_cursor(cursor: str | None) -> int:
    """The wallet version to page below; ValueError for a cursor this API did not issue."""
    if cursor is None:
        return _NO_CURSOR
    if not (cursor.startswith("v") and cursor[1:].isascii() and cursor[1:].isdigit() and len(cursor) <= 20):
        raise ValueError(f"{cursor!r} is not a cursor returned by this API")
    version = int(cursor[1:])
    if version > MAX_BIGINT:
        raise ValueError(f"{cursor!r} is not a cursor returned by this API")
    return version


def _transaction(row: asyncpg.Record, *, with_reversals: bool = False) -> Transaction:
    reversals = with_reversals and row["reverses"] is None
    return Transaction(
        transaction_id=row["transaction_id"],
        kind=row["kind"],
        user_id=row["user_id"],
        asset=row["asset"],
        amount=row["amount"],
        entries=_ENTRIES.decode(row["entries"]),
        reference=row["reference"],
        metadata=_METADATA.decode(row["metadata"]),
        balance_after=int(row["balance_after"]),
        wallet_version=row["wallet_version"],
        created_at=row["created_at"],
        consistency_token=row["consistency_token"],
        created_by=row["created_by"],
        reverses=row["reverses"],
        reason=row["reason"],
        hold_id=row["hold_id"],
        reversed_amount=int(row["reversed_amount"]) if reversals else None,
        reversals=list(row["reversals"]) if reversals else None,
    )


async def wallet_history(
    pool: Reader, user_id: str, *, asset: str | None, limit: int, cursor: str | None
) -> TransactionPage:
    """Newest first, keyset-paged on the wallet version (stable under concurrent appends)."""
    rows = await pool.fetch(_HISTORY, user_id, asset, decode_cursor(cursor), limit + 1)
    if rows and not rows[0]["complete"]:  # (its opening may be the event still missing)
        raise WalletIncomplete(user_id)
    if not rows or not rows[0]["opened"]:
        raise WalletNotFound(f"no wallet for user {user_id}")
    if rows[0]["transaction_id"] is None:  # the wallet has no transactions (on this page)
        rows = []
    items = [_transaction(r) for r in rows[:limit]]
    next_cursor = encode_cursor(items[-1].wallet_version) if len(rows) > limit else None
    return TransactionPage(items=items, next_cursor=next_cursor)


async def get_transaction(pool: Reader, transaction_id: str) -> Transaction:
    try:
        key = uuid.UUID(transaction_id)
    except ValueError:
        raise TransactionNotFound(f"no transaction {transaction_id}") from None
    row = await pool.fetchrow(_TRANSACTION, key)
    if row is None:
        raise TransactionNotFound(f"no transaction {transaction_id}")
    return _transaction(row, with_reversals=True)


def _hold(row: asyncpg.Record) -> Hold:
    return Hold(
        hold_id=row["hold_id"],
        user_id=row["user_id"],
        asset=row["asset"],
        amount=row["amount"],
        captured=row["captured"],
        remaining=row["remaining"],
        status=row["status"],
        expires_at=row["expires_at"],
        reference=row["reference"],
        metadata=_METADATA.decode(row["metadata"] or "{}"),
        created_at=row["created_at"],
        consistency_token=row["consistency_token"],
    )


async def get_hold(pool: Reader, hold_id: str) -> Hold:
    try:
        key = uuid.UUID(hold_id)
    except ValueError:
        raise HoldNotFound(f"no hold {hold_id}") from None
    row = await pool.fetchrow(_HOLD, key)
    if row is None:
        raise HoldNotFound(f"no hold {hold_id}")
    if not row["complete"]:
        raise WalletIncomplete(row["user_id"])
    return _hold(row)


async def wallet_holds(
    pool: Reader, user_id: str, *, status: str | None, asset: str | None, limit: int, cursor: str | None
) -> HoldPage:
    """Newest first, keyset-paged on the wallet version of each hold's HoldPlaced."""
    rows = await pool.fetch(_HOLDS, user_id, asset, decode_cursor(cursor), status, limit + 1)
    if not rows or not rows[0]["opened"]:
        raise WalletNotFound(f"no wallet for user {user_id}")
    if not rows[0]["complete"]:
        raise WalletIncomplete(user_id)
    if rows[0]["hold_id"] is None:
        rows = []
    items = [_hold(r) for r in rows[:limit]]
    next_cursor = encode_cursor(rows[limit - 1]["wallet_version"]) if len(rows) > limit else None
    return HoldPage(items=items, next_cursor=next_cursor)


async def system_balances(pool: Reader) -> SystemBalances:
    """Per asset, the system accounts and the users' total, and their sum (zero unless broken)."""
    balances = []
    for r in await pool.fetch(_SYSTEM_BALANCES):
        parts = {k: int(r[k]) for k in ("treasury", "bonus", "revenue", "users")}
        balances.append(SystemBalance(asset=r["asset"], sum=sum(parts.values()), **parts))
    return SystemBalances(balances=balances)
