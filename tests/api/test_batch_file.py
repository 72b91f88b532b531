"""`tally batch FILE` against a real server process: a campaign file sent in batches, its refusals
named by line, the same file again only replaying, a bad file refused before anything is sent."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import sys
from pathlib import Path

import asyncpg
import httpx

from api.batch_file import _chunks
from tests.api.test_auth import make_key
from tests.conftest import LiveServer
from tests.helpers import AUTH


async def _tally_batch(server: LiveServer, secret: str, *args: str) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "api.cli", "batch", *args, "--url", server.url,
        env={**os.environ, "TALLY_API_KEY": secret, "TALLY_LOG_LEVEL": "warning"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode is not None
    return process.returncode, out.decode()


def _write(path: Path, commands: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(c) + "\n" for c in commands))
    return path


async def test_a_campaign_file_in_batches(
    live_server: LiveServer, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    users = [f"fan{i}" for i in range(5)]
    async with httpx.AsyncClient(base_url=live_server.url, headers=AUTH) as http:
        created = await http.post(
            "/v1/assets",
            json={"code": "GOLD", "name": "Gold", "decimals": 0},
            headers={"Idempotency-Key": "a"},
        )
        assert created.status_code == 201
        for user in users:
            opened = await http.post("/v1/wallets", json={"user_id": user}, headers={"Idempotency-Key": user})
            assert opened.status_code == 201
    commands: list[dict[str, object]] = [
        {"kind": "bonus", "user_id": users[i % 5], "asset": "GOLD", "amount": 1, "key": f"campaign-7/{i}"}
        for i in range(2500)
    ]
    commands[1234] = {**commands[1234], "user_id": "stranger"}  # no wallet: refused, named by its line
    path = _write(tmp_path / "campaign.jsonl", commands)
    secret = await make_key(pool, ["credits:bonus"])

    status, out = await _tally_batch(live_server, secret, str(path), "--size", "1000")
    assert status == 1, out
    assert "2,500 commands in 3 batches" in out
    assert "2,499 applied, 0 replayed, 1 refused (wallet_not_found 1)" in out
    assert "line 1235 (key campaign-7/1234): wallet_not_found" in out

    # What was applied, read from the events (the read models may lag behind the projector).
    totals = {
        r["user_id"]: r["total"]
        for r in await pool.fetch(
            "SELECT data ->> 'user_id' AS user_id, sum((data ->> 'amount')::bigint) AS total FROM events "
            "WHERE event_type = 'BonusGranted' GROUP BY 1"
        )
    }
    assert totals == {user: 500 - (user == users[1234 % 5]) for user in users}

    # The same file again: every batch replays its answer, nothing is applied twice.
    status, out = await _tally_batch(live_server, secret, str(path), "--size", "1000")
    assert status == 1, out
    assert "0 applied, 2,499 replayed, 1 refused" in out
    # In batches of another size: each command's own key replays it.
    status, out = await _tally_batch(live_server, secret, str(path), "--size", "700")
    assert "0 applied, 2,499 replayed, 1 refused" in out
    assert await pool.fetchval("SELECT count(*) FROM events WHERE event_type = 'BonusGranted'") == 2499


async def test_a_bad_file_is_refused_before_anything_is_sent(
    live_server: LiveServer, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    good = {"kind": "bonus", "user_id": "fan", "asset": "GOLD", "amount": 1, "key": "k1"}
    path = _write(tmp_path / "bad.jsonl", [good, {**good, "key": "k2", "amount": 0}])
    secret = await make_key(pool, ["credits:bonus"])
    status, out = await _tally_batch(live_server, secret, str(path))
    assert status == 2
    assert "bad.jsonl:2:" in out
    assert await pool.fetchval("SELECT count(*) FROM batches") == 0
    status, out = await _tally_batch(live_server, secret, str(tmp_path / "missing.jsonl"))
    assert status == 2
    assert "missing.jsonl" in out


def test_long_lines_go_in_smaller_batches() -> None:
    """A line valid alone (a reference and 16 metadata values of 512 characters) is over the 4 KiB
    a batch allows per command on average: such lines are sent in batches that fit the body limit."""
    short, long = b"x" * 100, b"y" * 10_000
    assert _chunks([short] * 2500, 1000) == [(0, 1000), (1000, 2000), (2000, 2500)]
    chunks = _chunks([long] * 1000, 1000)
    assert len(chunks) > 2
    assert all(sum(len(long) + 1 for _ in range(end - start)) <= 1000 * 4096 + 65536 for start, end in chunks)
    assert chunks[0][0] == 0
    assert chunks[-1][1] == 1000
    assert all(a[1] == b[0] for a, b in itertools.pairwise(chunks))
