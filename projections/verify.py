"""``tally verify``: prove from the events alone that every balance Tally serves is right.

All checks run in one read-only REPEATABLE READ transaction, so the events, the stream snapshots,
the read models and their checkpoints are compared at one instant, while the ledger keeps serving.
A read-only transaction takes no transaction id, so it does not hold back the xmin that the
projectors read up to: verifying never stalls them.

Each check is one set-based SQL query returning findings: which check, the stream, version and
global position concerned, and the expected and found values. The replay here is written
independently of the projection functions, so a bug in a projection shows up as a disagreement.
"""

from __future__ import annotations

import importlib.resources
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import asyncpg
import msgspec

from domain import ACCEPTED, MAX_AMOUNT, MAX_BIGINT, RECORDED_OUTCOMES
from domain.values import MAX_HOLD_SECONDS
from projections.anchor import Anchor, check_anchor

FINDINGS_PER_CHECK: Final = 1000


class Finding(msgspec.Struct, frozen=True, kw_only=True):
    check: str
    detail: str
    stream_id: str | None = None
    stream_version: int | None = None
    global_position: int | None = None
    expected: str | None = None
    found: str | None = None


class CheckResult(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    description: str
    findings: int
    truncated: bool
    seconds: float


class VerifyReport(msgspec.Struct, frozen=True, kw_only=True):
    ok: bool
    started_at: datetime
    seconds: float
    events: int
    streams: int
    commands: int
    checks: list[CheckResult]
    findings: list[Finding]


# The functions the hash-chain check computes with. They live in the database being verified, so
# someone who controls it could redefine them to hide an edit: each must be the shipped source.
CHAIN_FUNCTIONS: Final = ("tally_event_bytes", "tally_genesis_hash")
_BODIES = """
SELECT proname, prosrc FROM pg_proc
 WHERE proname = ANY($1) AND pronamespace = current_schema()::regnamespace
"""


def _shipped_body(name: str) -> str:
    source = importlib.resources.files("commands").joinpath("sql", f"{name}.sql").read_text(encoding="utf-8")
    return source.split("$$")[1]


async def _chain_functions(conn: asyncpg.Connection) -> list[Finding]:
    found = {r["proname"]: r["prosrc"] for r in await conn.fetch(_BODIES, list(CHAIN_FUNCTIONS))}
    return [
        Finding(check="chain_functions", detail=f"function {name} is not the shipped definition: the hash "
                "chains cannot be trusted", expected="commands/sql/" + name + ".sql",
                found="missing" if name not in found else "a different body")
        for name in CHAIN_FUNCTIONS
        if found.get(name) != _shipped_body(name)
    ]  # fmt: skip


# The migration that gave callers identities: events recorded before it name no client.
IDENTITIES: Final = "0007_clients.sql"

# The seven columns every check returns, in order.
_FINDING_FIELDS = ("check", "detail", "stream_id", "stream_version", "global_position", "expected", "found")

# Every check dispatches on the event type (projections/sql/tally_event_kind.sql): a transaction
# event is one whose type is a flow's (the flows table, written from domain/flows.py), a reversal
# (CreditsReversed) or a hold's capture (HoldCaptured, a spend); AssetDefined, WalletOpened and the
# hold events (HoldPlaced, HoldVoided, HoldExpired) are the other known types; anything else is named
# by `unknown_event_type` and is no transaction. `flow` is the flows row a transaction's legs must
# follow (a capture: the spend's; a reversal: none, its legs negate the original's).
_TRANSACTIONS = """(SELECT e.*, f AS flow FROM events e
                      LEFT JOIN flows f ON f.event_type = e.event_type
                                        OR (e.event_type = 'HoldCaptured' AND f.kind = 'spend')
                     WHERE tally_event_kind(e.event_type, f.kind IS NOT NULL) = 'transaction') e"""
# The transaction events of a projection's cut `e` (an _UP_TO), for the read-model checks.
_IS_TRANSACTION = """tally_event_kind(e.event_type,
                                      EXISTS (SELECT 1 FROM flows f WHERE f.event_type = e.event_type))
                     = 'transaction'"""
# The events that count towards a wallet's version in the read models: wallet, transaction, hold.
_COUNTED = """tally_event_kind(u.event_type, EXISTS (SELECT 1 FROM flows f WHERE f.event_type = u.event_type))
              IN ('wallet', 'transaction', 'hold')"""
HOLD_EVENTS: Final = ("HoldPlaced", "HoldCaptured", "HoldVoided", "HoldExpired")


def _whole(value: str) -> str:
    """SQL: the jsonb ``value`` as a bigint, or NULL when it is not a whole number a bigint holds, so
    that a check meets a tampered field as a finding, not as an error that stops verify. (Nested
    CASEs: SQL guarantees their order of evaluation, not that of AND.)"""
    number = f"({value} #>> '{{}}')::numeric"
    return (
        f"(CASE WHEN jsonb_typeof({value}) = 'number' THEN CASE WHEN {number} = trunc({number}) "
        f"AND abs({number}) <= {MAX_BIGINT} THEN {number}::bigint END END)"
    )


_AMOUNT = _whole("e.data -> 'amount'")
# What a reversal of `e`'s amount of transaction `o` must hold as legs: each of o's legs negated for
# that amount (commands/sql/tally_reversal_legs.sql), computed here apart and without a cast that
# tampered data could make fail: a malformed leg gives a NULL amount, so a finding.
_NEGATED_LEGS = f"""(SELECT jsonb_agg(jsonb_build_object('account', l.leg ->> 'account',
                                                   'amount', -sign({_whole("l.leg -> 'amount'")}) * {_AMOUNT})
                             ORDER BY l.i)
                      FROM jsonb_array_elements(CASE WHEN jsonb_typeof(o.data -> 'entries') = 'array'
                                                     THEN o.data -> 'entries' ELSE '[]' END)
                           WITH ORDINALITY AS l(leg, i))"""
# The legs of transaction event `e`, one row each: (account, amount), a malformed amount as NULL.
_ENTRIES = "CASE WHEN jsonb_typeof(e.data -> 'entries') = 'array' THEN e.data -> 'entries' ELSE '[]' END"
_LEGS = f"""LATERAL (SELECT leg ->> 'account' AS account, {_whole("leg -> 'amount'")} AS amount
                      FROM jsonb_array_elements({_ENTRIES}) AS leg) l"""

# The user's leg of every transaction event, with the running balance it leaves, per wallet and
# asset in version order: the replay that the balance checks compare against.
_USER_LEGS = f"""
SELECT e.stream_id, e.stream_version, e.global_position, e.data ->> 'asset' AS asset,
       {_whole("e.data -> 'balance_after'")} AS recorded_after, leg.delta,
       sum(leg.delta) OVER (PARTITION BY e.stream_id, e.data ->> 'asset' ORDER BY e.stream_version)
           AS balance
  FROM {_TRANSACTIONS}
 CROSS JOIN LATERAL (
       SELECT coalesce(sum(l.amount), 0)::numeric AS delta
         FROM {_LEGS}
        WHERE l.account = 'user:' || substr(e.stream_id, 8)) leg
"""
# The events a projection has applied: those up to its checkpoint, in its (writer_xid, position) order.
_UP_TO = """(SELECT e.* FROM projection_checkpoints cp, events e
             WHERE cp.name = '{name}'
               AND (e.writer_xid, e.global_position) <= (cp.last_xid, cp.last_position))"""
_OUTCOMES = ", ".join(f"'{code}'" for code in RECORDED_OUTCOMES)  # an SQL list of literals
_OUTCOME_NAMES = "/".join(RECORDED_OUTCOMES)
_LIMIT = f"LIMIT {FINDINGS_PER_CHECK + 1}"

CHECKS: Final[list[tuple[str, str, str]]] = [
    (
        "unknown_event_type",
        "every event is of a type the ledger knows, on its kind of stream",
        f"""SELECT 'unknown_event_type', 'no rule for an event of type ' || e.event_type || ' on this stream',
                   e.stream_id, e.stream_version, e.global_position,
                   'AssetDefined on asset:; WalletOpened, a transaction or a hold event on wallet:',
                   e.event_type
              FROM (SELECT e.*, tally_event_kind(e.event_type, f.kind IS NOT NULL) AS kind
                      FROM events e LEFT JOIN flows f ON f.event_type = e.event_type) e
             WHERE NOT ((e.kind = 'asset' AND e.stream_id LIKE 'asset:%')
                     OR (e.kind IN ('wallet', 'transaction', 'hold') AND e.stream_id LIKE 'wallet:%'))
                OR e.kind IS NULL
             ORDER BY e.global_position {_LIMIT}""",
    ),
    (
        "malformed_transaction",
        "every transaction names its asset and records its balance after and its legs (an account and "
        "a whole amount each) as its type says",
        f"""SELECT 'malformed_transaction',
                   'the fields of transaction ' || coalesce(e.data ->> 'transaction_id', '?')
                   || ' are not those of a ' || e.event_type, e.stream_id, e.stream_version,
                   e.global_position, 'asset, balance_after and entries', (e.data - 'metadata')::text
              FROM {_TRANSACTIONS}
             WHERE jsonb_typeof(e.data -> 'asset') IS DISTINCT FROM 'string'
                OR jsonb_typeof(e.data -> 'entries') IS DISTINCT FROM 'array'
                OR {_whole("e.data -> 'balance_after'")} IS NULL
                OR EXISTS (SELECT 1 FROM {_LEGS} WHERE l.account IS NULL OR l.amount IS NULL)
             ORDER BY e.global_position {_LIMIT}""",
    ),
    (
        "amount_out_of_range",
        f"every transaction moves a whole amount from 1 to {MAX_AMOUNT:,}",
        f"""SELECT 'amount_out_of_range', 'transaction ' || (e.data ->> 'transaction_id')
                   || ' moves an amount outside 1..{MAX_AMOUNT}', e.stream_id, e.stream_version,
                   e.global_position, '1..{MAX_AMOUNT}', coalesce(e.data ->> 'amount', 'none')
              FROM {_TRANSACTIONS}
             WHERE {_AMOUNT} IS NULL OR {_AMOUNT} NOT BETWEEN 1 AND {MAX_AMOUNT}
             ORDER BY e.global_position {_LIMIT}""",
    ),
    (
        "unbalanced_transaction",
        "every transaction's entries sum to zero",
        f"""SELECT 'unbalanced_transaction', 'entries of transaction ' || (e.data ->> 'transaction_id')
                   || ' do not sum to zero', e.stream_id, e.stream_version, e.global_position, '0',
                   sum(l.amount)::text
              FROM {_TRANSACTIONS}, {_LEGS}
             GROUP BY e.global_position, e.stream_id, e.stream_version, e.data
            HAVING sum(l.amount) <> 0
             ORDER BY e.global_position {_LIMIT}""",
    ),
    (
        "foreign_user_leg",
        "credits are closed-loop: a wallet's transactions move only its own user's account",
        f"""SELECT 'foreign_user_leg', 'transaction moves another user''s account ' || l.account,
                   e.stream_id, e.stream_version, e.global_position, 'user:' || substr(e.stream_id, 8),
                   l.account
              FROM {_TRANSACTIONS}, {_LEGS}
             WHERE l.account LIKE 'user:%' AND l.account <> 'user:' || substr(e.stream_id, 8)
             ORDER BY e.global_position {_LIMIT}""",
    ),
    (
        "legs_do_not_match_kind",
        "every transaction is of its event type's flow and has exactly that flow's legs: the user by "
        "the signed amount, the flow's system account by the opposite (a capture is a spend; reversals "
        "are checked by reversal_legs)",
        f"""SELECT 'legs_do_not_match_kind', 'this ' || e.event_type || ' is not a ' || (e.flow).kind
                   || ' with its flow''s legs', e.stream_id, e.stream_version, e.global_position,
                   jsonb_build_object('kind', (e.flow).kind, 'entries', x.legs)::text,
                   jsonb_build_object('kind', e.data -> 'kind', 'entries', e.data -> 'entries')::text
              FROM {_TRANSACTIONS},
                   LATERAL (SELECT tally_legs(e.flow, substr(e.stream_id, 8), {_AMOUNT}) AS legs) x
             WHERE e.event_type <> 'CreditsReversed'
               AND (e.data ->> 'kind' IS DISTINCT FROM (e.flow).kind
                    OR e.data -> 'entries' IS DISTINCT FROM x.legs)
             ORDER BY e.global_position {_LIMIT}""",
    ),
    (
        "reversal_legs",
        "every reversal reverses an earlier transaction of its own wallet and asset that is not itself a "
        "reversal, with that transaction's legs negated for its amount",
        f"""SELECT 'reversal_legs', 'reversal ' || (e.data ->> 'transaction_id') || ' of '
                   || coalesce(e.data ->> 'reverses', '?') || CASE
                       WHEN o.event_id IS NULL THEN ' names no earlier transaction of its wallet'
                       WHEN o.event_type = 'CreditsReversed' THEN ' reverses a reversal'
                       WHEN o.data ->> 'asset' IS DISTINCT FROM e.data ->> 'asset' THEN ' is of another asset'
                       ELSE ' does not negate its legs' END,
                   e.stream_id, e.stream_version, e.global_position,
                   jsonb_build_object('kind', 'reversal', 'entries', {_NEGATED_LEGS})::text,
                   jsonb_build_object('kind', e.data -> 'kind', 'entries', e.data -> 'entries')::text
              FROM {_TRANSACTIONS}
              LEFT JOIN {_TRANSACTIONS.replace(") e", ") o")}
                ON o.event_id::text = e.data ->> 'reverses' AND o.stream_id = e.stream_id
               AND o.stream_version < e.stream_version
             WHERE e.event_type = 'CreditsReversed'
               AND (o.event_id IS NULL OR o.event_type = 'CreditsReversed'
                    OR o.data ->> 'asset' IS DISTINCT FROM e.data ->> 'asset'
                    OR e.data ->> 'kind' IS DISTINCT FROM 'reversal'
                    OR e.data -> 'entries' IS DISTINCT FROM {_NEGATED_LEGS})
             ORDER BY e.global_position {_LIMIT}""",
    ),
    (
        "reversed_beyond_amount",
        "the reversals of a transaction never add up to more than its amount",
        f"""SELECT 'reversed_beyond_amount',
                   'transaction ' || o.event_id || ' is reversed by more than its amount',
                   o.stream_id, o.stream_version, o.global_position, '<= ' || (o.data ->> 'amount'),
                   sum({_AMOUNT})::text
              FROM {_TRANSACTIONS}
              JOIN events o ON o.event_id::text = e.data ->> 'reverses'
             WHERE e.event_type = 'CreditsReversed'
             GROUP BY o.global_position
            HAVING sum({_AMOUNT}) > {_whole("o.data -> 'amount'")}
             ORDER BY o.global_position {_LIMIT}""",
    ),
    (
        "asset_not_zero_sum",
        "each asset's balances sum to zero",
        f"""SELECT 'asset_not_zero_sum', 'the balances of ' || (e.data ->> 'asset') || ' sum to '
                   || sum(l.amount), NULL::text, NULL::bigint, NULL::bigint, '0', sum(l.amount)::text
              FROM {_TRANSACTIONS}, {_LEGS}
             GROUP BY e.data ->> 'asset'
            HAVING sum(l.amount) <> 0 {_LIMIT}""",
    ),
    (
        "negative_balance",
        "no user balance was ever negative",
        f"""SELECT 'negative_balance', 'the ' || asset || ' balance went below zero', stream_id,
                   stream_version, global_position, '>= 0', balance::text
              FROM ({_USER_LEGS}) r WHERE balance < 0
             ORDER BY global_position {_LIMIT}""",
    ),
    (
        "balance_after_mismatch",
        "every recorded balance_after equals the replayed balance",
        f"""SELECT 'balance_after_mismatch', 'balance_after of ' || asset || ' differs from the replay',
                   stream_id, stream_version, global_position, balance::text, recorded_after::text
              FROM ({_USER_LEGS}) r WHERE recorded_after IS DISTINCT FROM balance
             ORDER BY global_position {_LIMIT}""",
    ),
    (
        "version_gap",
        "stream versions are gapless from 1",
        f"""SELECT DISTINCT ON (stream_id) 'version_gap', 'stream versions skip or repeat', stream_id,
                   stream_version, global_position, expected::text, stream_version::text
              FROM (SELECT stream_id, stream_version, global_position,
                           row_number() OVER (PARTITION BY stream_id ORDER BY stream_version) AS expected
                      FROM events) v
             WHERE v.stream_version <> v.expected
             ORDER BY v.stream_id, v.stream_version {_LIMIT}""",
    ),
    (
        "stream_head_mismatch",
        "every stream row's version and hash head match its last event",
        f"""SELECT 'stream_head_mismatch',
                   CASE WHEN e.stream_id IS NULL THEN 'stream has no events'
                        WHEN s.stream_id IS NULL THEN 'events of a stream with no stream row'
                        WHEN s.version <> e.version THEN 'stream version differs from its last event'
                        ELSE 'stream hash head differs from its last event''s hash' END,
                   coalesce(s.stream_id, e.stream_id), e.version, e.global_position,
                   coalesce(e.version::text || ':' || encode(e.hash, 'hex'), 'no events'),
                   coalesce(s.version::text || ':' || encode(s.last_hash, 'hex'), 'no stream row')
              FROM streams s
              FULL JOIN (SELECT DISTINCT ON (stream_id) stream_id, stream_version AS version,
                                global_position, hash
                           FROM events ORDER BY stream_id, stream_version DESC) e
                ON e.stream_id = s.stream_id
             WHERE s.stream_id IS NULL OR e.stream_id IS NULL OR s.version <> e.version
                OR s.last_hash <> e.hash
             {_LIMIT}""",
    ),
    (
        "stream_writer_head",
        "every stream row's last_writer_xid is the greatest writer_xid of its events, so that its next "
        "event sorts after them all in the feed (commands/sql/tally_writer_xid.sql)",
        f"""SELECT 'stream_writer_head', 'the stream''s last_writer_xid is not its events'' greatest',
                   s.stream_id, NULL::bigint, NULL::bigint, e.newest::text, s.last_writer_xid::text
              FROM streams s
              JOIN (SELECT stream_id, max(writer_xid) AS newest FROM events GROUP BY stream_id) e
                ON e.stream_id = s.stream_id
             WHERE s.last_writer_xid <> e.newest
             ORDER BY s.stream_id {_LIMIT}""",
    ),
    (
        "hash_chain_broken",
        "every event's hash is sha256(previous hash of its stream || its canonical bytes)",
        f"""SELECT 'hash_chain_broken', 'the event does not hash to its stored hash: altered, or its '
                   || 'predecessor was altered or removed', stream_id, stream_version, global_position,
                   encode(expected, 'hex'), encode(hash, 'hex')
              FROM (SELECT e.stream_id, e.stream_version, e.global_position, e.hash,
                           sha256(coalesce(lag(e.hash) OVER (PARTITION BY e.stream_id
                                                             ORDER BY e.stream_version),
                                           tally_genesis_hash())
                                  || tally_event_bytes(e.stream_id, e.stream_version, e.event_id,
                                                       e.event_type, e.data, e.metadata, e.recorded_at))
                               AS expected
                      FROM events e) h
             WHERE hash <> expected
             ORDER BY global_position {_LIMIT}""",
    ),
    (
        "snapshot_mismatch",
        "the write side's wallet snapshots equal the replay",
        f"""WITH replay AS (
                SELECT stream_id, asset, sum(delta) AS balance FROM ({_USER_LEGS}) r GROUP BY 1, 2
            ), snapshot AS (
                SELECT s.stream_id, b.key AS asset, b.value::text::numeric AS balance
                  FROM streams s, jsonb_each(s.state -> 'balances') b WHERE s.stream_type = 'wallet'
            )
            SELECT 'snapshot_mismatch', 'the stream snapshot''s ' || coalesce(r.asset, n.asset)
                   || ' balance differs from the replay', coalesce(r.stream_id, n.stream_id),
                   NULL::bigint, NULL::bigint, coalesce(r.balance, 0)::text, coalesce(n.balance, 0)::text
              FROM replay r FULL JOIN snapshot n ON n.stream_id = r.stream_id AND n.asset = r.asset
             WHERE coalesce(r.balance, 0) <> coalesce(n.balance, 0)
             {_LIMIT}""",
    ),
    (
        "read_model_balances",
        "the live balances read model equals the replay up to its checkpoint",
        f"""WITH replay AS (
                SELECT substr(l.account, 6) AS user_id, e.data ->> 'asset' AS asset, sum(l.amount) AS balance
                  FROM {_UP_TO.format(name="wallets")} e, {_LEGS}
                 WHERE {_IS_TRANSACTION} AND l.account LIKE 'user:%'
                 GROUP BY 1, 2)
            SELECT 'read_model_balances', 'rm_balances of ' || coalesce(r.asset, b.asset)
                   || ' differs from the replay', 'wallet:' || coalesce(r.user_id, b.user_id),
                   NULL::bigint, NULL::bigint, coalesce(r.balance, 0)::text, coalesce(b.balance, 0)::text
              FROM replay r FULL JOIN rm_balances b ON b.user_id = r.user_id AND b.asset = r.asset
             WHERE coalesce(r.balance, 0) <> coalesce(b.balance, 0)
             {_LIMIT}""",
    ),
    (
        "read_model_wallets",
        "the live wallets read model (versions, events applied, assets) equals the replay up to its "
        "checkpoint",
        f"""WITH upto AS {_UP_TO.format(name="wallets")},
            replay AS (SELECT substr(u.stream_id, 8) AS user_id, max(u.stream_version) AS version,
                              count(*) AS applied
                         FROM upto u WHERE {_COUNTED}
                        GROUP BY 1),
            assets AS (SELECT data ->> 'code' AS code FROM upto WHERE event_type = 'AssetDefined')
            SELECT 'read_model_wallets', 'rm_wallets version differs from the replay',
                   'wallet:' || coalesce(r.user_id, w.user_id), NULL::bigint, NULL::bigint,
                   coalesce(r.version::text, 'absent'), coalesce(w.version::text, 'absent')
              FROM replay r FULL JOIN rm_wallets w ON w.user_id = r.user_id
             WHERE r.version IS DISTINCT FROM w.version OR r.applied IS DISTINCT FROM w.events_applied
            UNION ALL
            SELECT 'read_model_wallets', 'rm_assets differs from the AssetDefined events',
                   'asset:' || coalesce(a.code, m.code), NULL, NULL,
                   CASE WHEN a.code IS NULL THEN 'absent' ELSE 'present' END,
                   CASE WHEN m.code IS NULL THEN 'absent' ELSE 'present' END
              FROM assets a FULL JOIN rm_assets m ON m.code = a.code
             WHERE a.code IS NULL OR m.code IS NULL
             {_LIMIT}""",
    ),
    (
        "read_model_history",
        "the live history read model holds exactly the transaction events, and each wallet's count of "
        "them, up to its checkpoint",
        f"""WITH upto AS {_UP_TO.format(name="history")},
            replay AS (SELECT e.* FROM upto e WHERE {_IS_TRANSACTION}),
            heads AS (SELECT substr(u.stream_id, 8) AS user_id, max(u.stream_version) AS version,
                             count(*) AS applied, bool_or(u.event_type = 'WalletOpened') AS opened
                        FROM upto u WHERE {_COUNTED}
                       GROUP BY 1)
            SELECT 'read_model_history', 'rm_transactions differs from the event', coalesce(r.stream_id,
                   'wallet:' || t.user_id), coalesce(r.stream_version, t.wallet_version), r.global_position,
                   coalesce(jsonb_build_object('user_id', r.data ->> 'user_id', 'amount',
                            r.data -> 'amount', 'balance_after', r.data -> 'balance_after',
                            'entries', r.data -> 'entries', 'version', r.stream_version)::text, 'absent'),
                   coalesce(jsonb_build_object('user_id', t.user_id, 'amount', t.amount, 'balance_after',
                            t.balance_after, 'entries', t.entries, 'version', t.wallet_version)::text,
                            'absent')
              FROM replay r FULL JOIN rm_transactions t ON t.transaction_id = r.event_id
             WHERE r.event_id IS NULL OR t.transaction_id IS NULL
                OR t.user_id <> r.data ->> 'user_id'
                OR t.amount IS DISTINCT FROM {_whole("r.data -> 'amount'")}
                OR t.balance_after IS DISTINCT FROM {_whole("r.data -> 'balance_after'")}
                OR t.entries <> r.data -> 'entries' OR t.wallet_version <> r.stream_version
                OR t.reverses::text IS DISTINCT FROM r.data ->> 'reverses'
                OR t.hold_id::text IS DISTINCT FROM r.data ->> 'hold_id'
            UNION ALL
            SELECT 'read_model_history', 'rm_history_wallets differs from the replay',
                   'wallet:' || coalesce(h.user_id, w.user_id), NULL, NULL,
                   coalesce(jsonb_build_object('version', h.version, 'events_applied', h.applied,
                                               'opened', h.opened)::text, 'absent'),
                   coalesce(jsonb_build_object('version', w.version, 'events_applied', w.events_applied,
                                               'opened', w.opened)::text, 'absent')
              FROM heads h FULL JOIN rm_history_wallets w ON w.user_id = h.user_id
             WHERE h.version IS DISTINCT FROM w.version OR h.applied IS DISTINCT FROM w.events_applied
                OR h.opened IS DISTINCT FROM w.opened
             {_LIMIT}""",
    ),
    (
        "read_model_system",
        "the live system balances equal the replay up to their checkpoint",
        f"""WITH replay AS (
                SELECT e.data ->> 'asset' AS asset,
                       CASE WHEN l.account LIKE 'user:%' THEN 'users'
                            ELSE substr(l.account, 8) END AS account,
                       sum(l.amount) AS balance
                  FROM {_UP_TO.format(name="system")} e, {_LEGS}
                 WHERE {_IS_TRANSACTION}
                 GROUP BY 1, 2)
            SELECT 'read_model_system', 'rm_system_balances ' || coalesce(r.asset, s.asset) || '/'
                   || coalesce(r.account, s.account) || ' differs from the replay', NULL, NULL, NULL,
                   coalesce(r.balance, 0)::text, coalesce(s.balance, 0)::text
              FROM replay r FULL JOIN rm_system_balances s ON s.asset = r.asset AND s.account = r.account
             WHERE coalesce(r.balance, 0) <> coalesce(s.balance, 0)
             {_LIMIT}""",
    ),
    (
        "read_model_holds",
        "the live holds read model equals the replay of the hold events up to its checkpoint",
        f"""WITH replay AS (
                SELECT e.data ->> 'hold_id' AS hold_id,
                       max({_AMOUNT}) FILTER (WHERE e.event_type = 'HoldPlaced') AS amount,
                       max(e.data ->> 'asset') FILTER (WHERE e.event_type = 'HoldPlaced') AS asset,
                       max(substr(e.stream_id, 8)) FILTER (WHERE e.event_type = 'HoldPlaced') AS user_id,
                       max(e.data ->> 'expires_at') FILTER (WHERE e.event_type = 'HoldPlaced') AS expires_at,
                       coalesce(sum({_AMOUNT}) FILTER (WHERE e.event_type = 'HoldCaptured'), 0) AS captured,
                       coalesce(sum({_whole("e.data -> 'released'")})
                                FILTER (WHERE e.event_type <> 'HoldPlaced'), 0)
                           AS released,
                       coalesce(max(CASE WHEN e.event_type = 'HoldVoided' THEN 'voided'
                                         WHEN e.event_type = 'HoldExpired' THEN 'expired'
                                         WHEN e.event_type = 'HoldCaptured'
                                              AND e.data ->> 'hold_remaining' = '0' THEN 'captured' END),
                                'active') AS status
                  FROM {_UP_TO.format(name="wallets")} e
                 WHERE e.event_type IN ('HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired')
                 GROUP BY 1)
            SELECT 'read_model_holds', 'rm_holds differs from the replay of hold '
                   || coalesce(r.hold_id, h.hold_id::text), 'wallet:' || h.user_id, NULL::bigint,
                   NULL::bigint,
                   coalesce(jsonb_build_object('amount', r.amount, 'captured', r.captured,
                                               'released', r.released, 'status', r.status, 'asset', r.asset,
                                               'user_id', r.user_id, 'expires_at', r.expires_at)::text,
                            'absent'),
                   coalesce(jsonb_build_object('amount', h.amount, 'captured', h.captured,
                                               'released', h.released, 'status', h.status, 'asset', h.asset,
                                               'user_id', h.user_id,
                                               'expires_at', tally_timestamp_text(h.expires_at))::text,
                            'absent')
              FROM replay r FULL JOIN rm_holds h ON h.hold_id::text = r.hold_id
             WHERE r.hold_id IS NULL OR h.hold_id IS NULL OR r.amount IS DISTINCT FROM h.amount
                OR r.captured <> h.captured OR r.released <> h.released OR r.status <> h.status
                OR r.asset IS DISTINCT FROM h.asset OR r.user_id IS DISTINCT FROM h.user_id
                OR r.expires_at IS DISTINCT FROM tally_timestamp_text(h.expires_at)
             {_LIMIT}""",
    ),
    (
        "command_outcome",
        "every command has a recorded domain outcome; an accepted one has exactly its event, a refused "
        "one none; every event was caused by exactly one command (a HoldExpired, by none: the expiry "
        "sweep records it)",
        f"""SELECT 'command_outcome', 'command ' || c.command_id || ' has no outcome a command records',
                   c.stream_id, NULL::bigint, NULL::bigint, '{_OUTCOME_NAMES}', coalesce(c.outcome, 'none')
              FROM commands c WHERE c.outcome IS NULL OR c.outcome NOT IN ({_OUTCOMES})
            UNION ALL
            SELECT 'command_outcome', 'accepted command ' || c.command_id || ' has no event', c.stream_id,
                   NULL, NULL, coalesce(c.event_id::text, 'an event id'), 'no such event'
              FROM commands c LEFT JOIN events e ON e.event_id = c.event_id
             WHERE c.outcome = '{ACCEPTED}' AND e.event_id IS NULL
            UNION ALL
            SELECT 'command_outcome', 'refused command ' || c.command_id || ' names an event', c.stream_id,
                   NULL, NULL, 'no event', c.event_id::text
              FROM commands c WHERE c.outcome <> '{ACCEPTED}' AND c.event_id IS NOT NULL
            UNION ALL
            SELECT 'command_outcome', 'event ' || e.event_id || ' was caused by '
                   || count(c.command_id) || ' commands', e.stream_id, e.stream_version, e.global_position,
                   CASE WHEN e.event_type = 'HoldExpired' THEN '0' ELSE '1' END, count(c.command_id)::text
              FROM events e LEFT JOIN commands c ON c.event_id = e.event_id
             GROUP BY e.global_position
            HAVING count(c.command_id) <> CASE WHEN e.event_type = 'HoldExpired' THEN 0 ELSE 1 END
            UNION ALL
            SELECT 'command_outcome', 'event metadata names another command', e.stream_id,
                   e.stream_version, e.global_position, c.command_id, e.metadata ->> 'command_id'
              FROM events e JOIN commands c ON c.event_id = e.event_id
             WHERE e.metadata ? 'command_id' AND e.metadata ->> 'command_id' <> c.command_id
             {_LIMIT}""",
    ),
    (
        "created_by",
        "every command names a known client, and every event records the client whose command caused "
        "it (client_id and created_by, its name); only events recorded before callers had "
        "identities (before 0007_clients.sql was applied) record none",
        f"""SELECT 'created_by', 'event does not record the client of its command', e.stream_id,
                   e.stream_version, e.global_position, k.client_id::text || ' ' || k.name,
                   coalesce(e.metadata ->> 'client_id', 'none') || ' '
                   || coalesce(e.metadata ->> 'created_by', 'none')
              FROM events e JOIN commands c ON c.event_id = e.event_id
              JOIN clients k ON k.client_id = c.client_id
             WHERE CASE WHEN e.metadata ? 'client_id'
                        THEN e.metadata ->> 'client_id' <> k.client_id::text
                             OR e.metadata ->> 'created_by' IS DISTINCT FROM k.name
                        ELSE e.recorded_at >= (SELECT m.applied_at FROM schema_migrations m
                                                WHERE m.name = '{IDENTITIES}')
                   END
            UNION ALL
            SELECT 'created_by', 'command ' || c.command_id || ' names no known client', c.stream_id,
                   NULL, NULL, 'a client', c.client_id::text
              FROM commands c WHERE NOT EXISTS (SELECT 1 FROM clients k WHERE k.client_id = c.client_id)
             {_LIMIT}""",
    ),
]

# Every event of the wallets that ever had a hold, in version order: the holds replay below.
_HOLD_WALLET_EVENTS = """
SELECT e.stream_id, e.stream_version, e.global_position, e.event_id::text AS event_id, e.event_type,
       e.data::text AS data, e.recorded_at,
       tally_event_kind(e.event_type, EXISTS (SELECT 1 FROM flows f WHERE f.event_type = e.event_type))
           AS kind
  FROM events e
 WHERE e.stream_id IN (SELECT DISTINCT h.stream_id FROM events h
                        WHERE h.event_type IN ('HoldPlaced', 'HoldCaptured', 'HoldVoided', 'HoldExpired')
                          AND h.stream_id LIKE 'wallet:%')
 ORDER BY e.stream_id, e.stream_version
"""
# The holds each wallet's snapshot keeps (the ones every decision trusts: tally_held).
_HOLD_SNAPSHOTS = """
SELECT stream_id, (state -> 'holds')::text AS holds
  FROM streams WHERE stream_type = 'wallet' AND state ? 'holds'
"""
HOLDS_CHECK: Final = (
    "holds",
    "every hold is placed once, on its own wallet, within what was available, is captured at most its "
    "amount in all, and nothing captures, voids or expires it after it ended, nor captures or voids it "
    "at or after its expiry; no hold expires early; after every debit and every hold, balance - active "
    "holds >= 0; and each wallet's snapshot holds exactly the holds no event ended yet",
)
MAX_HOLD: Final = timedelta(seconds=MAX_HOLD_SECONDS)


class _Hold(msgspec.Struct):
    asset: str
    remaining: int
    expires_at: datetime
    expires_text: str  # as recorded, which the snapshot repeats
    ended: str | None = None


class _HoldReplay:
    """One wallet's replay, event by event: its balances and holds, and what breaks the rules."""

    def __init__(self, stream_id: str) -> None:
        self.stream_id = stream_id
        self.user_id = stream_id.removeprefix("wallet:")
        self.balances: dict[str, int] = {}
        self.holds: dict[str, _Hold] = {}
        self.problems: list[tuple[str, str, str]] = []  # detail, expected, found

    def held(self, asset: str, at: datetime) -> int:
        return sum(
            h.remaining
            for h in self.holds.values()
            if h.asset == asset and h.ended is None and h.expires_at > at
        )

    def fail(self, detail: str, expected: object, found: object) -> None:
        self.problems.append((detail, str(expected), str(found)))

    def active(self, data: dict[str, Any], at: datetime, what: str, *, before_expiry: bool) -> _Hold | None:
        hold_id = str(data["hold_id"])
        hold = self.holds.get(hold_id)
        if hold is None:
            self.fail(
                f"{what} of hold {hold_id}, which was never placed on this wallet", "a HoldPlaced", "none"
            )
        elif hold.ended is not None:
            self.fail(f"{what} of hold {hold_id} after it was {hold.ended}", "an active hold", hold.ended)
        elif data.get("asset") != hold.asset or data.get("user_id") != self.user_id:
            self.fail(f"{what} of hold {hold_id} names another asset or user", f"{hold.asset} {self.user_id}",
                      f"{data.get('asset')} {data.get('user_id')}")  # fmt: skip
        elif before_expiry and at >= hold.expires_at:
            self.fail(f"{what} of hold {hold_id} at or after its expiry", f"before {hold.expires_at}", at)
        elif not before_expiry and at < hold.expires_at:
            self.fail(
                f"hold {hold_id} recorded as expired before its expiry", f"at or after {hold.expires_at}", at
            )
        else:
            return hold
        return None

    def apply(self, event_type: str, kind: str | None, event_id: str, data: Any, at: datetime) -> None:
        if kind not in ("transaction", "hold"):
            return
        if not isinstance(data, dict):
            raise TypeError(f"the data of a {event_type} is not an object")
        asset = str(data.get("asset"))
        if kind == "transaction":
            user = "user:" + self.user_id
            delta = sum(int(leg["amount"]) for leg in data["entries"] if leg["account"] == user)
            self.balances[asset] = self.balances.get(asset, 0) + delta
            if event_type == "HoldCaptured":
                self._captured(data, at)
            if delta < 0:
                self._available(asset, at, f"the {event_type} leaves less than its holds reserve")
        elif event_type == "HoldPlaced":
            self._placed(event_id, data, asset, at)
        else:
            what = "a void" if event_type == "HoldVoided" else "an expiry"
            hold = self.active(data, at, what, before_expiry=event_type == "HoldVoided")
            if hold is not None:
                if int(data["released"]) != hold.remaining:
                    self.fail(f"{what} of hold {data['hold_id']} releases another amount than remained",
                              hold.remaining, data["released"])  # fmt: skip
                hold.remaining = 0
                hold.ended = "voided" if event_type == "HoldVoided" else "expired"

    def _placed(self, event_id: str, data: dict[str, Any], asset: str, at: datetime) -> None:
        hold_id = str(data["hold_id"])
        expires_text = str(data["expires_at"])
        expires_at = datetime.fromisoformat(expires_text)
        amount = int(data["amount"])
        if hold_id != event_id or data.get("user_id") != self.user_id:
            self.fail("a HoldPlaced's hold_id is not its event id, or it names another user",
                      f"{event_id} {self.user_id}", f"{hold_id} {data.get('user_id')}")  # fmt: skip
        if hold_id in self.holds:
            self.fail(f"hold {hold_id} is placed twice", "once", "twice")
            return
        if not 1 <= amount <= MAX_AMOUNT:
            self.fail(
                f"hold {hold_id} reserves an amount outside 1..{MAX_AMOUNT}", f"1..{MAX_AMOUNT}", amount
            )
        if not at < expires_at <= at + MAX_HOLD:
            self.fail(f"hold {hold_id} expires outside 1 s to 30 days", f"after {at}", expires_at)
        self.holds[hold_id] = _Hold(
            asset=asset, remaining=amount, expires_at=expires_at, expires_text=expires_text
        )
        self._available(asset, at, f"hold {hold_id} reserves more than was available")

    def _captured(self, data: dict[str, Any], at: datetime) -> None:
        hold = self.active(data, at, "a capture", before_expiry=True)
        if hold is None:
            return
        amount, released, left = int(data["amount"]), int(data["released"]), int(data["hold_remaining"])
        final = data.get("final") is True
        if amount > hold.remaining:
            self.fail(f"a capture of hold {data['hold_id']} takes more than remained", f"<= {hold.remaining}",
                      amount)  # fmt: skip
        elif amount + released + left != hold.remaining or (final and left) or (not final and released):
            self.fail(f"a capture of hold {data['hold_id']} does not account for what remained",
                      hold.remaining, f"{amount} captured + {released} released + {left} left")  # fmt: skip
        hold.remaining = left
        if left == 0:
            hold.ended = "captured"

    def _available(self, asset: str, at: datetime, detail: str) -> None:
        available = self.balances.get(asset, 0) - self.held(asset, at)
        if available < 0:
            self.fail(f"available {asset} went below zero: {detail}", ">= 0", available)

    def open_holds(self) -> dict[str, dict[str, Any]]:
        """The holds no event ended, as the wallet's snapshot keeps them (expired ones included
        until their HoldExpired is recorded)."""
        return {
            hold_id: {"asset": h.asset, "remaining": h.remaining, "expires_at": h.expires_text}
            for hold_id, h in self.holds.items()
            if h.ended is None
        }


def _snapshot_findings(stream_id: str, replayed: dict[str, Any], snapshot: Any) -> list[Finding]:
    if snapshot == replayed:
        return []
    return [
        Finding(check="holds", detail="the wallet snapshot's holds differ from the replay of its hold events",
                stream_id=stream_id, expected=msgspec.json.encode(replayed).decode()[:2000],
                found=msgspec.json.encode(snapshot).decode()[:2000])
    ]  # fmt: skip


async def _hold_findings(conn: asyncpg.Connection) -> list[Finding]:
    """Replays every wallet that ever had a hold (the others' available balance is their balance,
    which negative_balance checks), streaming its events in version order, and compares what it
    ends with against each wallet's snapshot."""
    snapshots: dict[str, Any] = {
        r["stream_id"]: msgspec.json.decode(r["holds"]) for r in await conn.fetch(_HOLD_SNAPSHOTS)
    }
    findings: list[Finding] = []
    replay: _HoldReplay | None = None

    def wallet_done() -> None:
        if replay is not None:
            stream_id = replay.stream_id
            findings.extend(_snapshot_findings(stream_id, replay.open_holds(), snapshots.pop(stream_id, {})))

    async for row in conn.cursor(_HOLD_WALLET_EVENTS, prefetch=2000):
        if replay is None or replay.stream_id != row["stream_id"]:
            wallet_done()
            replay = _HoldReplay(row["stream_id"])
        before = len(replay.problems)
        try:
            data = msgspec.json.decode(row["data"])
            replay.apply(row["event_type"], row["kind"], row["event_id"], data, row["recorded_at"])
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError, msgspec.DecodeError) as exc:
            replay.fail(f"the {row['event_type']} cannot be replayed: {exc!r}", "well-formed fields",
                        row["data"][:200])  # fmt: skip
        findings.extend(
            Finding(check="holds", detail=detail, stream_id=row["stream_id"],
                    stream_version=row["stream_version"], global_position=row["global_position"],
                    expected=expected, found=found)
            for detail, expected, found in replay.problems[before:]
        )  # fmt: skip
        if len(findings) > FINDINGS_PER_CHECK:
            return findings
    wallet_done()
    for stream_id, snapshot in snapshots.items():  # holds in a snapshot, with no hold event at all
        findings.extend(_snapshot_findings(stream_id, {}, snapshot))
    return findings


_LOCK_READ_MODELS = (
    "LOCK TABLE projection_checkpoints, rm_assets, rm_wallets, rm_balances, rm_holds, rm_transactions, "
    "rm_history_wallets, rm_system_balances IN ACCESS SHARE MODE"
)
_TOTALS = """
SELECT (SELECT count(*) FROM events) AS events, (SELECT count(*) FROM streams) AS streams,
       (SELECT count(*) FROM commands) AS commands
"""


async def verify(
    conn: asyncpg.Connection, anchors: Sequence[tuple[str, Anchor]] = (), anchor_key: str | None = None
) -> VerifyReport:
    """Run every check in one consistent snapshot; the report lists each check and its findings.
    Each of ``anchors`` (a label, such as its file's name, and the anchor) is checked too
    (projections/anchor.py), with ``anchor_key`` for their HMACs."""
    started_at = datetime.now(UTC)
    clock = time.perf_counter()
    findings: list[Finding] = []
    results: list[CheckResult] = []
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        # Before the snapshot is taken (LOCK takes none): a rebuild's swap cannot replace a read
        # model between two checks, which would compare new tables against the old checkpoints
        # (found in review). The swap gives way to verify and retries after it.
        await conn.execute(_LOCK_READ_MODELS)
        totals = await conn.fetchrow(_TOTALS)
        assert totals is not None
        check_clock = time.perf_counter()
        chain = await _chain_functions(conn)
        results.append(
            CheckResult(
                name="chain_functions",
                description="the functions the hash chains are computed with are the shipped ones",
                findings=len(chain),
                truncated=False,
                seconds=round(time.perf_counter() - check_clock, 3),
            )
        )
        findings.extend(chain)
        for name, description, sql in CHECKS:
            check_clock = time.perf_counter()
            rows = await conn.fetch(sql)
            truncated = len(rows) > FINDINGS_PER_CHECK
            rows = rows[:FINDINGS_PER_CHECK]
            results.append(
                CheckResult(
                    name=name,
                    description=description,
                    findings=len(rows),
                    truncated=truncated,
                    seconds=round(time.perf_counter() - check_clock, 3),
                )
            )
            findings.extend(Finding(**dict(zip(_FINDING_FIELDS, r, strict=True))) for r in rows)
        check_clock = time.perf_counter()
        holds = await _hold_findings(conn)
        results.append(
            CheckResult(
                name=HOLDS_CHECK[0],
                description=HOLDS_CHECK[1],
                findings=min(len(holds), FINDINGS_PER_CHECK),
                truncated=len(holds) > FINDINGS_PER_CHECK,
                seconds=round(time.perf_counter() - check_clock, 3),
            )
        )
        findings.extend(holds[:FINDINGS_PER_CHECK])
        for label, anchor in anchors:
            check_clock = time.perf_counter()
            problems = await check_anchor(conn, anchor, anchor_key)
            results.append(
                CheckResult(
                    name="anchor",
                    description=f"{label}: the history holds every stream head anchored at position "
                    f"{anchor.position} ({anchor.created_at})",
                    findings=min(len(problems), FINDINGS_PER_CHECK),
                    truncated=len(problems) > FINDINGS_PER_CHECK,
                    seconds=round(time.perf_counter() - check_clock, 3),
                )
            )
            findings.extend(
                Finding(check="anchor", detail=f"{label}: {p.detail}", stream_id=p.stream_id,
                        stream_version=p.stream_version, expected=p.expected, found=p.found)
                for p in problems[:FINDINGS_PER_CHECK]
            )  # fmt: skip
    return VerifyReport(
        ok=not findings,
        started_at=started_at,
        seconds=round(time.perf_counter() - clock, 3),
        events=totals["events"],
        streams=totals["streams"],
        commands=totals["commands"],
        checks=results,
        findings=findings,
    )


def summary(report: VerifyReport, *, shown: int = 20) -> str:
    """The human summary: one line per check, then the first findings."""
    lines = [
        f"tally verify: {report.events} events, {report.streams} streams, {report.commands} commands "
        f"checked in {report.seconds:.2f} s",
    ]
    for check in report.checks:
        mark = "ok  " if check.findings == 0 else "FAIL"
        more = "+" if check.truncated else ""
        lines.append(
            f"  {mark} {check.name:<24} {check.findings}{more} findings {check.seconds:7.2f} s"
            f"  ({check.description})"
        )
    for finding in report.findings[:shown]:
        where = ", ".join(
            f"{k} {v}"
            for k, v in (
                ("stream", finding.stream_id),
                ("version", finding.stream_version),
                ("position", finding.global_position),
            )
            if v is not None
        )
        lines.append(
            f"  - {finding.check}: {finding.detail} [{where}] "
            f"expected {finding.expected}, found {finding.found}"
        )
    if len(report.findings) > shown:
        lines.append(f"  … and {len(report.findings) - shown} more in the JSON report")
    lines.append("RESULT: " + ("every check passed" if report.ok else f"{len(report.findings)} findings"))
    return "\n".join(lines)
