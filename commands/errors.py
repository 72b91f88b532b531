"""Failures to decide, as opposed to decisions (domain/errors.py): the ledger could not be asked in
time. Neither says anything about the command's effect: it may have been applied (a batch that
committed as its connection died), so the caller retries with the same Idempotency-Key, which
replays it or applies it exactly once. The API answers both with 503 and Retry-After
(api/errors.py)."""

from __future__ import annotations

import asyncio

import asyncpg
import asyncpg.exceptions._base as asyncpg_base


class Unavailable(Exception):
    """The database is unreachable or too slow, or the command's wallet is locked by another
    session for longer than the lock timeout."""

    code = "unavailable"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


class Overloaded(Exception):
    """This process has more work queued than it accepts (commands), or every connection for
    queries stayed busy: the request was refused before it started."""

    code = "overloaded"

    def __init__(self, detail: str, *, retry_after: int = 1) -> None:
        super().__init__(detail)
        self.retry_after = retry_after


# SQLSTATE classes of errors that say nothing about the request: connection (08), transaction
# rollback such as deadlocks and serialization failures (40), insufficient resources (53), lock
# not available and object in use (55), operator intervention such as a restart or a statement
# timeout (57), system errors (58). Anything else is what a bug or a bad event looks like.
_TRANSIENT_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "55", "57", "58"})
LOCK_NOT_AVAILABLE = "55P03"
_CLIENT_MISTAKES = (
    asyncpg_base.DataError,
    asyncpg_base.ClientConfigurationError,
    asyncpg_base.UnsupportedClientFeatureError,
)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying later (the database was away, slow or busy); False for
    errors that would happen again."""
    # asyncpg's InterfaceError says mostly that a connection is gone ("connection is closed"), but
    # its subclasses also cover the client's own mistakes (an argument that does not fit its
    # parameter, a misconfiguration, an unsupported feature): those are bugs, not an absence.
    if isinstance(exc, _CLIENT_MISTAKES):
        return False
    # InternalClientError ("cannot switch to state …; another operation is in progress") is what a
    # pooled connection left mid-protocol by a server going away answers (seen restarting one under
    # load, tests/integration/test_faults.py): that connection is closed, not reused (close_broken).
    if isinstance(exc, OSError | TimeoutError | asyncio.TimeoutError | asyncpg.InterfaceError):
        return True
    if isinstance(exc, asyncpg_base.InternalClientError):
        return True
    sqlstate = getattr(exc, "sqlstate", None) or ""
    return sqlstate[:2] in _TRANSIENT_SQLSTATE_CLASSES


def describe(exc: BaseException) -> str:
    """What went wrong, for a 503's detail, without internals."""
    if getattr(exc, "sqlstate", None) == LOCK_NOT_AVAILABLE:
        return "a lock it needs is held by another transaction"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) or getattr(exc, "sqlstate", None) == "57014":
        return "the database did not answer in time"
    return "the database is not reachable"


def close_broken(conn: object, exc: BaseException) -> None:
    """A pooled connection whose statement ended in anything but an answer from the server (a lost
    or stalled connection, a timeout, a cancellation, a client-side protocol error) is closed
    rather than handed back for reuse: its protocol state is not to be trusted. The pool opens a
    fresh one when it needs it."""
    if not isinstance(exc, asyncpg.PostgresError) or isinstance(exc, asyncpg.PostgresConnectionError):
        terminate = getattr(conn, "terminate", None)
        if terminate is not None:
            terminate()
