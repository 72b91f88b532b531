"""The API's own cost per request, without uvicorn or a network: ``python -m bench.request_cost N``
sends N requests (GET a wallet, then N spends) straight into the ASGI app, 16 at a time, and
prints this process's CPU per request. Run it under callgrind to count instructions instead, which
repeat to 0.1 % whatever else the machine does (the difference of two runs, N and 5N, divided by
4N, is the cost of one request, start-up excluded)::

    valgrind --tool=callgrind python -m bench.request_cost 160
    valgrind --tool=callgrind python -m bench.request_cost 800

It needs a migrated database in ``DATABASE_URL`` (it adds the benchmark's 10,000 wallets when they
are missing, and a client key of its own). PostgreSQL's side is not counted: it runs elsewhere.
"""

from __future__ import annotations

import asyncio
import os
import random
import sys
import time
import uuid
from typing import Any

import asyncpg

from api.app import create_app
from api.keys import create_client
from api.settings import Settings
from bench.database import populate
from bench.scenarios import SPEND_BODY, wallet_ids

CONCURRENCY = 16
_Message = dict[str, Any]


async def measure(url: str, requests: int, kinds: list[str]) -> dict[str, float]:
    users = wallet_ids(10_000)
    conn = await asyncpg.connect(url)
    try:
        if not await conn.fetchval("SELECT count(*) FROM streams WHERE stream_id = 'wallet:w00000'"):
            await populate(url, users)
        secret = (await create_client(conn, f"request-cost-{uuid.uuid4().hex[:8]}", ["admin"])).secret
    finally:
        await conn.close()
    app: Any = create_app(Settings(database_url=url, log_level="warning"), run_projector=False)  # plain ASGI
    auth = f"Bearer {secret}".encode()

    async def call(method: str, path: str, body: bytes = b"") -> int:
        headers = [(b"host", b"bench"), (b"authorization", auth)]
        if body:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"idempotency-key", uuid.uuid4().hex.encode()),
            ]
        scope = {
            "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method,
            "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
            "headers": headers, "client": ("127.0.0.1", 1), "server": ("bench", 80),
        }  # fmt: skip
        received = False
        status: list[int] = []

        async def receive() -> _Message:
            nonlocal received
            if not received:
                received = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client never disconnects
            raise AssertionError("unreachable")

        async def send(message: _Message) -> None:
            if message["type"] == "http.response.start":
                status.append(message["status"])

        await app(scope, receive, send)
        return status[0]

    startup: asyncio.Queue[_Message] = asyncio.Queue()
    events: asyncio.Queue[_Message] = asyncio.Queue()
    await startup.put({"type": "lifespan.startup"})
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, startup.get, events.put)
    )
    assert (await events.get())["type"] == "lifespan.startup.complete"
    costs = {}
    try:
        for kind in kinds:

            async def client(kind: str = kind) -> None:
                for _ in range(requests // CONCURRENCY):
                    user = random.choice(users)
                    if kind == "get":
                        status = await call("GET", f"/v1/wallets/{user}")
                    else:
                        status = await call("POST", f"/v1/wallets/{user}/spends", SPEND_BODY)
                    assert status in {200, 201}, status

            started = time.process_time()
            await asyncio.gather(*[client() for _ in range(CONCURRENCY)])
            costs[kind] = (time.process_time() - started) / requests * 1e6
    finally:
        await startup.put({"type": "lifespan.shutdown"})
        await events.get()
        await lifespan
    return costs


def main() -> None:
    requests = int(sys.argv[1]) if len(sys.argv) > 1 else 1600
    kinds = (os.environ.get("REQUEST_COST_KINDS") or "get spend").split()
    url = os.environ.get("DATABASE_URL")
    if not url:
        sys.exit("bench.request_cost: set DATABASE_URL to a migrated database")
    for kind, cost in asyncio.run(measure(url, requests, kinds)).items():
        print(f"{kind}: {cost:,.0f} µs of this process's CPU per request ({requests} requests)")


if __name__ == "__main__":
    main()
