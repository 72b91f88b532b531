"""A flood of reads from a process of its own (so the test process that measures commands does not
share its event loop with it): ``python -m tests.read_flood URL READERS`` reads until its standard
input closes, then prints one JSON line: the answers by kind and status, and how many there were
(tests/integration/test_faults.py)."""

from __future__ import annotations

import asyncio
import collections
import json
import sys
import time

import httpx

from tests.helpers import AUTH

KINDS = ("as_of_time", "as_of_position", "history", "token")


async def _reader(
    url: str,
    stop: asyncio.Event,
    started: asyncio.Event,
    answers: collections.Counter[str],
    i: int,
    readers: int,
) -> None:
    """As of a time, as of a position, a page deep in the history, in turn; every tenth reader
    waits for a token no projection will reach (up to the consistency timeout)."""
    async with httpx.AsyncClient(base_url=url, headers=AUTH, timeout=60) as http:
        n = 0
        while not stop.is_set():
            n += 1
            kind = 3 if i % 10 == 0 else (i + n) % 3
            if kind == 0:
                request = http.get("/v1/wallets/deep", params={"as_of": "9999-01-01T00:00:00Z"})
            elif kind == 1:
                request = http.get("/v1/wallets/deep", params={"as_of": str(10_000 + n)})
            elif kind == 2:
                request = http.get("/v1/wallets/deep/transactions", params={"cursor": f"v{10_000 - n}"})
            else:
                request = http.get("/v1/wallets/deep", params={"consistent_with": f"{2**40}.1"})
            response = await request
            answers[f"{KINDS[kind]} {response.status_code}"] += 1
            if n == 1:
                answers["readers started"] += 1
                if answers["readers started"] == readers:
                    started.set()


async def main(url: str, readers: int) -> None:
    stop = asyncio.Event()
    answers: collections.Counter[str] = collections.Counter()
    loop = asyncio.get_running_loop()

    def on_input() -> None:  # the test closes our standard input: stop reading (and watching it)
        if not sys.stdin.buffer.read1(1):
            loop.remove_reader(sys.stdin.fileno())
            stop.set()

    loop.add_reader(sys.stdin.fileno(), on_input)
    began = time.perf_counter()
    started = asyncio.Event()  # every reader has had its first answer
    tasks = [asyncio.create_task(_reader(url, stop, started, answers, i, readers)) for i in range(readers)]
    await started.wait()
    print(json.dumps({"ready": True}), flush=True)
    await asyncio.gather(*tasks)
    print(json.dumps({"answers": answers, "seconds": time.perf_counter() - began}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
