"""The event feed: GET /v1/events (pages, long-polled with ``wait``) and GET /v1/events/stream (the
same feed as Server-Sent Events). What the order is and why it never skips: projections/feed.py.

When the server is told to stop (SIGTERM), open streams end and long polls answer at once, so
that stopping does not wait for them (api/app.py, drain_on_signals).

Waiting costs a request nothing but memory: it gives back its turn among the process's queries
(api/ratelimit.py, ReadLimiter.set_aside) and holds no connection; it is woken when an API process
says commands committed or the projections moved (projections/watcher.py), and reads again at
least every ``POLL_SECONDS`` whatever it hears."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any, Final

import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import HeaderParameter, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage

from api.auth import Principal, scoped
from api.controllers import Pool, problem_responses
from api.errors import InvalidRequest
from api.observability import FEED_CONSUMERS, FEED_EVENTS
from api.ratelimit import ReadLimiter
from api.settings import Settings
from commands.errors import Overloaded
from domain import EVENT_TYPES
from domain.values import USER_ID_PATTERN
from projections.feed import FeedFilter, FeedPage, read_feed
from projections.positions import ORIGIN, Position
from projections.watcher import ProjectionWatcher

MAX_WAIT: Final = 30.0
POLL_SECONDS: Final = 1.0
STREAM_PAGE: Final = 500

After = Annotated[
    str | None,
    QueryParameter(
        description="A cursor: an event's `cursor`, a page's `next_cursor` or a command's "
        "`consistency_token`. Omitted: from the first event."
    ),
]
Types = Annotated[
    list[str] | None,
    QueryParameter(
        description="Only events of these types (repeat the parameter or separate by commas): "
        f"{', '.join(EVENT_TYPES)}."
    ),
]
UserId = Annotated[
    str | None, QueryParameter(pattern=USER_ID_PATTERN, description="Only the events of this user's wallet.")
]


def _events_read(description: str) -> dict[str, Any]:
    """The route's scope (api.auth.scoped), its need named after ``description``."""
    route = scoped("events:read")
    return {**route, "description": f"{description}\n\n{route['description']}"}


def _cursor(value: str | None) -> Position:
    if value is None:
        return ORIGIN
    try:
        return Position.parse(value)
    except ValueError:
        raise InvalidRequest(f"{value!r} is not a cursor of this feed") from None


def _filter(principal: Principal, types: list[str] | None, user_id: str | None) -> FeedFilter:
    wanted = None
    if types is not None:
        wanted = tuple(sorted({t.strip() for each in types for t in each.split(",") if t.strip()}))
        unknown = [t for t in wanted if t not in EVENT_TYPES]
        if unknown or not wanted:
            raise InvalidRequest(
                f"unknown event types {', '.join(unknown) or '(none given)'}; known: {', '.join(EVENT_TYPES)}"
            )
    return FeedFilter(
        types=wanted,
        stream_id=None if user_id is None else f"wallet:{user_id}",
        assets=None if principal.assets is None else tuple(sorted(principal.assets)),
    )


async def _wait_for_events(state: State, seconds: float) -> None:
    """Wait for events to be appended, at most ``seconds``, or until the server is stopping."""
    watcher: ProjectionWatcher = state.watcher
    limiter: ReadLimiter = state.read_limiter
    stopping: asyncio.Event = state.stopping
    async with limiter.set_aside():
        waiters = [
            asyncio.ensure_future(watcher.next_events(seconds)),
            asyncio.ensure_future(stopping.wait()),
        ]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()


class FeedController(Controller):
    path = "/v1/events"
    tags = ["feed"]

    @get(
        summary="The event feed, in commit order",
        **_events_read(
            "Every event once, in the order transactions committed (each wallet's in version order), "
            "from `after` on. A page that would be empty waits up to `wait` seconds for an event to commit. "
            "Page with `next_cursor`, also when a page is empty."
        ),
        responses=problem_responses(400, 503),
    )
    async def read_events(
        self,
        request: Request[Principal, None, State],
        state: State,
        pool: Pool,
        after: After = None,
        limit: Annotated[int, QueryParameter(ge=1, le=1000)] = 100,
        types: Types = None,
        user_id: UserId = None,
        wait: Annotated[
            float,
            QueryParameter(ge=0, le=MAX_WAIT, description="Seconds to wait for an event when there is none."),
        ] = 0,
    ) -> FeedPage:
        where = _filter(request.user, types, user_id)
        page, more = await read_feed(pool, _cursor(after), limit, where)
        if not page.items and wait > 0:
            deadline = time.monotonic() + wait
            FEED_CONSUMERS.labels("poll").inc()
            try:
                stopping: asyncio.Event = state.stopping
                while (
                    not page.items
                    and (remaining := deadline - time.monotonic()) > 0
                    and not stopping.is_set()
                ):
                    # (A filter's window that moved on reads on at once.)
                    if not more:
                        await _wait_for_events(state, min(remaining, POLL_SECONDS))
                    page, more = await read_feed(pool, Position.parse(page.next_cursor), limit, where)
            finally:
                FEED_CONSUMERS.labels("poll").dec()
        FEED_EVENTS.labels("poll").inc(len(page.items))
        return page

    @get(
        "/stream",
        summary="The event feed as Server-Sent Events",
        **_events_read(
            "The feed of GET /v1/events as `text/event-stream`: each event's `id:` is its cursor and its "
            "`data:` the feed's item. Reconnecting with `Last-Event-ID` (browsers do) resumes after it. "
            "An idle stream sends a `: keepalive` comment (with an `id:` past what a filter left out) every "
            "TALLY_FEED_HEARTBEAT seconds."
        ),
        responses=problem_responses(400),
    )
    async def stream_events(
        self,
        request: Request[Principal, None, State],
        state: State,
        pool: Pool,
        after: After = None,
        types: Types = None,
        user_id: UserId = None,
        last_event_id: Annotated[
            str | None,
            HeaderParameter(
                name="Last-Event-ID", description="Resume after this cursor (takes precedence over after)."
            ),
        ] = None,
    ) -> ServerSentEvent:
        where = _filter(request.user, types, user_id)
        start = _cursor(last_event_id if last_event_id is not None else after)
        settings: Settings = state.settings
        return ServerSentEvent(_stream(state, pool, start, where, settings.feed_heartbeat))


async def _stream(
    state: State, pool: Pool, cursor: Position, where: FeedFilter, heartbeat: float
) -> AsyncIterator[ServerSentEventMessage]:
    """Pages of events as they commit, until the client goes away (Litestar then cancels this) or
    the server stops. Each read takes a turn among the process's queries (api/ratelimit.py); none
    is held while the stream waits or sends, however slow its client."""
    limiter: ReadLimiter = state.read_limiter
    stopping: asyncio.Event = state.stopping
    FEED_CONSUMERS.labels("stream").inc()
    try:
        sent = time.monotonic()  # when the client last heard from the stream
        while not stopping.is_set():
            try:
                async with limiter.slot():
                    page, more = await read_feed(pool, cursor, STREAM_PAGE, where)
            except Overloaded:
                return  # the process is flooded with queries: end here, the client resumes from its id
            for item in page.items:
                yield ServerSentEventMessage(data=msgspec.json.encode(item).decode(), id=item.cursor)
            FEED_EVENTS.labels("stream").inc(len(page.items))
            cursor = Position.parse(page.next_cursor)
            if page.items:
                sent = time.monotonic()
            if more:
                continue
            idle = time.monotonic() - sent
            if idle >= heartbeat:
                yield ServerSentEventMessage(data=None, id=cursor.token(), comment="keepalive")
                sent = time.monotonic()
                continue
            await _wait_for_events(state, min(heartbeat - idle, POLL_SECONDS))
    finally:
        FEED_CONSUMERS.labels("stream").dec()
