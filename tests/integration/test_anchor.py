"""Anchors catch what the hash chains cannot: a superuser who rewrites a stream and re-hashes it end
to end, deletes a stream, or removes a stream's tail (each behind the triggers' back, with what is
derived from it made to agree) passes `tally verify`, but not `tally verify --anchor`."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import sys
from pathlib import Path

import asyncpg
import msgspec
import pytest

from commands import EventStore
from projections.anchor import Anchor, canonical, make_anchor
from projections.verify import VerifyReport, verify
from tests.helpers import define_asset, open_wallet, projected, spend, top_up

KEY = "an anchor key kept outside the database"

# Rewrite every event of ann's wallet (here: the user agent its requests carried) and re-hash the
# stream from its first event, then move the stream's head: every chain holds again.
_REWRITE_ANN = """
DO $$
DECLARE
    r record;
    v_prev bytea := tally_genesis_hash();
BEGIN
    FOR r IN SELECT * FROM events WHERE stream_id = 'wallet:ann' ORDER BY stream_version LOOP
        UPDATE events SET metadata = r.metadata || '{"user_agent": "rewritten"}',
                          hash = sha256(v_prev || tally_event_bytes(
                              r.stream_id, r.stream_version, r.event_id, r.event_type, r.data,
                              r.metadata || '{"user_agent": "rewritten"}', r.recorded_at))
         WHERE global_position = r.global_position
        RETURNING hash INTO v_prev;
    END LOOP;
    UPDATE streams SET last_hash = v_prev WHERE stream_id = 'wallet:ann';
END $$
"""
# Remove ann's last event (a spend) and everything derived from it: her stream's head and
# snapshot, the command, the read models. What remains is a consistent, shorter ledger.
_CUT_ANN = """
DO $$
DECLARE
    v_last events;
    v_prev events;
BEGIN
    SELECT * INTO v_last FROM events WHERE stream_id = 'wallet:ann' ORDER BY stream_version DESC LIMIT 1;
    SELECT * INTO v_prev FROM events
     WHERE stream_id = 'wallet:ann' AND stream_version = v_last.stream_version - 1;
    DELETE FROM commands WHERE event_id = v_last.event_id;
    DELETE FROM events WHERE global_position = v_last.global_position;
    UPDATE streams SET version = v_prev.stream_version, last_hash = v_prev.hash,
                       state = jsonb_set(state, '{balances,GOLD}',
                                         to_jsonb((v_prev.data ->> 'balance_after')::bigint))
     WHERE stream_id = 'wallet:ann';
    DELETE FROM rm_transactions WHERE transaction_id = v_last.event_id;
    UPDATE rm_balances SET balance = (v_prev.data ->> 'balance_after')::numeric WHERE user_id = 'ann';
    UPDATE rm_wallets SET version = version - 1, events_applied = events_applied - 1 WHERE user_id = 'ann';
    UPDATE rm_history_wallets SET version = version - 1, events_applied = events_applied - 1
     WHERE user_id = 'ann';
    UPDATE rm_system_balances SET balance = balance - (v_last.data ->> 'amount')::numeric
     WHERE asset = 'GOLD' AND account = 'revenue';
    UPDATE projection_checkpoints SET events_applied = events_applied - 1;
END $$
"""
# Remove ben's wallet altogether.
_DELETE_BEN = """
DELETE FROM commands WHERE stream_id = 'wallet:ben';
DELETE FROM events WHERE stream_id = 'wallet:ben';
DELETE FROM streams WHERE stream_id = 'wallet:ben'
"""


async def _ledger(store: EventStore, pool: asyncpg.Pool) -> None:
    await define_asset(store, "GOLD")
    for user in ("ann", "ben"):
        await open_wallet(store, user)
        await top_up(store, user, 100)
        await spend(store, user, 30)
    await projected(pool)


async def _tamper(pool: asyncpg.Pool, sql: str) -> None:
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")  # the triggers' back
        await conn.execute(sql)


async def _verify(pool: asyncpg.Pool, *anchors: Anchor, key: str | None = KEY) -> VerifyReport:
    async with pool.acquire() as conn:
        return await verify(conn, [(f"anchor-{i}", a) for i, a in enumerate(anchors)], key)


async def _anchor(pool: asyncpg.Pool, key: str | None = KEY) -> Anchor:
    async with pool.acquire() as conn:
        return await make_anchor(conn, key)


async def test_an_anchor_holds_while_history_only_grows(store: EventStore, pool: asyncpg.Pool) -> None:
    await _ledger(store, pool)
    anchor = await _anchor(pool)
    assert anchor.streams == 3
    assert anchor.heads["wallet:ann"][0] == 3
    await top_up(store, "ann", 7)
    await open_wallet(store, "cat")
    await projected(pool)
    report = await _verify(pool, anchor)
    assert report.ok, report.findings
    assert [c.name for c in report.checks].count("anchor") == 1


@pytest.mark.parametrize(
    ("tampering", "stream", "version", "detail"),
    [
        (_REWRITE_ANN, "wallet:ann", 3, "rewritten"),
        (_CUT_ANN, "wallet:ann", 3, "tail was removed"),
        (_DELETE_BEN, "wallet:ben", 3, "gone from the history"),
    ],
)
async def test_what_the_chains_cannot_see_the_anchor_names(
    store: EventStore, pool: asyncpg.Pool, tampering: str, stream: str, version: int, detail: str,
    foreign_events: set[int],
) -> None:  # fmt: skip
    await _ledger(store, pool)
    anchor = await _anchor(pool)
    await _tamper(pool, tampering)
    foreign_events.update(await pool.fetchval("SELECT array_agg(global_position) FROM events"))
    chains = {c.name: c.findings for c in (await _verify(pool)).checks}
    assert chains["hash_chain_broken"] == 0  # the chains hold again: only the anchor can tell
    report = await _verify(pool, anchor)
    assert not report.ok
    named = [f for f in report.findings if f.check == "anchor"]
    assert [(f.stream_id, f.stream_version) for f in named] == [(stream, version)], named
    assert detail in named[0].detail


async def _anchored_then_rewritten(store: EventStore, pool: asyncpg.Pool) -> Anchor:
    """A ledger, its anchor, then ann's stream rewritten and re-hashed behind the triggers' back."""
    await _ledger(store, pool)
    anchor = await _anchor(pool)
    await _tamper(pool, _REWRITE_ANN)
    return anchor


async def test_a_rewrite_that_passes_every_other_check_is_caught(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    anchor = await _anchored_then_rewritten(store, pool)
    assert (await _verify(pool)).ok  # what the issue saw: the rewrite passes verify
    assert not (await _verify(pool, anchor)).ok


async def test_an_anchor_edited_to_match_the_tampering_is_refused(
    store: EventStore, pool: asyncpg.Pool
) -> None:
    anchor = await _anchored_then_rewritten(store, pool)
    forged_heads = (await _anchor(pool, key=None)).heads
    # The forger recomputes the digest, but has no key for the HMAC.
    forged = msgspec.structs.replace(anchor, heads=forged_heads)
    forged = msgspec.structs.replace(forged, digest=hashlib.sha256(canonical(forged.statement)).hexdigest())
    report = await _verify(pool, forged)
    assert [f.detail for f in report.findings] == ["anchor-0: " + _detail("FORGED")]
    stripped = msgspec.structs.replace(forged, hmac=None)
    assert [f.detail for f in (await _verify(pool, stripped)).findings] == [
        "anchor-0: " + _detail("UNSIGNED")
    ]
    edited = msgspec.structs.replace(anchor, heads=forged_heads)  # the digest left as it was
    assert any("was edited" in f.detail for f in (await _verify(pool, edited)).findings)


def _detail(name: str) -> str:
    from projections import anchor

    text: str = getattr(anchor, f"_{name}")
    return text


async def _tally(db_url: str, *args: str) -> tuple[int, str]:
    env = {**os.environ, "DATABASE_URL": db_url, "TALLY_LOG_LEVEL": "warning", "TALLY_ANCHOR_KEY": KEY}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_the_anchor_and_verify_commands(
    store: EventStore, pool: asyncpg.Pool, db_url: str, tmp_path: Path, foreign_events: set[int]
) -> None:
    await _ledger(store, pool)
    first = tmp_path / "first.json"
    code, out = await _tally(db_url, "anchor", "--out", str(first))
    assert code == 0, out
    document = json.loads(first.read_text())
    assert {"format", "position", "created_at", "streams", "heads", "digest", "hmac"} <= set(document)
    await top_up(store, "ben", 1)
    second = tmp_path / "second.json"
    assert (await _tally(db_url, "anchor", "--out", str(second)))[0] == 0
    code, out = await _tally(db_url, "verify", "--anchor", str(first), "--anchor", str(second))
    assert code == 0, out
    assert out.count("ok   anchor") == 2
    await _tamper(pool, _DELETE_BEN)
    foreign_events.update(await pool.fetchval("SELECT array_agg(global_position) FROM events"))
    code, out = await _tally(db_url, "verify", "--anchor", str(first), "--anchor", str(second))
    assert code == 1, out
    assert "stream wallet:ben, version 3" in out
    assert "stream wallet:ben, version 4" in out
    code, out = await _tally(db_url, "verify", "--anchor", str(tmp_path / "missing.json"))
    assert code == 2
    assert "missing.json" in out


async def test_a_redefined_chain_function_is_named(store: EventStore, pool: asyncpg.Pool) -> None:
    """Whoever controls the database could edit an amount, keep its stored hash, and redefine the
    function the chain check computes with to hide it: verify compares the function with its
    shipped source."""
    await _ledger(store, pool)
    anchor = await _anchor(pool)
    await pool.execute(
        "CREATE OR REPLACE FUNCTION tally_genesis_hash() RETURNS bytea LANGUAGE sql IMMUTABLE AS "
        "$$ SELECT decode(repeat('00', 32), 'hex') $$"
    )
    report = await _verify(pool, anchor)
    assert [f.check for f in report.findings] == ["chain_functions"]
