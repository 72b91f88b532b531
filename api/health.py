"""Liveness, readiness and the Prometheus exposition."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import msgspec
from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from api.auth import Authenticator, Unauthenticated, scoped
from api.database import BoundedPool
from api.observability import (
    COMMAND_QUEUE,
    POOL_CONNECTIONS,
    PROJECTION_LAG_EVENTS,
    PROJECTION_LAG_SECONDS,
    PROJECTION_STOPPED,
    READ_POOL_CONNECTIONS,
    WEBHOOK_ATTEMPTS,
    WEBHOOK_DELIVERIES,
    WEBHOOK_FAILURES,
    WEBHOOK_LAG,
)
from api.settings import Settings
from commands import EventStore
from commands.errors import Overloaded
from projections.status import ProjectionStatus, projection_status
from projections.webhooks import webhook_health

_DATABASE_TIMEOUT = 2.0


class CheckStatus(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    status: str  # "ok", "failing" (a projection stopped or too far behind), or "unknown"
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


_READY_CACHE_SECONDS = 1.0


async def _command_path(state: State) -> CheckStatus:
    """The readiness check, run at most once a second per process however often it is asked (it
    is open to anyone: a flood of it must not cost the commands' pool more than one connection)."""
    cached: tuple[float, asyncio.Task[CheckStatus]] | None = state.get("ready_check")
    now = time.monotonic()
    if cached is None or (cached[1].done() and now - cached[0] > _READY_CACHE_SECONDS):
        cached = (now, asyncio.create_task(_check_command_path(state)))
        state.ready_check = cached
    return await asyncio.shield(cached[1])


async def _check_command_path(state: State) -> CheckStatus:
    """Whether this process can take a command now: a connection of the commands' pool comes in
    time and the database answers on it, and the queue has room."""
    control: BoundedPool = state.control
    settings: Settings = state.settings
    store: EventStore = state.store
    if store.queued >= settings.command_queue:
        return CheckStatus(status="failing", detail=f"the command queue is full ({store.queued})")
    try:
        await control.fetchval("SELECT 1")
    except Overloaded as exc:
        return CheckStatus(status="failing", detail=str(exc))
    except TimeoutError:
        return CheckStatus(status="failing", detail=f"no answer within {control.timeout + 1:g} s")
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        return CheckStatus(status="failing", detail=f"{type(exc).__name__}: {exc}"[:300])
    return CheckStatus(status="ok")


@get(
    "/health/ready",
    tags=["health"],
    summary="This process can take commands: route traffic here",
    description="200 when the database answers on the commands' connections and the command queue "
    "has room, else 503. Projections that lag or stopped are reported in the checks (to a key with "
    "the scope `metrics:read`) and in /metrics, and never fail this check: a read-side fault must "
    "not take writes out of rotation.",
    responses={
        503: ResponseSpec(Readiness, description="This process cannot take commands now; route elsewhere.")
    },
    opt=_OPEN_OPT,
    security=[{}],
)
async def health_ready(request: Request[Any, Any, Any], state: State) -> Response[Readiness]:
    settings: Settings = state.settings
    checks = {"commands": await _command_path(state)}
    ready = checks["commands"].status == "ok"
    details = await _may_see_details(request, state)
    if details and ready:
        try:
            statuses = await asyncio.wait_for(projection_status(state.reads), _DATABASE_TIMEOUT)
        except Exception as exc:  # reported, never failing the check
            checks["projections"] = CheckStatus(status="unknown", detail=f"{type(exc).__name__}: {exc}"[:300])
        else:
            for status in statuses:
                checks[f"projection:{status.name}"] = _projection_check(
                    status, settings.ready_max_lag_seconds
                )
    body = Readiness(status="ready" if ready else "unavailable", checks=checks if details else None)
    return Response(body, status_code=200 if ready else 503)


async def _may_see_details(request: Request[Any, Any, Any], state: State) -> bool:
    authorization = request.headers.get("authorization")
    if authorization is None:
        return False
    authenticator: Authenticator = state.authenticator
    try:
        principal = await asyncio.wait_for(authenticator.authenticate(authorization), _DATABASE_TIMEOUT)
    except (
        Unauthenticated,
        Overloaded,
        TimeoutError,
        OSError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    ):
        return False
    return principal.allows("metrics:read")


async def _refresh_gauges(state: State) -> None:
    pool: asyncpg.Pool = state.pool
    POOL_CONNECTIONS.labels("open").set(pool.get_size())
    POOL_CONNECTIONS.labels("idle").set(pool.get_idle_size())
    POOL_CONNECTIONS.labels("max").set(pool.get_max_size())
    reads: BoundedPool = state.reads
    READ_POOL_CONNECTIONS.labels("open").set(reads.pool.get_size())
    READ_POOL_CONNECTIONS.labels("idle").set(reads.pool.get_idle_size())
    READ_POOL_CONNECTIONS.labels("max").set(reads.pool.get_max_size())
    store: EventStore = state.store
    COMMAND_QUEUE.set(store.queued)
    for status in await projection_status(reads):
        PROJECTION_LAG_EVENTS.labels(status.name).set(status.events_behind)
        PROJECTION_LAG_SECONDS.labels(status.name).set(status.seconds_behind)
        PROJECTION_STOPPED.labels(status.name).set(0 if status.error is None else 1)
    hooks = await webhook_health(reads)
    for gauge in (WEBHOOK_DELIVERIES, WEBHOOK_LAG, WEBHOOK_ATTEMPTS, WEBHOOK_FAILURES):
        gauge.clear()  # a deleted subscription's series go
    for hook in hooks:
        WEBHOOK_DELIVERIES.labels(hook.webhook_id, "pending").set(hook.pending)
        WEBHOOK_DELIVERIES.labels(hook.webhook_id, "parked").set(hook.parked)
        WEBHOOK_LAG.labels(hook.webhook_id).set(hook.lag_seconds)
        WEBHOOK_ATTEMPTS.labels(hook.webhook_id).set(hook.attempts)
        WEBHOOK_FAILURES.labels(hook.webhook_id).set(hook.failures)


@get("/metrics", include_in_schema=False, **scoped("metrics:read"))
async def metrics(state: State) -> Response[Any]:
    """Prometheus text format: Litestar's request metrics, command outcomes, projection lag, pool."""
    await _refresh_gauges(state)
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)
