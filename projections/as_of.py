"""Balances at a past moment, computed from the events alone (period-end reports).

A moment is a time or a global position. "As of time T" counts the events recorded at or before T
(``recorded_at`` is taken under the wallet's lock, and never runs backwards within a stream); "as of
position P" counts the events at positions up to P. Every transaction is one event, so either cut is
balanced: each asset still sums to zero.

The whole ledger's balances are the legs of the transaction events (tally_event_kind) in the cut,
read from every event. One wallet's are the ``balance_after`` its events state, found by index, so
they cost time logarithmic in its history (projections/sql/tally_wallet_as_of.sql); ``tally verify``
proves every stated balance equals the replayed one. A wallet's ``held`` is what its holds reserved
at the cut (placed, not ended, not expired by then), and ``available`` the rest. A wallet's version
counts every one of its events, whatever its type. An event of a type this release has no rule for
(tally_event_kind) is not guessed at: the answer counts them as ``uncounted_events``, so a reader
knows the balances may not be the whole story."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from domain import MAX_BIGINT, WalletNotFound
from projections.read_models import Balance
from projections.reader import Reader

_CUT = """(($1::timestamptz IS NOT NULL AND e.recorded_at <= $1)
        OR ($2::bigint IS NOT NULL AND e.global_position <= $2))"""

_ALL_ACCOUNTS = f"""
SELECT l.account, e.data ->> 'asset' AS asset, sum(l.amount)::text AS balance
  FROM events e LEFT JOIN flows f ON f.event_type = e.event_type, tally_event_legs(e.data) l
 WHERE {_CUT} AND tally_event_kind(e.event_type, f.kind IS NOT NULL) = 'transaction'
 GROUP BY 1, 2
 ORDER BY 2, 1
"""
# What the holds of every wallet reserved at the cut, per user account and asset: for each wallet
# with a hold open at the cut (placed, and its newest event in the cut leaves some of it), the
# held amounts tally_wallet_as_of states, so the whole ledger's cut judges expiry exactly as one
# wallet's does.
_HELD = f"""
WITH open_holds AS (
    SELECT DISTINCT x.stream_id FROM (
        SELECT DISTINCT ON (e.data ->> 'hold_id') e.stream_id,
               CASE e.event_type WHEN 'HoldPlaced' THEN (e.data ->> 'amount')::bigint
                                 WHEN 'HoldCaptured' THEN (e.data ->> 'hold_remaining')::bigint
                                 ELSE 0 END AS remaining
          FROM events e
         WHERE {_CUT} AND e.event_type IN ('HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired')
         ORDER BY e.data ->> 'hold_id', e.stream_version DESC) x
     WHERE x.remaining > 0)
SELECT 'user:' || substr(o.stream_id, 8) AS account, h.key AS asset, h.value::text AS held
  FROM open_holds o, tally_wallet_as_of(substr(o.stream_id, 8), $1, $2) w, jsonb_each(w.held) h
"""
_UNCOUNTED = f"""
SELECT count(*) FROM events e LEFT JOIN flows f ON f.event_type = e.event_type
 WHERE {_CUT} AND tally_event_kind(e.event_type, f.kind IS NOT NULL) IS NULL
"""
_WALLET = """
SELECT version, balances::text AS balances, held::text AS held, uncounted FROM tally_wallet_as_of($3, $1, $2)
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
        if at.tzinfo is None:
            return cls(at=at.replace(tzinfo=UTC))
        try:
            return cls(at=at.astimezone(UTC))
        except OverflowError:  # 0001-01-01T00:00+14:00 is in year 0 in UTC; 9999-12-31T23:00-14:00, 10000
            return cls(
                at=datetime.min.replace(tzinfo=UTC) if at.year == 1 else datetime.max.replace(tzinfo=UTC)
            )

    def describe(self) -> str:
        if self.position is not None or self.at is None:
            return f"position {self.position}"
        # Not strftime: it writes year 1 as "1", not "0001".
        return self.at.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


class AccountBalance(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A user account also states what its holds reserved then (``held``) and the rest
    (``available``); a system account has no holds."""

    account: str
    asset: str
    balance: int
    held: int | None = None
    available: int | None = None


class WalletAsOf(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    user_id: str
    as_of: str
    version: int
    balances: list[Balance]
    uncounted_events: int = 0  # shown only when the cut holds events of a type with no rule


async def balances_as_of(conn: Reader, moment: Moment) -> list[AccountBalance]:
    rows = await conn.fetch(_ALL_ACCOUNTS, moment.at, moment.position)
    held = {
        (r["account"], r["asset"]): int(r["held"])
        for r in await conn.fetch(_HELD, moment.at, moment.position)
    }
    balances = []
    for r in rows:
        balance = int(r["balance"])
        if r["account"].startswith("user:"):
            reserved = held.get((r["account"], r["asset"]), 0)
            balances.append(AccountBalance(account=r["account"], asset=r["asset"], balance=balance,
                                           held=reserved,
                                           available=balance - reserved))  # fmt: skip
        else:
            balances.append(AccountBalance(account=r["account"], asset=r["asset"], balance=balance))
    return balances


async def uncounted_as_of(conn: Reader, moment: Moment) -> int:
    """How many events up to ``moment`` are of a type with no rule, left out of the balances."""
    count: int = await conn.fetchval(_UNCOUNTED, moment.at, moment.position)
    return count


async def wallet_as_of(pool: Reader, user_id: str, moment: Moment) -> WalletAsOf:
    """One wallet's balances and version at ``moment``; WalletNotFound if it did not exist yet."""
    row = await pool.fetchrow(_WALLET, moment.at, moment.position, user_id)
    if row is None or row["version"] == 0:
        raise WalletNotFound(f"no wallet for user {user_id} as of {moment.describe()}")
    by_asset = msgspec.json.decode(row["balances"], type=dict[str, int])
    held = msgspec.json.decode(row["held"], type=dict[str, int])
    return WalletAsOf(
        user_id=user_id,
        as_of=moment.describe(),
        version=row["version"],
        balances=[
            Balance(asset=a, balance=b, held=held.get(a, 0), available=b - held.get(a, 0))
            for a, b in sorted(by_asset.items())
        ],
        uncounted_events=row["uncounted"],
    )
