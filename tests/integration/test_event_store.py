"""The event store's own guarantees: append-only history, hash chains, unique versions."""

from __future__ import annotations

import hashlib

import asyncpg
import pytest

from commands import EventStore
from tests.helpers import define_asset, open_wallet, spend, top_up


async def _populate(store: EventStore) -> None:
    await define_asset(store)
    await open_wallet(store, "chain")
    await top_up(store, "chain", 100)
    await spend(store, "chain", 30)


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE events SET data = data || '{\"amount\": 1}'",
        "DELETE FROM events",
        "TRUNCATE events",
        "DELETE FROM commands",
        "TRUNCATE commands CASCADE",
        "UPDATE commands SET outcome = 'accepted', response = '{}'",
        "DELETE FROM flows",
        "UPDATE flows SET user_sign = 1",
    ],
)
async def test_history_cannot_be_changed(pool: asyncpg.Pool, store: EventStore, statement: str) -> None:
    await _populate(store)
    before = await pool.fetchval(
        "SELECT md5(string_agg(e::text, '|' ORDER BY global_position)) FROM events e"
    )
    with pytest.raises(asyncpg.RestrictViolationError):
        await pool.execute(statement)
    after = await pool.fetchval("SELECT md5(string_agg(e::text, '|' ORDER BY global_position)) FROM events e")
    assert after == before


async def test_every_stream_hash_chain_recomputes(pool: asyncpg.Pool, store: EventStore) -> None:
    await _populate(store)
    rows = await pool.fetch(
        """SELECT stream_id, stream_version, hash,
                  tally_event_bytes(stream_id, stream_version, event_id, event_type, data, metadata,
                                    recorded_at) AS canonical
             FROM events ORDER BY stream_id, stream_version"""
    )
    heads: dict[str, bytes] = {}
    for row in rows:
        previous = heads.get(row["stream_id"], bytes(32))
        expected = hashlib.sha256(previous + row["canonical"]).digest()
        assert row["hash"] == expected, (row["stream_id"], row["stream_version"])
        heads[row["stream_id"]] = expected
    # The stream row's head is its last event's hash.
    for stream_id, head in heads.items():
        assert await pool.fetchval("SELECT last_hash FROM streams WHERE stream_id = $1", stream_id) == head


async def test_a_second_writer_of_the_same_version_is_refused(pool: asyncpg.Pool, store: EventStore) -> None:
    await _populate(store)
    with pytest.raises(asyncpg.UniqueViolationError):
        await pool.execute(
            """INSERT INTO events (stream_id, stream_version, event_id, event_type, data, metadata, hash,
                                   recorded_at)
               VALUES ('wallet:chain', 2, gen_random_uuid(), 'CreditsToppedUp', '{}', '{}',
                       tally_genesis_hash(), now())"""
        )
