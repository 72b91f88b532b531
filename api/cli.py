"""``tally``: migrate, seed, serve, projector. Reads DATABASE_URL, HOST, PORT and TALLY_* from the
environment (see README, "Configuration"); with DATABASE_URL unset it runs an embedded PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys

import asyncpg
import msgspec

from api.database import connection_settings, create_pool, database_url
from api.migrate import MigrationError, migrate
from api.settings import Settings, SettingsError, load_settings

log = logging.getLogger("tally")


async def _migrate(url: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        applied = await migrate(conn)
    finally:
        await conn.close()
    print(f"migrations: {len(applied)} applied" + (f" ({', '.join(applied)})" if applied else ", up to date"))


async def _seed(url: str, settings: Settings) -> None:
    from api.seed import seed
    from commands import EventStore

    pool = await create_pool(url, settings, "tally-seed")
    try:
        new, replayed = await seed(EventStore(pool))
        # The demo data is applied by a running projector; `make run` starts one in the server.
    finally:
        await pool.close()
    print(f"seed: {new} new commands, {replayed} already applied")


def _serve(url: str, settings: Settings, run_projector: bool) -> None:
    import uvicorn

    from api.app import create_app

    app = create_app(msgspec.structs.replace(settings, database_url=url), run_projector=run_projector)
    base = f"http://{settings.host}:{settings.port}"
    print(f"Tally API on {base}  (docs: {base}/docs, OpenAPI: {base}/docs/openapi.json)", flush=True)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found.
    # Make that a normal exit so the embedded database (if any) is released on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(0))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,
        timeout_graceful_shutdown=10,
    )


async def _projector(url: str, settings: Settings) -> None:
    from projections.projector import Projector

    pool = await asyncpg.create_pool(
        url, min_size=1, max_size=2, server_settings=connection_settings(settings, "tally-projector")
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await Projector(
            pool,
            url,
            batch_size=settings.projector_batch_size,
            poll_interval=settings.projector_poll_interval,
        ).run(stop)
    finally:
        await pool.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tally", description="Tally, the wallet ledger")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending migrations")
    sub.add_parser("seed", help="add the demo assets, wallets and transactions (idempotent)")
    serve = sub.add_parser("serve", help="serve the HTTP API on HOST:PORT")
    serve.add_argument(
        "--projector", action="store_true", help="also run the projector in this process (development)"
    )
    sub.add_parser("projector", help="run the projector (one active per database; others stand by)")
    args = parser.parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"tally: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    logging.getLogger("pgserver").setLevel(logging.WARNING)  # it narrates every pg_ctl call at INFO
    try:
        with database_url(settings) as url:
            if args.command == "migrate":
                asyncio.run(_migrate(url))
            elif args.command == "seed":
                asyncio.run(_seed(url, settings))
            elif args.command == "serve":
                _serve(url, settings, args.projector)
            else:
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(_projector(url, settings))
    except MigrationError as exc:
        print(f"tally: migration refused: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
