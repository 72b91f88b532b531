"""The composition root: ``create_app(settings)`` builds everything the API needs."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import asyncpg
from litestar import Litestar, get
from litestar.datastructures import State
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin

from api.controllers import AssetController, SystemController, TransactionController, WalletController
from api.database import create_pool
from api.errors import EXCEPTION_HANDLERS
from api.settings import Settings
from commands import EventStore
from projections.projector import Projector, ProjectorWaker
from projections.watcher import ProjectionWatcher

log = logging.getLogger("tally.api")

DESCRIPTION = """
Tally is the ledger of record for virtual credits. Every movement is a balanced double-entry
transaction stored as immutable events. Amounts are integers in minor units.

Every POST needs an `Idempotency-Key` header: a retry with the same key replays the first outcome
(header `Idempotent-Replayed: true`). Command responses carry a `consistency_token`; pass it to any
query as `consistent_with` to read your own writes. Errors are RFC 9457 problem+json with a stable
`code`.
"""


@get("/health/live", tags=["health"], summary="The process is up", include_in_schema=True)
async def health_live() -> dict[str, str]:
    return {"status": "ok"}


def create_app(settings: Settings, *, run_projector: bool = False) -> Litestar:
    """The Tally API for ``settings.database_url`` (already resolved). With ``run_projector`` the
    projector runs inside this process too (``make run``, tests); deployments run it separately."""
    if not settings.database_url:
        raise ValueError("create_app needs a resolved database_url (see api.database.database_url)")
    url = settings.database_url

    @contextlib.asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        pool = await create_pool(url, settings, "tally-api")
        stop = asyncio.Event()
        waker = ProjectorWaker(pool)
        watcher = ProjectionWatcher(pool, url)
        tasks = [asyncio.create_task(waker.run(stop), name="projector-waker")]
        try:
            await watcher.start()
            if run_projector:
                projector = Projector(
                    pool, url, batch_size=settings.projector_batch_size,
                    poll_interval=settings.projector_poll_interval,
                )  # fmt: skip
                tasks.append(asyncio.create_task(projector.run(stop), name="projector"))
            app.state.pool = pool
            app.state.store = EventStore(pool, on_append=waker.poke)
            app.state.watcher = watcher
            yield
        finally:
            stop.set()
            for result in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(result, Exception):
                    log.error("background task failed: %r", result)
            await watcher.close()
            await pool.close()

    def provide_pool(state: State) -> asyncpg.Pool:
        pool: asyncpg.Pool = state.pool
        return pool

    def provide_store(state: State) -> EventStore:
        store: EventStore = state.store
        return store

    return Litestar(
        route_handlers=[
            AssetController,
            WalletController,
            TransactionController,
            SystemController,
            health_live,
        ],
        lifespan=[lifespan],
        state=State({"settings": settings}),
        dependencies={
            "pool": Provide(provide_pool, sync_to_thread=False),
            "store": Provide(provide_store, sync_to_thread=False),
        },
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(
            title="Tally",
            version="0.1.0",
            description=DESCRIPTION,
            path="/docs",
            render_plugins=[ScalarRenderPlugin(), SwaggerRenderPlugin(path="/swagger")],
        ),
    )
