"""Positions in the commit-ordered event log, and the consistency tokens that carry them."""

from __future__ import annotations

from typing import Final, NamedTuple

MAX_XID8: Final = 2**64 - 1  # xid8, an unsigned 64-bit number
MAX_POSITION: Final = 2**63 - 1  # global_position, a bigint


class Position(NamedTuple):
    """(writing transaction id, global position): the order projections apply events in."""

    xid: int
    position: int

    @classmethod
    def parse(cls, token: str) -> Position:
        """Parse a consistency token ``"<xid>.<position>"``; ValueError when it is not one."""
        xid, sep, position = token.partition(".")
        digits = xid.isascii() and xid.isdigit() and position.isascii() and position.isdigit()
        if not sep or not digits or len(token) > 41:
            raise ValueError(f"{token!r} is not a consistency token")
        parsed = cls(int(xid), int(position))
        if parsed.xid > MAX_XID8 or parsed.position > MAX_POSITION:
            raise ValueError(f"{token!r} is not a consistency token")
        return parsed

    def token(self) -> str:
        return f"{self.xid}.{self.position}"


ORIGIN = Position(0, 0)
