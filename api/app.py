"""The composition root: ``create_app(settings)`` builds everything the API needs."""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from types import FrameType
from typing import Any

import asyncpg
from litestar import Litestar, Router
from litestar.datastructures import State
from litestar.di import Provide
from litestar.middleware.base import DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.static_files import create_static_files_router

from api.auth import Authenticator, BearerAuthentication
from api.batches import BatchController
from api.controllers import (
    AssetController,
    HoldController,
    SystemController,
    TransactionController,
    WalletController,
)
from api.database import BoundedPool, connect, create_pool
from api.errors import EXCEPTION_HANDLERS
from api.feed import FeedController
from api.health import health_live, health_ready, metrics
from api.observability import metrics_middleware, request_id_middleware
from api.ratelimit import RateLimiter, ReadLimiter
from api.settings import Settings
from api.webhooks import WebhookController, dispatch_settings
from commands import EventStore
from projections.dispatcher import Dispatcher
from projections.projector import Projector, ProjectorWaker
from projections.watcher import ProjectionWatcher
from projections.webhooks import HostPolicy

log = logging.getLogger("tally.api")

DESCRIPTION = """
Tally is the ledger of record for virtual credits. Every movement is a balanced double-entry
transaction stored as immutable events. Amounts are integers in minor units.

Every call but `/health/*` (and this page) needs an API key, sent as `Authorization: Bearer <secret>`
(the Authorize button above); each operation names the scope it needs. Keys are made with
`tally keys create`.

Every POST needs an `Idempotency-Key` header, in the calling client's own namespace: a retry with
the same key replays the first outcome (header `Idempotent-Replayed: true`). Command responses
carry a `consistency_token`; pass it to any query as `consistent_with` to read your own writes.
Errors are RFC 9457 problem+json with a stable `code`.
"""


DOCS_ASSETS_PATH = "/docs/assets"


def swagger_ui_assets() -> Path:
    """Swagger UI's static files, as packaged by swagger-ui-py."""
    return Path(str(importlib.resources.files("swagger_ui") / "static"))


def _on_exit_signals(callback: Callable[[], object]) -> None:
    """Call ``callback`` first whenever the server is told to stop (SIGTERM, SIGINT), then the
    server's own handler. The server installs its handlers before the app starts and puts back the
    ones it found when it stops, so these go with it."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        previous = signal.getsignal(sig)
        if callable(previous):

            def handler(
                signum: int, frame: FrameType | None, previous: Callable[..., Any] = previous
            ) -> None:
                callback()
                previous(signum, frame)

            signal.signal(sig, handler)


async def _run_projector(
    url: str, settings: Settings, name: str, stop: asyncio.Event, pools: list[asyncpg.Pool]
) -> list[asyncio.Task[None]]:
    """The projector, and the webhook dispatcher when webhooks are on, in this process (as `tally
    projector` runs them), each on connections of its own (added to ``pools``), until ``stop``."""
    # No statement timeout: a large batch may take a while.
    projector_pool = await create_pool(url, settings, f"{name}:projector", min_size=1, max_size=2)
    pools.append(projector_pool)
    projector = Projector(
        projector_pool, url, batch_size=settings.projector_batch_size,
        poll_interval=settings.projector_poll_interval,
    )  # fmt: skip
    tasks = [asyncio.create_task(projector.run(stop), name="projector")]
    dispatch = dispatch_settings(settings)
    if dispatch is not None:
        dispatcher_pool = await create_pool(url, settings, f"{name}:dispatcher", min_size=1, max_size=4)
        pools.append(dispatcher_pool)
        tasks.append(
            asyncio.create_task(Dispatcher(dispatcher_pool, url, dispatch).run(stop), name="dispatcher")
        )
    return tasks


def create_app(
    settings: Settings, *, run_projector: bool = False, drain_on_signals: bool = False
) -> Litestar:
    """The Tally API for ``settings.database_url`` (already resolved). With ``run_projector`` the
    projector runs inside this process too (``make run``, tests); deployments run it separately.
    With ``drain_on_signals`` (`tally serve`), SIGTERM and SIGINT end the open event streams and
    long polls at once (api/feed.py), before the server waits for open responses to finish."""
    if not settings.database_url:
        raise ValueError("create_app needs a resolved database_url (see api.database.database_url)")
    url = settings.database_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        # Named per process, as the projector is: operators (and the two-server race test) can tell
        # in pg_stat_activity which API process a session belongs to. Commands and queries have
        # pools of their own, each with its waits bounded (README, "Faults and limits"): a flood of
        # reads cannot take the connections commands need.
        name = f"tally-api:{os.getpid()}"
        pool = await create_pool(
            url,
            settings,
            name,
            statement_timeout=settings.command_timeout,
            lock_timeout=settings.lock_timeout,
        )
        read_pool = await create_pool(
            url,
            settings,
            f"{name}:reads",
            min_size=1,
            max_size=settings.read_pool_max_size,
            statement_timeout=settings.read_timeout,
        )
        reads = BoundedPool(read_pool, settings.read_timeout, "queries")
        # Key lookups, health checks and notifications: on the commands' connections, bounded.
        control = BoundedPool(pool, settings.read_timeout, "commands")
        pools = [pool, read_pool]
        stop = asyncio.Event()
        # Set when the server begins to stop: the event feed's streams and long polls end.
        stopping = asyncio.Event()
        if drain_on_signals:
            loop = asyncio.get_running_loop()
            _on_exit_signals(lambda: loop.call_soon_threadsafe(stopping.set))
        waker = ProjectorWaker(control)
        watcher = ProjectionWatcher(reads, lambda: connect(url, settings, f"{name}:watcher"))
        tasks = [asyncio.create_task(waker.run(stop), name="projector-waker")]
        try:
            await watcher.start()
            if run_projector:
                tasks += await _run_projector(url, settings, name, stop, pools)
            app.state.pool = pool
            app.state.reads = reads
            app.state.control = control
            app.state.authenticator = Authenticator(control, timeout=settings.read_timeout)
            app.state.store = EventStore(
                pool,
                on_append=waker.poke,
                max_in_flight=settings.command_concurrency,
                max_queue=settings.command_queue,
                timeout=settings.command_timeout,
                lock_wait=settings.lock_timeout,
                max_batches=settings.batch_concurrency,
            )
            app.state.watcher = watcher
            app.state.stopping = stopping
            yield
        finally:
            stop.set()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("background task failed: %r", result)
            await watcher.close()
            for each in pools:
                await each.close()

    def provide_pool(state: State) -> BoundedPool:
        reads: BoundedPool = state.reads
        return reads

    def provide_store(state: State) -> EventStore:
        store: EventStore = state.store
        return store

    return Litestar(
        route_handlers=[
            AssetController,
            WalletController,
            TransactionController,
            HoldController,
            SystemController,
            FeedController,
            WebhookController,
            # A batch's body may be larger than any other request's (TALLY_MAX_BATCH).
            Router(
                "/", route_handlers=[BatchController], request_max_body_size=settings.batch_max_body_bytes
            ),
            health_live,
            health_ready,
            metrics,
            create_static_files_router(
                path=DOCS_ASSETS_PATH, directories=[swagger_ui_assets()], include_in_schema=False
            ),
        ],
        middleware=[
            request_id_middleware,
            # Request counts and latency histograms by route template and status.
            metrics_middleware,
            # Health checks (opt exclude_from_auth) are open; so are the docs unless configured not.
            # The rest: key, rate limit, scope, and a query's turn (api/auth.py; requests without a
            # valid key never take a turn from those with).
            DefineMiddleware(BearerAuthentication, exclude=["^/docs"] if settings.docs_public else None),
        ],
        lifespan=[lifespan],
        state=State(
            {
                "settings": settings,
                "rate_limiter": RateLimiter(settings.rate_limit),
                "read_limiter": ReadLimiter(settings.read_concurrency, settings.read_timeout),
                "webhook_policy": HostPolicy.parse(settings.webhook_allowed_hosts),
            }
        ),
        dependencies={
            "pool": Provide(provide_pool, sync_to_thread=False),
            "store": Provide(provide_store, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        # Checked against Content-Length before anything is read, and again while reading.
        request_max_body_size=settings.max_body_bytes,
        # Logging is configured once for the process (api.observability.configure_logging).
        logging_config=None,
        openapi_config=OpenAPIConfig(
            title="Tally",
            version="0.1.0",
            description=DESCRIPTION,
            path="/docs",
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="An API key's secret (`tally_sk_...`), from `tally keys create`.",
                    )
                }
            ),
            security=[{"bearer": []}],
            # Served from the app itself (swagger-ui-py packages Swagger UI), so the docs page works
            # on a network with no internet access.
            render_plugins=[
                SwaggerRenderPlugin(
                    path="/",
                    js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-bundle.js",
                    css_url=f"{DOCS_ASSETS_PATH}/swagger-ui.css",
                    standalone_preset_js_url=f"{DOCS_ASSETS_PATH}/swagger-ui-standalone-preset.js",
                    favicon=f'<link rel="icon" type="image/png" href="{DOCS_ASSETS_PATH}/favicon-32x32.png">',
                )
            ],
        ),
    )
