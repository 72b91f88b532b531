"""The event feed (GET /v1/events, and GET /v1/events/stream as Server-Sent Events).

Every event, in the order the projections read them: events of finished transactions only, by
(writer_xid, global_position) (projections/sql/tally_next_events.sql). Positions are drawn at
insert, not at commit, so a feed by position alone would skip, forever, an event committed after
a later-numbered one was served; this order cannot: an event enters it only once every
transaction that could still sort before it has finished. Each wallet's events come in version
order (commands/sql/tally_writer_xid.sql, tally_stream_writer_xid).

A cursor is a place in that order, ``"<writer_xid>.<global_position>"``: valid forever, since events
and their writer_xids never change. A command's consistency token has that form and serves as a
cursor too: what follows it, and, if older transactions were still running when it was taken,
their events and what followed them from just before them (at least once; read_feed).

A page with filters examines at most ``SCAN_WINDOW`` events, and its ``next_cursor`` moves past
those it examined, matching or not: a consumer of a rare event type pages through a
long history in steps, never by reading it all in one query.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Final

import asyncpg
import msgspec

from projections.positions import MAX_POSITION, Position
from projections.reader import Reader

SCAN_WINDOW: Final = 10_000

# The window of events after the cursor, the first `limit` of them that match, where the window
# ended and how many it held (the row with `tail`), and the reader's frontier (every row; the only
# one's when nothing was read). An event's asset: its data's `asset`, an asset
# definition's `code`, none for a wallet's opening (shown to every key that may read the feed).
_PAGE: Final = """
WITH scanned AS MATERIALIZED (
    SELECT writer_xid, global_position, event_id, event_type, stream_id, stream_version, recorded_at, data
      FROM events
     WHERE writer_xid < tally_finished_below()
       AND (writer_xid, global_position) > ($1::text::xid8, $2::bigint)
     ORDER BY writer_xid, global_position
     LIMIT $3),
hits AS (
    SELECT s.* FROM scanned s,
           LATERAL (SELECT coalesce(s.data ->> 'asset', CASE WHEN s.event_type = 'AssetDefined'
                                                              THEN s.data ->> 'code' END) AS asset) a
     WHERE ($5::text[] IS NULL OR s.event_type = ANY ($5))
       AND ($6::text IS NULL OR s.stream_id = $6)
       AND ($7::text[] IS NULL OR a.asset IS NULL OR a.asset = ANY ($7))
     ORDER BY s.writer_xid, s.global_position
     LIMIT $4)
SELECT f.frontier, tail, writer_xid::text AS writer_xid, global_position, event_id::text AS event_id,
       event_type, stream_id, stream_version, recorded_at, data::text AS data, scanned
  FROM (SELECT tally_finished_below()::text AS frontier) f
  LEFT JOIN (SELECT false AS tail, *, NULL::bigint AS scanned FROM hits
             UNION ALL
             (SELECT true, *, (SELECT count(*) FROM scanned) FROM scanned
               ORDER BY writer_xid DESC, global_position DESC LIMIT 1)) page ON true
 ORDER BY tail, page.writer_xid, global_position
"""


class FeedEvent(msgspec.Struct, frozen=True, kw_only=True):
    event_id: str
    type: str
    stream_id: str  # `wallet:<user_id>` or `asset:<CODE>`
    version: int  # the stream's version this event made
    cursor: str  # pass as `after` to read what follows this event
    recorded_at: datetime
    data: Annotated[
        msgspec.Raw,
        msgspec.Meta(
            description="The event's data, as stored (its fields depend on `type`).",
            extra_json_schema={"type": "object"},
        ),
    ]


class FeedPage(msgspec.Struct, frozen=True, kw_only=True):
    items: list[FeedEvent]
    next_cursor: str  # `after` for the next page; where this one stopped, even when it is empty


@dataclass(frozen=True, slots=True)
class FeedFilter:
    """Which events a consumer wants, and which it may see (``assets``: its key's allowlist)."""

    types: tuple[str, ...] | None = None
    stream_id: str | None = None
    assets: tuple[str, ...] | None = None

    @property
    def narrows(self) -> bool:
        return self.types is not None or self.stream_id is not None or self.assets is not None


def event_of(row: asyncpg.Record) -> FeedEvent:
    """A feed item from a row of events (columns as _PAGE selects them)."""
    return FeedEvent(
        event_id=row["event_id"],
        type=row["event_type"],
        stream_id=row["stream_id"],
        version=row["stream_version"],
        cursor=f"{row['writer_xid']}.{row['global_position']}",
        recorded_at=row["recorded_at"],
        data=msgspec.Raw(row["data"].encode()),
    )


async def read_feed(
    reader: Reader, after: Position, limit: int, where: FeedFilter = FeedFilter(), window: int = SCAN_WINDOW
) -> tuple[FeedPage, bool]:
    """The first ``limit`` events after ``after`` that ``where`` lets through, among at most
    ``window`` (or ``limit``, with no filter) examined; and whether more may follow already (the
    page or the window was full), else the page reached the newest event."""
    scan = max(window, limit) if where.narrows else limit
    rows = await reader.fetch(
        _PAGE, str(after.xid), after.position, scan, limit, where.types, where.stream_id, where.assets
    )
    items = [event_of(row) for row in rows if row["tail"] is False]
    tail = rows[-1] if rows[-1]["tail"] else None
    if len(items) == limit:
        next_cursor = items[-1].cursor
    elif tail is not None:
        next_cursor = f"{tail['writer_xid']}.{tail['global_position']}"
    else:
        # Nothing after the cursor yet. A cursor the feed gave is below the frontier; one that is not
        # (a consistency token, taken while older transactions still ran) would let their events,
        # which sort before it, go by unseen: the next page starts just below the frontier instead
        # (they come then, with what followed the token: at least once, never skipped).
        frontier = Position(max(0, int(rows[0]["frontier"]) - 1), MAX_POSITION)
        next_cursor = min(after, frontier).token()
    more = len(items) == limit or (tail is not None and tail["scanned"] == scan)
    return FeedPage(items=items, next_cursor=next_cursor), more
