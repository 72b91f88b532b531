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
from datetime import UTC, datetime
from typing import Final

import asyncpg
import msgspec

from domain import ACCEPTED, MAX_AMOUNT, MAX_BIGINT, RECORDED_OUTCOMES
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

# Every check dispatches on the event type: a transaction event is one whose type is a flow's (the
# flows table, written from domain/flows.py); AssetDefined and WalletOpened are the other known
# types (projections/sql/tally_event_kind.sql); anything else is named by `unknown_event_type` and
# is no transaction.
_TRANSACTIONS = "events e JOIN flows f ON f.event_type = e.event_type"


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
                   'AssetDefined on asset:, WalletOpened or a flow''s event type on wallet:', e.event_type
              FROM (SELECT e.*, tally_event_kind(e.event_type, f.kind IS NOT NULL) AS kind
                      FROM events e LEFT JOIN flows f ON f.event_type = e.event_type) e
             WHERE NOT ((e.kind = 'asset' AND e.stream_id LIKE 'asset:%')
                     OR (e.kind IN ('wallet', 'transaction') AND e.stream_id LIKE 'wallet:%'))
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
             GROUP BY e.global_position
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
        "the signed amount, the flow's system account by the opposite",
        f"""SELECT 'legs_do_not_match_kind', 'this ' || e.event_type || ' is not a ' || f.kind
                   || ' with its flow''s legs', e.stream_id, e.stream_version, e.global_position,
                   jsonb_build_object('kind', f.kind, 'entries', x.legs)::text,
                   jsonb_build_object('kind', e.data -> 'kind', 'entries', e.data -> 'entries')::text
              FROM {_TRANSACTIONS},
                   LATERAL (SELECT tally_legs(f, substr(e.stream_id, 8), {_AMOUNT}) AS legs) x
             WHERE e.data ->> 'kind' IS DISTINCT FROM f.kind OR e.data -> 'entries' IS DISTINCT FROM x.legs
             ORDER BY e.global_position {_LIMIT}""",
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
                  FROM {_UP_TO.format(name="wallets")} e
                  JOIN flows f ON f.event_type = e.event_type, {_LEGS}
                 WHERE l.account LIKE 'user:%'
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
                         FROM upto u LEFT JOIN flows f ON f.event_type = u.event_type
                        WHERE u.event_type = 'WalletOpened' OR f.kind IS NOT NULL
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
            replay AS (SELECT u.* FROM upto u JOIN flows f ON f.event_type = u.event_type),
            heads AS (SELECT substr(u.stream_id, 8) AS user_id, max(u.stream_version) AS version,
                             count(*) AS applied, bool_or(u.event_type = 'WalletOpened') AS opened
                        FROM upto u LEFT JOIN flows f ON f.event_type = u.event_type
                       WHERE u.event_type = 'WalletOpened' OR f.kind IS NOT NULL
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
                  FROM {_UP_TO.format(name="system")} e
                  JOIN flows f ON f.event_type = e.event_type, {_LEGS}
                 GROUP BY 1, 2)
            SELECT 'read_model_system', 'rm_system_balances ' || coalesce(r.asset, s.asset) || '/'
                   || coalesce(r.account, s.account) || ' differs from the replay', NULL, NULL, NULL,
                   coalesce(r.balance, 0)::text, coalesce(s.balance, 0)::text
              FROM replay r FULL JOIN rm_system_balances s ON s.asset = r.asset AND s.account = r.account
             WHERE coalesce(r.balance, 0) <> coalesce(s.balance, 0)
             {_LIMIT}""",
    ),
    (
        "command_outcome",
        "every command has a recorded domain outcome; an accepted one has exactly its event, a refused "
        "one none; every event was caused by exactly one command",
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
                   '1', count(c.command_id)::text
              FROM events e LEFT JOIN commands c ON c.event_id = e.event_id
             GROUP BY e.global_position HAVING count(c.command_id) <> 1
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

_LOCK_READ_MODELS = (
    "LOCK TABLE projection_checkpoints, rm_assets, rm_wallets, rm_balances, rm_transactions, "
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
