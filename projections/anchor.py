"""Anchors: tamper evidence that does not rest on the database.

Every event hashes its stream's previous hash (``tally verify`` recomputes the chains), so editing
one event breaks its chain. But whoever controls the database can rewrite a stream and re-hash it
end to end, or delete a stream or the tail of one, together with everything derived from it: the
chains then hold again. ``tally anchor`` writes a small statement, kept *outside* the database,
that commits to every stream's head (its version and hash) at one moment: the position, the time,
the heads, and one digest of them, with an HMAC when ``TALLY_ANCHOR_KEY`` (a key kept outside the
database too) is set. ``tally verify --anchor FILE`` then proves that every anchored head is still
in the history with the same hash; the chain check proves that everything before it is too. A
stream rewritten, deleted or cut short is named, with the anchored version.

The heads are read from the events themselves (not the streams table), in one read-only
REPEATABLE READ snapshot.
"""

from __future__ import annotations

import hashlib
import hmac
from datetime import UTC, datetime
from typing import Final

import asyncpg
import msgspec

FORMAT: Final = "tally-anchor/1"

_HEADS = """
SELECT DISTINCT ON (stream_id) stream_id, stream_version, encode(hash, 'hex') AS hash
  FROM events ORDER BY stream_id, stream_version DESC
"""
_POSITION = "SELECT coalesce(max(global_position), 0) FROM events"
# Each anchored head, against the history: the event at that version, and the stream's head now.
_COMPARE = """
SELECT h.stream_id, h.version, h.hash AS anchored, encode(e.hash, 'hex') AS found,
       (SELECT max(x.stream_version) FROM events x WHERE x.stream_id = h.stream_id) AS head_now
  FROM unnest($1::text[], $2::bigint[], $3::text[]) AS h(stream_id, version, hash)
  LEFT JOIN events e ON e.stream_id = h.stream_id AND e.stream_version = h.version
 WHERE e.hash IS NULL OR encode(e.hash, 'hex') <> h.hash
 ORDER BY h.stream_id
"""


class Statement(msgspec.Struct, frozen=True, kw_only=True):
    """What an anchor commits to; its canonical bytes are what the digest and the HMAC cover."""

    format: str
    position: int
    created_at: str
    heads: dict[str, tuple[int, str]]  # stream id -> (version, hash in hex), in stream id order


class Anchor(msgspec.Struct, frozen=True, kw_only=True):
    format: str
    position: int
    created_at: str
    streams: int
    heads: dict[str, tuple[int, str]]
    digest: str
    hmac: str | None = None

    @property
    def statement(self) -> Statement:
        return Statement(
            format=self.format, position=self.position, created_at=self.created_at, heads=self.heads
        )


class AnchorProblem(msgspec.Struct, frozen=True, kw_only=True):
    """A head the history no longer holds as anchored, or an anchor that is not what it claims."""

    detail: str
    stream_id: str | None = None
    stream_version: int | None = None
    expected: str | None = None
    found: str | None = None


def canonical(statement: Statement) -> bytes:
    return msgspec.json.encode(statement, order="sorted")


def _mac(key: str, data: bytes) -> str:
    return hmac.new(key.encode(), data, hashlib.sha256).hexdigest()


async def make_anchor(conn: asyncpg.Connection, key: str | None = None) -> Anchor:
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        rows = await conn.fetch(_HEADS)
        position = await conn.fetchval(_POSITION)
    heads = {
        r["stream_id"]: (r["stream_version"], r["hash"]) for r in sorted(rows, key=lambda r: r["stream_id"])
    }
    statement = Statement(
        format=FORMAT,
        position=position,
        created_at=datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z"),
        heads=heads,
    )
    data = canonical(statement)
    return Anchor(
        format=FORMAT,
        position=position,
        created_at=statement.created_at,
        streams=len(heads),
        heads=heads,
        digest=hashlib.sha256(data).hexdigest(),
        hmac=None if key is None else _mac(key, data),
    )


def load_anchor(raw: bytes) -> Anchor:
    """An anchor file's content; ValueError when it is not one."""
    try:
        anchor = msgspec.json.decode(raw, type=Anchor)
    except msgspec.DecodeError as exc:  # ValidationError included
        raise ValueError(f"not a Tally anchor: {exc}") from None
    if anchor.format != FORMAT:
        raise ValueError(f"not a Tally anchor: format {anchor.format!r}, expected {FORMAT!r}")
    return anchor


_EDITED: Final = "the anchor's digest does not match its content: the file was edited"
_UNSIGNED: Final = (
    "the anchor has no HMAC though TALLY_ANCHOR_KEY is set: it cannot be told from a forged one"
)
_FORGED: Final = "the anchor's HMAC does not match: forged or edited, or made with another TALLY_ANCHOR_KEY"
_UNCHECKED: Final = "the anchor has an HMAC: set TALLY_ANCHOR_KEY to check it"


def _integrity(anchor: Anchor, key: str | None) -> list[AnchorProblem]:
    data = canonical(anchor.statement)
    digest = hashlib.sha256(data).hexdigest()
    problems = []
    if digest != anchor.digest:
        problems.append(AnchorProblem(detail=_EDITED, expected=anchor.digest, found=digest))
    if key is None:
        if anchor.hmac is not None:
            problems.append(AnchorProblem(detail=_UNCHECKED))
    elif anchor.hmac is None:
        problems.append(AnchorProblem(detail=_UNSIGNED))
    elif not hmac.compare_digest(_mac(key, data), anchor.hmac):
        problems.append(AnchorProblem(detail=_FORGED))
    return problems


async def check_anchor(conn: asyncpg.Connection, anchor: Anchor, key: str | None) -> list[AnchorProblem]:
    """Every way the history (as ``conn`` sees it) or the anchor itself disagrees with the anchor."""
    problems = _integrity(anchor, key)
    streams = list(anchor.heads)
    rows = await conn.fetch(
        _COMPARE,
        streams,
        [anchor.heads[s][0] for s in streams],
        [anchor.heads[s][1] for s in streams],
    )
    for row in rows:
        if row["head_now"] is None:
            detail, found = "an anchored stream is gone from the history", "no events"
        elif row["found"] is None:
            detail, found = (
                "the anchored head is gone: the stream's tail was removed",
                f"head at version {row['head_now']}",
            )
        else:
            detail, found = "the anchored head's hash differs: the stream was rewritten", row["found"]
        problems.append(
            AnchorProblem(
                detail=detail,
                stream_id=row["stream_id"],
                stream_version=row["version"],
                expected=row["anchored"],
                found=found,
            )
        )
    return problems
