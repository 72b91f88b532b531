"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.auth import Authenticator, Unauthenticated, scoped
from api.observability import (
    POOL_CONNECTIONS,
    PROJECTION_LAG_EVENTS,
    PROJECTION_LAG_SECONDS,
    PROJECTION_STOPPED,
)
from api.settings import Settings
from projections.status import ProjectionStatus, projection_status

_DATABASE_TIMEOUT = 2.0


class CheckStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: str  # "ok" or "failing"
    detail: str | None = None
    events_behind: int | None = None
    seconds_behind: float | None = None


class Readiness(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: str  # "ready" or "unavailable"
    # Only for a key with the scope metrics:read: platform health checks send no key.
    checks: dict[str, CheckStatus] | None = None


# Open routes: the authentication middleware lets them through, and OpenAPI says they need no key.
_OPEN_OPT: dict[str, Any] = {"exclude_from_auth": True}


@get("/health/live", tags=["health"], summary="The process is up", opt=_OPEN_OPT, security=[{}])
async def health_live() -> dict[str, str]:
    return {"status": "ok"}


def _projection_check(status: ProjectionStatus, max_lag: float) -> CheckStatus:
    if status.error is not None:
        detail = f"stopped at position {status.error_position}: {status.error}"
    elif status.seconds_behind > max_lag:
        detail = f"{status.seconds_behind:.1f} s behind (more than {max_lag:g} s)"
    else:
        detail = None
    return CheckStatus(
        status="ok" if detail is None else "failing",
        detail=detail,
        events_behind=status.events_behind,
        seconds_behind=status.seconds_behind,
    )


@get(
    "/health/ready",
    tags=["health"],
    summary="The database answers and every projection is running within the allowed lag",
    description="Open to anyone; the checks' details only to a key with the scope `metrics:read`.",
    responses={},
    opt=_OPEN_OPT,
    security=[{}],
)
async def health_ready(request: Request[Any, Any, Any], state: State) -> Response[Readiness]:
    pool: asyncpg.Pool = state.pool
    settings: Settings = state.settings
    checks: dict[str, CheckStatus] = {}
    try:
        await asyncio.wait_for(pool.fetchval("SELECT 1"), _DATABASE_TIMEOUT)
        statuses = await asyncio.wait_for(projection_status(pool), _DATABASE_TIMEOUT)
    except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        checks["database"] = CheckStatus(status="failing", detail=f"{type(exc).__name__}: {exc}"[:300])
    else:
        checks["database"] = CheckStatus(status="ok")
        for status in statuses:
            checks[f"projection:{status.name}"] = _projection_check(status, settings.ready_max_lag_seconds)
    ready = all(c.status == "ok" for c in checks.values())
    body = Readiness(
        status="ready" if ready else "unavailable",
        checks=checks if await _may_see_details(request, state) else None,
    )
    return Response(body, status_code=200 if ready else 503)


async def _may_see_details(request: Request[Any, Any, Any], state: State) -> bool:
    authorization = request.headers.get("authorization")
    if authorization is None:
        return False
    authenticator: Authenticator = state.authenticator
    try:
        principal = await asyncio.wait_for(authenticator.authenticate(authorization), _DATABASE_TIMEOUT)
    except (Unauthenticated, TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
    return principal.allows("metrics:read")


async def _refresh_gauges(state: State) -> None:
    pool: asyncpg.Pool = state.pool
    POOL_CONNECTIONS.labels("open").set(pool.get_size())
    POOL_CONNECTIONS.labels("idle").set(pool.get_idle_size())
    POOL_CONNECTIONS.labels("max").set(pool.get_max_size())
    for status in await projection_status(pool):
        PROJECTION_LAG_EVENTS.labels(status.name).set(status.events_behind)
        PROJECTION_LAG_SECONDS.labels(status.name).set(status.seconds_behind)
        PROJECTION_STOPPED.labels(status.name).set(0 if status.error is None else 1)


@get("/metrics", include_in_schema=False, **scoped("metrics:read"))
async def metrics(state: State) -> Response[Any]:
    """Prometheus text format: Litestar's request metrics, command outcomes, projection lag, pool."""
    await _refresh_gauges(state)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
