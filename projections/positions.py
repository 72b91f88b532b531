"""Positions in the commit-ordered event log, and the consistency tokens that carry them."""

from __future__ import annotations

from typing import NamedTuple


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
        return cls(int(xid), int(position))

    def token(self) -> str:
        return f"{self.xid}.{self.position}"


ORIGIN = Position(0, 0)
