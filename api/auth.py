"""Who is calling: bearer secrets, clients and their scopes.

A client (``clients``) is a named caller with scopes and, optionally, an asset allowlist and a rate
limit; it holds one or two live secrets (``client_secrets``, two only while rotating), created by
``tally keys`` (api/keys.py). A secret reads ``tally_sk_<id>_<random>``: the prefix lets secret
scanners find a leaked one, ``<id>`` finds its row, and only the SHA-256 of the whole secret is
stored (256 random bits need no slow hash); the comparison is constant-time.

Every request but the open ones (``/health/*``, and the docs unless ``TALLY_DOCS_PUBLIC=false``)
passes ``BearerAuthentication``, which puts the caller's ``Principal`` on the request (or answers
401), checks its rate limit (429), then the route's scope (``require_scope``: ``opt={"scope": ...}``;
a route that names none needs ``admin``; else 403). What a secret resolves to is cached for
``CACHE_SECONDS`` per process, so a revoked secret fails on every process within that time; an
expiry is checked on every request.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Any, Final

from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware._utils import should_bypass_middleware
from litestar.middleware.authentication import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import Receive, Scope, Send

from commands.errors import Overloaded
from projections.reader import Reader

ADMIN: Final = "admin"
# Every scope a client can hold; `admin` is every scope, present and future.
SCOPES: Final = (
    "assets:write", "wallets:write", "credits:top-up", "credits:bonus", "credits:spend",
    "credits:reverse", "holds:write", "ledger:read", "events:read", "webhooks:manage", "metrics:read",
    ADMIN,
)  # fmt: skip

SECRET_PREFIX: Final = "tally_sk_"  # noqa: S105 (a prefix, not a secret)
_SECRET: Final = re.compile(r"tally_sk_([0-9a-f]{16})_[A-Za-z0-9_-]{43}")
CACHE_SECONDS: Final = 2.0
# The event stream (api/feed.py) lasts as long as its client: it takes a query's turn for each of its
# reads rather than for its whole life.
STREAM_PATH: Final = "/v1/events/stream"
_CACHE_LIMIT: Final = 10_000

_LOOKUP: Final = """
SELECT c.client_id::text AS client_id, c.name, c.scopes, c.assets, c.rate_limit, s.secret_hash,
       c.revoked_at IS NOT NULL AS revoked,
       extract(epoch FROM least(c.expires_at, s.expires_at))::float8 AS expires_at
  FROM client_secrets s JOIN clients c USING (client_id)
 WHERE s.secret_id = $1
"""


class Unauthenticated(Exception):
    """401: no secret, or one that is unknown, revoked or expired."""

    code = "unauthenticated"


class Forbidden(Exception):
    """403: the secret is good but its client may not do this; ``extra`` names the scope or asset."""

    code = "forbidden"

    def __init__(self, detail: str, **extra: str) -> None:
        super().__init__(detail)
        self.extra = extra


def secret_hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode()).digest()


def secret_id_of(secret: str) -> str | None:
    """The ``<id>`` part of a well-formed secret, or None."""
    match = _SECRET.fullmatch(secret)
    return match.group(1) if match else None


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the client behind the secret."""

    client_id: str
    name: str
    scopes: frozenset[str]
    assets: frozenset[str] | None  # None: every asset
    rate_limit: int | None  # requests per second; None: the default (TALLY_RATE_LIMIT)
    expires_at: float | None  # the secret's or the client's end, whichever comes first

    def allows(self, scope: str) -> bool:
        return ADMIN in self.scopes or scope in self.scopes

    def require_asset(self, asset: str) -> None:
        if self.assets is not None and asset not in self.assets:
            raise Forbidden(f"this key may not use asset {asset}", asset=asset)


class Authenticator:
    """Resolves ``Authorization: Bearer <secret>`` to a Principal, with a short per-process cache."""

    def __init__(
        self, pool: Reader, *, cache_seconds: float = CACHE_SECONDS, timeout: float = 5.0, lookups: int = 2
    ) -> None:
        self._pool = pool
        self._cache_seconds = cache_seconds
        # Lookups of secrets not in the cache share a few connections, at most ``lookups`` at once
        # (waiting at most ``timeout``: then Overloaded), and one lookup per secret: a flood of
        # made-up keys cannot take the connections commands need.
        self._timeout = timeout
        self._lookups = asyncio.Semaphore(lookups)
        self._resolving: dict[bytes, asyncio.Task[Principal | None]] = {}
        # Known secrets, and (apart, so a flood of unknown ones cannot evict them) unknown ones.
        self._known: dict[bytes, tuple[float, Principal]] = {}
        self._unknown: dict[bytes, float] = {}

    async def authenticate(self, authorization: str | None) -> Principal:
        if authorization is None:
            raise Unauthenticated("this request needs an API key: Authorization: Bearer <secret>")
        scheme, _, secret = authorization.partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthenticated("the Authorization header must be: Bearer <secret>")
        principal = await self._resolve(secret)
        if principal is None or (principal.expires_at is not None and principal.expires_at <= time.time()):
            raise Unauthenticated("this API key is unknown, revoked or expired")
        return principal

    async def _resolve(self, secret: str) -> Principal | None:
        secret_id = secret_id_of(secret)
        if secret_id is None:
            return None
        digest = secret_hash(secret)
        now = time.monotonic()
        known = self._known.get(digest)
        if known is not None and now - known[0] < self._cache_seconds:
            return known[1]
        unknown = self._unknown.get(digest)
        if unknown is not None and now - unknown < self._cache_seconds:
            return None
        # One lookup per secret at a time, in a task of its own: every request with that secret
        # awaits it, and none of them cancelling (a caller going away) cancels it for the others.
        lookup = self._resolving.get(digest)
        if lookup is None:
            lookup = asyncio.create_task(self._lookup(secret_id, digest, now))
            self._resolving[digest] = lookup
            lookup.add_done_callback(lambda _: self._resolving.pop(digest, None))
        return await asyncio.shield(lookup)

    async def _lookup(self, secret_id: str, digest: bytes, now: float) -> Principal | None:
        try:
            async with asyncio.timeout(self._timeout):
                await self._lookups.acquire()
        except TimeoutError:
            raise Overloaded(f"key checks stayed busy for {self._timeout:g} s") from None
        try:
            row = await self._pool.fetchrow(_LOOKUP, secret_id)
        finally:
            self._lookups.release()
        principal = None
        if row is not None and hmac.compare_digest(bytes(row["secret_hash"]), digest) and not row["revoked"]:
            principal = Principal(
                client_id=row["client_id"],
                name=row["name"],
                scopes=frozenset(row["scopes"]),
                assets=None if row["assets"] is None else frozenset(row["assets"]),
                rate_limit=row["rate_limit"],
                expires_at=row["expires_at"],
            )
        if principal is None:
            if len(self._unknown) >= _CACHE_LIMIT:
                self._unknown.clear()
            self._unknown[digest] = now
            self._known.pop(digest, None)
        else:
            if len(self._known) >= _CACHE_LIMIT:
                self._known.clear()
            self._known[digest] = (now, principal)
            self._unknown.pop(digest, None)
        return principal


class BearerAuthentication(AbstractAuthenticationMiddleware):
    """Every request but the open ones: the caller's Principal on ``request.user`` (or 401), its
    rate limit (or 429), the route's scope (or 403), and, for a query, its turn among the process's
    queries (api/ratelimit.py, ReadLimiter), held while the query runs.

    One middleware, not a guard and a second middleware: measured with callgrind (instructions per
    GET /v1/wallets/{user_id} through the app, repeatable to 0.1 %), the scope guard cost 9 % of
    the request (Litestar copies the route handler for every guard call) and the read-turn
    middleware 5 %."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if should_bypass_middleware(
            exclude_http_methods=self.exclude_http_methods,
            exclude_opt_key=self.exclude_opt_key,
            exclude_path_pattern=self.exclude,
            scope=scope,
            scopes=self.scopes,
        ):
            await self.app(scope, receive, send)
            return
        result = await self.authenticate_request(ASGIConnection(scope))
        principal: Principal = result.user
        scope["user"] = principal
        scope["auth"] = None
        path: str = scope["path"]
        if not path.startswith("/docs"):  # TALLY_DOCS_PUBLIC=false: any valid key may read the docs
            require_scope(principal, scope["route_handler"])
        if (
            scope["type"] == ScopeType.HTTP
            and scope["method"] == "GET"
            and path.startswith("/v1/")
            and path != STREAM_PATH  # a stream takes a turn for each of its reads (api/feed.py)
        ):
            async with scope["litestar_app"].state.read_limiter.slot():
                await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def authenticate_request(
        self, connection: ASGIConnection[Any, Any, Any, Any]
    ) -> AuthenticationResult:
        authenticator: Authenticator = connection.app.state.authenticator
        principal = await authenticator.authenticate(connection.headers.get("authorization"))
        limiter = connection.app.state.rate_limiter
        await limiter.check(principal)
        return AuthenticationResult(user=principal, auth=None)


def route_scopes(handler: BaseRouteHandler) -> tuple[str, ...]:
    """The scopes a route needs, any one of them: its ``opt["scope"]`` (or, for a route whose
    requests check each part's scope, ``opt["scopes_any"]``); ``admin`` when it names none (closed
    by default)."""
    scopes = handler.opt.get("scopes_any") or (handler.opt.get("scope", ADMIN),)
    assert all(scope in SCOPES for scope in scopes), f"{handler} names an unknown scope in {scopes!r}"
    return tuple(scopes)


def require_scope(principal: Principal, handler: BaseRouteHandler) -> None:
    """The caller's client must hold the route's scope (or ``admin``), else 403."""
    scopes = route_scopes(handler)
    if not any(principal.allows(scope) for scope in scopes):
        if len(scopes) == 1:
            raise Forbidden(f"this key lacks the scope {scopes[0]}", scope=scopes[0])
        raise Forbidden(f"this key lacks every one of the scopes {', '.join(scopes)}", scope=" ".join(scopes))


def scoped_any(*scopes: str) -> dict[str, Any]:
    """A route any of whose ``scopes`` lets a caller in; the handler then checks each part of the
    request against its own scope (POST /v1/batches: each command's kind)."""
    assert all(scope in SCOPES for scope in scopes)
    return {"opt": {"scopes_any": scopes}}


def scoped(scope: str) -> dict[str, Any]:
    """A route's scope, as keyword arguments for its decorator: the guard reads ``opt``, and the
    OpenAPI description says it."""
    assert scope in SCOPES
    return {
        "opt": {"scope": scope},
        "description": f"Needs an API key with the scope `{scope}` (or `admin`).",
    }
