"""Balances at a past moment, computed from the events alone (period-end reports).

A moment is a time or a global position. "As of time T" counts the events recorded at or before T
(``recorded_at`` is the writing transaction's timestamp); "as of position P" counts the events at
positions up to P. Balances are the legs of the transaction events (those whose type is a flow's);
a wallet's version counts every one of its events, whatever its type. Every transaction is one
event, so either cut is balanced: each asset still sums to zero. An event of a type this release
has no rule for (tally_event_kind) is not guessed at: the answer counts them as
``uncounted_events``, so a reader knows the balances may not be the whole story.
"""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
import msgspec

from domain import MAX_BIGINT, WalletNotFound
from projections.read_models import Balance

_CUT = """(($1::timestamptz IS NOT NULL AND e.recorded_at <= $1)
        OR ($2::bigint IS NOT NULL AND e.global_position <= $2))"""

_ALL_ACCOUNTS = f"""
SELECT l.account, e.data ->> 'asset' AS asset, sum(l.amount)::text AS balance
  FROM events e JOIN flows f ON f.event_type = e.event_type, tally_event_legs(e.data) l
 WHERE {_CUT}
 GROUP BY 1, 2
 ORDER BY 2, 1
"""
_UNCOUNTED = f"""
SELECT count(*) FROM events e LEFT JOIN flows f ON f.event_type = e.event_type
 WHERE {_CUT} AND tally_event_kind(e.event_type, f.kind IS NOT NULL) IS NULL
"""
_WALLET = f"""
WITH cut AS (SELECT e.* FROM events e WHERE e.stream_id = 'wallet:' || $3 AND {_CUT}),
     legs AS (SELECT c.data ->> 'asset' AS asset, sum(l.amount) AS balance
                FROM cut c JOIN flows f ON f.event_type = c.event_type, tally_event_legs(c.data) l
               WHERE l.account = 'user:' || $3
               GROUP BY 1)
SELECT (SELECT max(stream_version) FROM cut) AS version,
       coalesce((SELECT jsonb_object_agg(asset, balance) FROM legs), '{{}}')::text AS balances,
       (SELECT count(*) FROM cut c LEFT JOIN flows f ON f.event_type = c.event_type
         WHERE tally_event_kind(c.event_type, f.kind IS NOT NULL) IS NULL) AS uncounted
"""


class Moment(msgspec.Struct, frozen=True):
    """A time (timezone-aware; a naive one is taken as UTC) or a global position."""

    at: datetime | None = None
    position: int | None = None

    @classmethod
    def parse(cls, text: str) -> Moment:
        text = text.strip()
        if text.isascii() and text.isdigit():
            if int(text) > MAX_BIGINT:
                raise ValueError(f"{text} is beyond any global position")
            return cls(position=int(text))
        try:
            at = datetime.fromisoformat(text)
        except ValueError:
            raise ValueError(f"{text!r} is neither an ISO 8601 time nor a global position") from None
        return cls(at=at if at.tzinfo else at.replace(tzinfo=UTC))

    def describe(self) -> str:
        return (
            f"position {self.position}" if self.position is not None else f"{self.at:%Y-%m-%dT%H:%M:%S.%fZ}"
        )


class AccountBalance(msgspec.Struct, frozen=True, kw_only=True):
    account: str
    asset: str
    balance: int


class WalletAsOf(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    user_id: str
    as_of: str
    version: int
    balances: list[Balance]
    uncounted_events: int = 0  # shown only when the cut holds events of a type with no rule


async def balances_as_of(conn: asyncpg.Connection | asyncpg.Pool, moment: Moment) -> list[AccountBalance]:
    rows = await conn.fetch(_ALL_ACCOUNTS, moment.at, moment.position)
    return [AccountBalance(account=r["account"], asset=r["asset"], balance=int(r["balance"])) for r in rows]


async def uncounted_as_of(conn: asyncpg.Connection | asyncpg.Pool, moment: Moment) -> int:
    """How many events up to ``moment`` are of a type with no rule, left out of the balances."""
    count: int = await conn.fetchval(_UNCOUNTED, moment.at, moment.position)
    return count


async def wallet_as_of(pool: asyncpg.Pool, user_id: str, moment: Moment) -> WalletAsOf:
    """One wallet's balances and version at ``moment``; WalletNotFound if it did not exist yet."""
    row = await pool.fetchrow(_WALLET, moment.at, moment.position, user_id)
    if row is None or row["version"] is None:
        raise WalletNotFound(f"no wallet for user {user_id} as of {moment.describe()}")
    by_asset = msgspec.json.decode(row["balances"], type=dict[str, int])
    return WalletAsOf(
        user_id=user_id,
        as_of=moment.describe(),
        version=row["version"],
        balances=[Balance(asset=a, balance=b) for a, b in sorted(by_asset.items())],
        uncounted_events=row["uncounted"],
    )
