"""Every reader dispatches on the event type. An event of a kind this release does not know (as a
later release's hold would be to this one) lands on a wallet: every reader still answers, the
projections stop loudly at it instead of guessing, verify names it, and commands go on."""

from __future__ import annotations

import uuid

import asyncpg
from litestar.testing import AsyncTestClient

from projections.as_of import Moment, uncounted_as_of
from projections.projector import catch_up
from projections.status import projection_status
from projections.verify import verify
from tests.api.support import as_read, define_asset, get_json, open_wallet, spend, top_up
from tests.helpers import TEST_CLIENT, TEST_CLIENT_ID

# What a later release's command function would do: append the event to the wallet's stream (its
# next version, its hash chained), move the stream's head, and record the command that caused it.
_APPEND_FOREIGN = """
WITH s AS (SELECT * FROM streams WHERE stream_id = 'wallet:' || $1 FOR UPDATE),
     e AS (SELECT a.* FROM s, LATERAL tally_append_event(
                s.stream_id, s.version + 1, s.last_hash, gen_random_uuid(), 'WalletFrozen',
                jsonb_build_object('user_id', $1, 'reason', 'chargeback'),
                jsonb_build_object('command_id', 'freeze-1', 'client_id', $2::text, 'created_by', $3::text),
                now(), tally_writer_xid()) a),
     moved AS (UPDATE streams SET version = streams.version + 1, last_hash = e.o_hash FROM e
                WHERE stream_id = 'wallet:' || $1)
SELECT e.o_token FROM e
"""
_RECORD = """
INSERT INTO commands (client_id, command_id, fingerprint, metadata, outcome, response, stream_id, event_id)
SELECT $1, 'freeze-1', '\\x00', '{}', 'accepted', '{}', stream_id, event_id
  FROM events WHERE event_type = 'WalletFrozen'
"""


async def test_an_unknown_event_type_is_read_around_and_stops_the_projections(
    client: AsyncTestClient,  # type: ignore[type-arg]
    pool: asyncpg.Pool,
    foreign_events: set[int],
) -> None:
    await define_asset(client)
    await open_wallet(client, "ann")
    first = await top_up(client, "ann", 100)
    before = await get_json(client, "/v1/wallets/ann", first["consistency_token"])
    history_before = await get_json(client, "/v1/wallets/ann/transactions", first["consistency_token"])
    system_before = await get_json(client, "/v1/system/balances", first["consistency_token"])

    async with pool.acquire() as conn, conn.transaction():
        token = await conn.fetchval(_APPEND_FOREIGN, "ann", TEST_CLIENT_ID, TEST_CLIENT)
        await conn.execute(_RECORD, uuid.UUID(TEST_CLIENT_ID))
    foreign_events.add(int(token.split(".")[1]))
    later = await spend(client, "ann", 30)  # the write side does not care: version 4
    assert later["wallet_version"] == 4

    # The projections stop at the unknown event, naming it, and apply nothing past it.
    await catch_up(pool, batch_size=100)
    statuses = {s.name: s for s in await projection_status(pool)}
    for name in ("wallets", "history", "system"):
        assert statuses[name].error_position == int(token.split(".")[1]), name
        assert "WalletFrozen" in (statuses[name].error or ""), name

    # Every reader answers: the read models as they stood before the unknown event…
    assert await get_json(client, "/v1/wallets/ann") == before
    assert await get_json(client, "/v1/wallets/ann/transactions") == history_before
    assert await get_json(client, f"/v1/transactions/{first['transaction_id']}") == as_read(
        history_before["items"][0]
    )
    assert await get_json(client, "/v1/system/balances") == system_before
    # …and the readers of the events themselves: every version, the balances from the transactions.
    as_of = await get_json(client, "/v1/wallets/ann", as_of=later["consistency_token"].split(".")[1])
    assert (as_of["version"], as_of["balances"]) == (
        4,
        [{"asset": "GOLD", "balance": 70, "held": 0, "available": 70}],
    )
    assert as_of["uncounted_events"] == 1  # it says what it did not count
    async with pool.acquire() as conn:
        assert await uncounted_as_of(conn, Moment.parse(token.split(".")[1])) == 1
        assert await uncounted_as_of(conn, Moment.parse(first["consistency_token"].split(".")[1])) == 0

    async with pool.acquire() as conn:
        report = await verify(conn)
    assert [(f.check, f.found) for f in report.findings] == [("unknown_event_type", "WalletFrozen")]
