"""A webhook receiver for the tests: a real HTTP server (Litestar under uvicorn, in the test's own
event loop) that records every request it gets and answers as its script says."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import uvicorn
from litestar import Litestar, Request, Response, post
from litestar.params import FromPath

from tests.helpers import free_port

# What to do with a request: an HTTP status to answer, or "hang" (answer nothing until released).
Answer = int | str


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: str
    at: float  # time.monotonic() when it arrived
    status: int | None = None  # what was answered; None: nothing (it hung, or the caller gave up)
    answered_at: float | None = None


@dataclass
class Receiver:
    url: str
    script: Callable[[Received], Answer]
    log: list[Received] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    def acknowledged(self, path: str | None = None) -> list[Received]:
        return [
            r for r in self.log if r.status is not None and 200 <= r.status < 300 and path in (None, r.path)
        ]

    async def until(self, enough: Callable[[Receiver], bool], within: float = 60.0) -> None:
        """Wait until ``enough`` holds (a bound on waiting, not a timing assertion)."""
        deadline = time.monotonic() + within
        while not enough(self):
            assert time.monotonic() < deadline, (
                f"the receiver did not get what was expected within {within} s"
            )
            self.arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.arrived.wait(), 0.2)


@contextlib.asynccontextmanager
async def receiving(script: Callable[[Received], Answer]) -> AsyncIterator[Receiver]:
    port = free_port()
    receiver = Receiver(url=f"http://127.0.0.1:{port}", script=script)

    @post("/{name:str}", status_code=204)
    async def hook(request: Request[None, None, object], name: FromPath[str]) -> Response[None]:
        body = (await request.body()).decode()
        entry = Received(
            path=name,
            headers={k.lower(): v for k, v in request.headers.items()},
            body=body,
            at=time.monotonic(),
        )
        receiver.log.append(entry)
        receiver.arrived.set()
        answer = receiver.script(entry)
        if answer == "hang":
            await receiver.release.wait()
            answer = 204
        assert isinstance(answer, int)
        entry.status, entry.answered_at = answer, time.monotonic()
        receiver.arrived.set()
        return Response(None, status_code=answer)

    server = uvicorn.Server(
        uvicorn.Config(Litestar([hook]), host="127.0.0.1", port=port, log_level="warning", lifespan="off")
    )
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the receiver did not start"
        await asyncio.sleep(0.02)
    try:
        yield receiver
    finally:
        receiver.release.set()
        server.should_exit = True
        await asyncio.wait_for(task, 30)
