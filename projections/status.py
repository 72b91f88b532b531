"""Where each projection stands: checkpoint, generation, lag, and the event that stopped it."""

from __future__ import annotations

from datetime import datetime

import msgspec

from projections.reader import Reader

_STATUS = """
SELECT cp.name, cp.generation, cp.last_xid::text AS last_xid, cp.last_position, cp.events_applied,
       cp.updated_at, cp.rebuilt_at, cp.error, cp.error_position, cp.stopped_at,
       lag.events_behind, lag.seconds_behind, tally_history_ahead() AS restored
  FROM projection_checkpoints cp, tally_projection_lag(cp.name) lag
 ORDER BY cp.name
"""
_RESUME = """
UPDATE projection_checkpoints SET error = NULL, error_position = NULL, stopped_at = NULL
 WHERE name = $1 RETURNING name
"""


# Reported as every projection's error while it holds (commands/sql/tally_writer_xid.sql).
RESTORED = (
    "this database's transaction ids are behind the ids its events carry (restored from another "
    "cluster?): commands are refused and nothing new is projected until `tally migrate` runs"
)


class ProjectionStatus(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    generation: int
    checkpoint: str
    events_applied: int
    events_behind: int
    seconds_behind: float
    updated_at: datetime
    rebuilt_at: datetime | None
    error: str | None
    error_position: int | None
    stopped_at: datetime | None

    @property
    def running(self) -> bool:
        return self.error is None


async def projection_status(pool: Reader) -> list[ProjectionStatus]:
    return [
        ProjectionStatus(
            name=r["name"],
            generation=r["generation"],
            checkpoint=f"{r['last_xid']}.{r['last_position']}",
            events_applied=r["events_applied"],
            events_behind=r["events_behind"],
            seconds_behind=round(r["seconds_behind"], 3),
            updated_at=r["updated_at"],
            rebuilt_at=r["rebuilt_at"],
            error=RESTORED if r["restored"] and r["error"] is None else r["error"],
            error_position=r["error_position"],
            stopped_at=r["stopped_at"],
        )
        for r in await pool.fetch(_STATUS)
    ]


async def resume_projection(pool: Reader, name: str) -> bool:
    """Clear a projection's stop; the projector retries it on its next round. False if no such name."""
    return await pool.fetchval(_RESUME, name) is not None
