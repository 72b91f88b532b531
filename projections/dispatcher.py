"""The webhook dispatcher: delivers the event feed to every subscription, signed, until acknowledged.

It runs beside the projector (`tally projector`, or the projector of `tally serve --projector`),
one active per database: it holds a session advisory lock on its own listening connection, and
standbys take over when that connection goes away. Its state lives in the database
(webhook_deliveries), so a dispatcher that dies mid-delivery leaves that delivery pending and the
next one sends it again: at least once, never skipped (receivers de-duplicate by `webhook-id`,
the event's id).

Each round, for every live subscription, the events after its cursor that it wants (the feed's
order and filters, its client's asset allowlist: projections/feed.py) become pending deliveries,
and the cursor moves past them, in one transaction. Each subscription then has its own sender
task, so a slow or dead endpoint never holds up another: it sends, at most SEND_CONCURRENCY at a
time, each wallet's earliest pending delivery only (a wallet's events arrive in order: one is not
sent before the previous one was acknowledged). A 2xx acknowledges; anything else, or no answer
within TALLY_WEBHOOK_TIMEOUT, is retried with exponential backoff and jitter, from
TALLY_WEBHOOK_BACKOFF seconds up to an hour; a failed attempt TALLY_WEBHOOK_RETRY_SECONDS after
the delivery was enqueued parks it (its failures stay visible in GET /v1/webhooks/{id}/deliveries),
and the wallet's next event goes (so a wallet's backlog to a dead endpoint drains after the
period, one attempt each, rather than a period each).

Whatever an attempt meets (a refused address, a malformed URL, a receiver that trickles its answer)
is that attempt's failure, bounded by the timeout as a whole: nothing one subscription does stops
the dispatcher or another subscription's sender. A replay (projections/webhooks.py) sets
deliveries pending again with a new `enqueued_at`; an attempt begun before records its outcome only
if that still matches, so a replayed delivery is never taken for acknowledged by an older answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Final

import asyncpg
import httpx

from commands.errors import is_transient
from projections.feed import FeedEvent, FeedFilter, event_of, read_feed
from projections.positions import Position
from projections.projector import EVENTS_CHANNEL, PROGRESS_CHANNEL, SingleActive, wait_any
from projections.webhooks import HostPolicy, UrlNotAllowed, backoff, delivery_body, derive_secret, now, sign

log = logging.getLogger("tally.dispatcher")

DISPATCHER_LOCK_KEY: Final = 0x7A11_0003
SEND_CONCURRENCY: Final = 8  # deliveries in flight per subscription
ENQUEUE_PAGE: Final = 1000
DUE_BATCH: Final = 64
MIN_ROUND_INTERVAL: Final = 0.02

# A subscription is live while it is not deleted and its client is neither revoked nor expired.
_LIVE_CLIENT = "c.revoked_at IS NULL AND (c.expires_at IS NULL OR c.expires_at > now())"
_LIVE = f"""
SELECT w.webhook_id, w.cursor_xid::text AS xid, w.cursor_position, h.xid AS head_xid,
       h.global_position AS head
  FROM webhooks w JOIN clients c USING (client_id)
  LEFT JOIN (SELECT writer_xid::text AS xid, global_position FROM events
              WHERE writer_xid < tally_finished_below()
              ORDER BY writer_xid DESC, global_position DESC LIMIT 1) h ON true
 WHERE w.deleted_at IS NULL AND {_LIVE_CLIENT}
"""
_SUBSCRIPTION = f"""
SELECT w.cursor_xid::text AS xid, w.cursor_position, w.types, c.assets
  FROM webhooks w JOIN clients c USING (client_id)
 WHERE w.webhook_id = $1 AND w.deleted_at IS NULL AND {_LIVE_CLIENT}
   FOR UPDATE OF w
"""
_ENQUEUE = """
INSERT INTO webhook_deliveries (webhook_id, writer_xid, global_position, event_id, stream_id, status)
SELECT $1, x::xid8, p, e, s, 'pending'
  FROM unnest($2::text[], $3::bigint[], $4::uuid[], $5::text[]) AS u(x, p, e, s)
ON CONFLICT DO NOTHING
"""
_ADVANCE = "UPDATE webhooks SET cursor_xid = $2::text::xid8, cursor_position = $3 WHERE webhook_id = $1"
# Each wallet's earliest pending delivery (only it may be sent), soonest due first: among those up
# to the subscription's enqueue cursor only, where every earlier event of the wallet is enqueued
# (a replay moves the cursor back: what lies beyond waits until the enqueuing has caught up, lest a
# wallet's later event go before an earlier one not enqueued again yet).
_HEADS = """
SELECT h.writer_xid::text AS xid, h.global_position, h.stream_id, h.enqueued_at, h.attempts,
       extract(epoch FROM h.next_attempt_at - now())::float8 AS due_in
  FROM (SELECT DISTINCT ON (stream_id) * FROM webhook_deliveries
         WHERE webhook_id = $1 AND status = 'pending'
         ORDER BY stream_id, writer_xid, global_position) h,
       webhooks w
 WHERE w.webhook_id = $1 AND (h.writer_xid, h.global_position) <= (w.cursor_xid, w.cursor_position)
 ORDER BY h.next_attempt_at, h.writer_xid, h.global_position
 LIMIT $2
"""
_TARGET = f"""
SELECT w.url, w.deleted_at IS NULL AND {_LIVE_CLIENT} AS live,
       array_agg(s.salt ORDER BY s.created_at DESC) AS salts
  FROM webhooks w JOIN clients c USING (client_id)
  JOIN webhook_secrets s ON s.webhook_id = w.webhook_id AND (s.expires_at IS NULL OR s.expires_at > now())
 WHERE w.webhook_id = $1
 GROUP BY w.url, w.deleted_at, c.revoked_at, c.expires_at
"""
# Still the wallet's earliest pending delivery, of the same generation, right before it is sent.
_STILL_HEAD = """
SELECT EXISTS (SELECT 1 FROM webhook_deliveries d JOIN webhooks w USING (webhook_id)
                WHERE d.webhook_id = $1 AND d.writer_xid = $2::text::xid8 AND d.global_position = $3
                  AND d.status = 'pending' AND d.enqueued_at = $5
                  AND (d.writer_xid, d.global_position) <= (w.cursor_xid, w.cursor_position))
   AND NOT EXISTS (SELECT 1 FROM webhook_deliveries
                    WHERE webhook_id = $1 AND stream_id = $4 AND status = 'pending'
                      AND (writer_xid, global_position) < ($2::text::xid8, $3))
"""
_EVENT = """
SELECT writer_xid::text AS writer_xid, global_position, event_id::text AS event_id, event_type, stream_id,
       stream_version, recorded_at, data::text AS data
  FROM events WHERE global_position = $1
"""
# An attempt's outcome, if its delivery is still pending in the generation it was sent in. The next
# attempt and the retry period count on the database's clock (that of enqueued_at), from the end of
# this attempt. Each statement locks one row only: the subscription's counters are a statement of
# their own (_COUNT), so that no transaction holds a delivery and waits for the subscription's row
# while a replay or an enqueue holds that row and waits for the delivery (a deadlock, found in
# review).
_DELIVERED = """
UPDATE webhook_deliveries
   SET status = 'delivered', attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, $4),
       last_attempt_at = $4, last_status = $5, last_error = NULL, delivered_at = clock_timestamp()
 WHERE webhook_id = $1 AND writer_xid = $2::text::xid8 AND global_position = $3 AND status = 'pending'
   AND enqueued_at = $6
RETURNING status
"""
_FAILED = """
UPDATE webhook_deliveries
   SET attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, $4), last_attempt_at = $4,
       last_status = $5, last_error = $6, next_attempt_at = clock_timestamp() + $7::interval,
       status = CASE WHEN clock_timestamp() - enqueued_at >= make_interval(secs => $8) THEN 'parked'
                     ELSE 'pending' END
 WHERE webhook_id = $1 AND writer_xid = $2::text::xid8 AND global_position = $3 AND status = 'pending'
   AND enqueued_at = $9
RETURNING status
"""
_COUNT = "UPDATE webhooks SET attempts = attempts + 1, failures = failures + $2 WHERE webhook_id = $1"
# Pages of events enqueued per subscription per round: a replay of a long history does not hold up
# the other subscriptions' enqueuing (it goes on next round).
ENQUEUE_PAGES_PER_ROUND: Final = 20


@dataclass(frozen=True, slots=True)
class DispatchSettings:
    key: bytes  # TALLY_WEBHOOK_KEY: the signing secrets derive from it
    policy: HostPolicy
    timeout: float  # seconds a receiver has to answer
    retry_seconds: float  # how long a delivery is retried before it is parked
    first_backoff: float  # seconds before the first retry; doubling, with jitter, up to an hour
    poll_interval: float


@dataclass(frozen=True, slots=True)
class _Head:
    position: Position
    stream_id: str
    generation: datetime  # its enqueued_at: a replay gives it a new one
    attempts: int
    due_in: float


class Dispatcher(SingleActive):
    """Runs until ``stop`` is set (one active per database: projections.projector.SingleActive)."""

    role = "dispatcher"
    lock_key = DISPATCHER_LOCK_KEY

    def __init__(self, pool: asyncpg.Pool, url: str, settings: DispatchSettings) -> None:
        super().__init__(url, settings.poll_interval)
        self._pool = pool
        self._settings = settings
        self._wake = asyncio.Event()
        self._enqueued = asyncio.Event()

    async def _run_connected(self, stop: asyncio.Event) -> None:
        listener = await asyncpg.connect(
            self._url, server_settings={"application_name": self.application_name}
        )
        senders: dict[uuid.UUID, asyncio.Task[None]] = {}
        # No pool limit: a dead endpoint's attempts (at most SEND_CONCURRENCY, each bounded by the
        # timeout) never wait for connections another subscription needs; no proxy from the
        # environment; redirects are not followed (a 3xx is a failed attempt).
        http = httpx.AsyncClient(
            timeout=self._settings.timeout, follow_redirects=False, trust_env=False,
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=64),
        )  # fmt: skip
        try:
            for channel in (EVENTS_CHANNEL, PROGRESS_CHANNEL):
                await listener.add_listener(channel, lambda *_: self._wake.set())
            if not await self._become_active(listener, stop):
                return
            while not stop.is_set():
                if listener.is_closed():
                    raise asyncpg.InterfaceError("the listening connection closed")
                self._wake.clear()
                await self._round(senders, http, stop)
                self._enqueued.set()
                self._enqueued = asyncio.Event()
                await asyncio.sleep(MIN_ROUND_INTERVAL)
                await wait_any(self._wake, stop, self._settings.poll_interval)
        finally:
            for task in senders.values():
                task.cancel()
            await asyncio.gather(*senders.values(), return_exceptions=True)
            await http.aclose()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(listener.close(), 2)

    async def _round(
        self, senders: dict[uuid.UUID, asyncio.Task[None]], http: httpx.AsyncClient, stop: asyncio.Event
    ) -> None:
        """Enqueue what each live subscription has not yet (those behind the feed's head), and keep
        one sender running per live subscription: one that failed is logged and started again."""
        rows = await self._pool.fetch(_LIVE)
        live = [uuid.UUID(str(r["webhook_id"])) for r in rows]
        for row in rows:
            cursor = Position(int(row["xid"]), row["cursor_position"])
            if stop.is_set() or row["head"] is None or cursor >= Position(int(row["head_xid"]), row["head"]):
                continue
            try:
                await self._enqueue(uuid.UUID(str(row["webhook_id"])))
            except Exception as exc:
                if is_transient(exc):
                    raise  # the database is away: reconnect
                log.exception("webhook %s: enqueuing failed; trying again next round", row["webhook_id"])
        for webhook_id in set(senders) - set(live):
            senders.pop(webhook_id).cancel()
        for webhook_id in live:
            task = senders.get(webhook_id)
            if task is not None and task.done():
                failure = None if task.cancelled() else task.exception()
                if failure is not None and is_transient(failure):
                    raise failure  # the database is away: reconnect, as for any round
                if failure is not None:
                    log.error("webhook %s: its sender failed (%r); starting it again", webhook_id, failure)
                task = None
            if task is None:
                senders[webhook_id] = asyncio.create_task(self._sender(webhook_id, http, stop))

    async def _enqueue(self, webhook_id: uuid.UUID) -> None:
        """The subscription's next events become its pending deliveries, its cursor past them."""
        more, pages = True, 0
        while more and pages < ENQUEUE_PAGES_PER_ROUND:
            pages += 1
            async with self._pool.acquire() as conn, conn.transaction():
                row = await conn.fetchrow(_SUBSCRIPTION, webhook_id)
                if row is None:
                    return
                where = FeedFilter(
                    types=None if row["types"] is None else tuple(row["types"]),
                    assets=None if row["assets"] is None else tuple(row["assets"]),
                )
                after = Position(int(row["xid"]), row["cursor_position"])
                page, more = await read_feed(conn, after, ENQUEUE_PAGE, where)
                if page.items:
                    positions = [Position.parse(item.cursor) for item in page.items]
                    await conn.execute(
                        _ENQUEUE, webhook_id, [str(p.xid) for p in positions],
                        [p.position for p in positions],
                        [uuid.UUID(i.event_id) for i in page.items], [i.stream_id for i in page.items],
                    )  # fmt: skip
                cursor = Position.parse(page.next_cursor)
                if cursor != after:
                    await conn.execute(_ADVANCE, webhook_id, str(cursor.xid), cursor.position)

    async def _sender(self, webhook_id: uuid.UUID, http: httpx.AsyncClient, stop: asyncio.Event) -> None:
        slots = asyncio.Semaphore(SEND_CONCURRENCY)
        while not stop.is_set():
            heads = [
                _Head(
                    Position(int(r["xid"]), r["global_position"]),
                    r["stream_id"],
                    r["enqueued_at"],
                    r["attempts"],
                    r["due_in"],
                )
                for r in await self._pool.fetch(_HEADS, webhook_id, DUE_BATCH)
            ]
            due = [head for head in heads if head.due_in <= 0]
            if due:
                target = await self._pool.fetchrow(_TARGET, webhook_id)
                if target is None or not target["live"]:
                    return
                secrets = [derive_secret(self._settings.key, bytes(salt)) for salt in target["salts"]]

                async def one(head: _Head, url: str = target["url"], secrets: list[str] = secrets) -> None:
                    async with slots:
                        await self._deliver(webhook_id, head, url, secrets, http)

                # A task group: when one fails (its database statement), the others stop too, and
                # none outlives this sender (which is started again, or reconnects).
                try:
                    async with asyncio.TaskGroup() as group:
                        for head in due:
                            group.create_task(one(head))
                except* Exception as failed:
                    raise failed.exceptions[0] from None
                continue
            enqueued = self._enqueued
            later = min((head.due_in for head in heads), default=self._settings.poll_interval)
            await wait_any(enqueued, stop, max(MIN_ROUND_INTERVAL, min(later, self._settings.poll_interval)))

    async def _deliver(
        self, webhook_id: uuid.UUID, head: _Head, url: str, secrets: list[str], http: httpx.AsyncClient
    ) -> None:
        position = head.position
        still = await self._pool.fetchval(
            _STILL_HEAD, webhook_id, str(position.xid), position.position, head.stream_id, head.generation
        )
        row = await self._pool.fetchrow(_EVENT, position.position)
        if not still or row is None:  # replayed or changed meanwhile: the next round sees it anew
            return
        event: FeedEvent = event_of(row)
        body = delivery_body(event)
        at = now()
        status, error = await self._attempt(http, url, secrets, event.event_id, at, body)
        if error is None:
            outcome = await self._pool.fetchval(
                _DELIVERED, webhook_id, str(position.xid), position.position, at, status, head.generation
            )
        else:
            delay = backoff(head.attempts + 1, self._settings.first_backoff)
            outcome = await self._pool.fetchval(
                _FAILED, webhook_id, str(position.xid), position.position, at, status, error[:500], delay,
                self._settings.retry_seconds, head.generation,
            )  # fmt: skip
        if outcome is not None:  # recorded (an attempt overtaken by a replay is not counted)
            await self._pool.execute(_COUNT, webhook_id, 0 if error is None else 1)
        if outcome == "parked":
            log.warning("webhook %s: parked the delivery of event %s (%s)", webhook_id, event.event_id, error)

    async def _attempt(
        self, http: httpx.AsyncClient, url: str, secrets: list[str], message_id: str, at: datetime, body: str
    ) -> tuple[int | None, str | None]:
        """One POST, bounded by the timeout as a whole (the address check, connecting, the answer's
        status; its body is not read): (status, None) on a 2xx, else (status or None, why)."""
        headers = {**sign(secrets, message_id, at, body), "content-type": "application/json"}
        try:
            async with asyncio.timeout(self._settings.timeout):
                await self._settings.policy.check(url)
                async with http.stream("POST", url, content=body, headers=headers) as response:
                    status = response.status_code
        except TimeoutError:
            return None, f"no answer within {self._settings.timeout:g} s"
        except UrlNotAllowed as exc:
            return None, str(exc)
        except Exception as exc:  # whatever else the attempt met is its failure, never the dispatcher's
            return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        return (status, None) if 200 <= status < 300 else (status, f"answered {status}")
