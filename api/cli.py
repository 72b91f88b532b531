"""``tally``: migrate, seed, serve, projector, keys, verify, rebuild, balances, batch. Reads DATABASE_URL,
HOST, PORT and TALLY_* from the environment (see README, "Configuration"); with DATABASE_URL unset it
runs an embedded PostgreSQL."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import csv
import logging
import os
import secrets
import signal
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec

from api.database import app_url, create_pool, database_url, owner_url
from api.keys import ClientInfo, CreatedKey
from api.migrate import Migrated, MigrationError, migrate
from api.observability import configure_logging
from api.settings import MAX_BATCH_LIMIT, Settings, SettingsError, load_settings

if TYPE_CHECKING:
    from litestar import Litestar

    from projections.anchor import Anchor
    from projections.verify import VerifyReport

log = logging.getLogger("tally")


async def _migrate(url: str, settings: Settings) -> None:
    conn = await asyncpg.connect(url)
    try:
        done = await migrate(conn, app_role=settings.app_role, app_password=settings.app_password)
    finally:
        await conn.close()
    if done.nothing:
        print("migrations: up to date")
    else:
        _print_migrated(done)
    if settings.app_role:
        print(f"application role: {settings.app_role} ({done.app_role})")


def _print_migrated(done: Migrated) -> None:
    print(
        f"migrations: {len(done.migrations)} applied"
        + (f" ({', '.join(done.migrations)})" * bool(done.migrations))
    )
    print(
        f"definitions: {len(done.definitions)} changed"
        + (f" ({', '.join(done.definitions)})" * bool(done.definitions))
    )
    if done.flows:
        print(f"flows: {', '.join(done.flows)} added")
    if done.xid_offset is not None:
        print(
            "this database was restored from another cluster: new events' writer_xids now start "
            f"{done.xid_offset} past this cluster's transaction ids, after every event's"
        )


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


def _serve(url: str, settings: Settings, run_projector: bool, workers: int = 1) -> None:
    import uvicorn

    from api.app import create_app

    base = f"http://{settings.host}:{settings.port}"
    print(
        f"Tally API on {base}  (docs: {base}/docs, OpenAPI: {base}/docs/openapi.json)"
        + (f", {workers} processes" if workers > 1 else ""),
        flush=True,
    )
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal to the handler it found.
    # Make that a normal exit so the embedded database (if any) is released on the way out.
    signal.signal(signal.SIGTERM, lambda signum, _frame: sys.exit(0))
    app: Any
    if workers > 1:
        # Each worker process builds the app from the environment (api.cli:worker_app): the
        # database's URL (the embedded server's too, which this process keeps running) goes there.
        os.environ["DATABASE_URL"] = url
        for variable, value in (
            ("TALLY_WEBHOOK_KEY", settings.webhook_key),
            ("TALLY_WEBHOOK_ALLOWED_HOSTS", settings.webhook_allowed_hosts),
        ):  # fmt: skip
            if value is not None:  # (the development ones, with the embedded database)
                os.environ[variable] = value
        os.environ[_WORKER_PROJECTOR] = "1" if run_projector else ""
        app = "api.cli:worker_app"
    else:
        app = create_app(
            msgspec.structs.replace(settings, database_url=url),
            run_projector=run_projector,
            drain_on_signals=True,
        )
    uvicorn.run(
        app,
        factory=workers > 1,
        workers=workers if workers > 1 else None,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        log_level=settings.log_level,
        access_log=False,  # api.observability writes one access line per request, with its id
        log_config=None,  # keep the handlers configure_logging installed
        timeout_graceful_shutdown=10,
    )


_WORKER_PROJECTOR = "TALLY_WORKER_PROJECTOR"


def worker_app() -> Litestar:
    """The app of one `tally serve --workers N` process, from the environment its parent set. With
    --projector each runs one: the projector's lock keeps one active, the others stand by."""
    from api.app import create_app

    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format)
    return create_app(settings, run_projector=bool(os.environ.get(_WORKER_PROJECTOR)), drain_on_signals=True)


async def _projector(url: str, settings: Settings) -> None:
    from api.webhooks import dispatch_settings
    from projections.dispatcher import Dispatcher
    from projections.projector import Projector

    pool = await create_pool(url, settings, "tally-projector", min_size=1, max_size=2)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    runs = [
        Projector(
            pool, url, batch_size=settings.projector_batch_size,
            poll_interval=settings.projector_poll_interval,
        ).run(stop)
    ]  # fmt: skip
    dispatcher_pool = None
    dispatch = dispatch_settings(settings)
    if dispatch is None:
        logging.getLogger("tally.dispatcher").info("webhooks are off: TALLY_WEBHOOK_KEY is not set")
    else:  # the webhook dispatcher beside it (one active per database, like the projector)
        dispatcher_pool = await create_pool(url, settings, "tally-dispatcher", min_size=1, max_size=4)
        runs.append(Dispatcher(dispatcher_pool, url, dispatch).run(stop))
    try:
        results = await asyncio.gather(*runs, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
    finally:
        await pool.close()
        if dispatcher_pool is not None:
            await dispatcher_pool.close()


async def _webhooks_replay(url: str, webhook_id: str, after: str | None) -> None:
    from projections.positions import ORIGIN, Position
    from projections.webhooks import WebhookNotFound, replay

    pool = await create_pool(url, load_settings(), "tally-webhooks", min_size=1, max_size=1)
    try:
        done, _ = await replay(
            pool, None, webhook_id, ORIGIN if after is None else Position.parse(after), f"cli:{uuid.uuid4()}"
        )
    except WebhookNotFound as exc:
        raise ValueError(str(exc)) from None
    finally:
        await pool.close()
    print(f"webhook {done.webhook_id}: {done.replayed} deliveries after {done.after} will be sent again")


def _load_anchors(files: list[str]) -> list[tuple[str, Anchor]]:
    from projections.anchor import load_anchor

    anchors = []
    for name in files:
        try:
            anchors.append((name, load_anchor(Path(name).read_bytes())))
        except (OSError, ValueError) as exc:
            raise ValueError(f"--anchor {name}: {exc}") from None
    return anchors


async def _verify(url: str, anchors: list[tuple[str, Anchor]], key: str | None) -> VerifyReport:
    from projections.verify import verify

    conn = await asyncpg.connect(url, server_settings={"application_name": "tally-verify"})
    try:
        return await verify(conn, anchors, key)
    finally:
        await conn.close()


def _report_verification(report: VerifyReport, report_path: str | None) -> int:
    from projections.verify import summary

    print(summary(report))
    if report_path:
        Path(report_path).write_bytes(msgspec.json.format(msgspec.json.encode(report), indent=2))
        print(f"report written to {report_path}")
    return 0 if report.ok else 1


async def _anchor(url: str, key: str | None) -> Anchor:
    from projections.anchor import make_anchor

    conn = await asyncpg.connect(url, server_settings={"application_name": "tally-anchor"})
    try:
        return await make_anchor(conn, key)
    finally:
        await conn.close()


def _write_anchor(anchor: Anchor, out: str | None) -> None:
    document = msgspec.json.format(msgspec.json.encode(anchor), indent=2)
    if out is None:
        print(document.decode())
        return
    Path(out).write_bytes(document + b"\n")
    signed = "with an HMAC" if anchor.hmac else "no HMAC: TALLY_ANCHOR_KEY is unset"
    print(f"anchor of {anchor.streams} streams at position {anchor.position} written to {out} "
          f"(digest {anchor.digest[:16]}…, {signed}); keep it outside the database")  # fmt: skip


async def _rebuild(url: str, names: list[str], restart: bool, batch: int) -> None:
    from projections.rebuild import ProgressPrinter, rebuild

    # The projections are independent (own tables, own rebuild schema, own connection), so they are
    # rebuilt concurrently: on two cores, three rebuilds together finish well before three in a row.
    progress = ProgressPrinter()
    clock = time.perf_counter()
    results = await asyncio.gather(
        *(rebuild(url, name, restart=restart, batch=batch, progress=progress) for name in names)
    )
    for result in results:
        how = "resumed and rebuilt" if result.resumed else "rebuilt"
        print(
            f"{result.projection}: {how} from {result.events:,} events in {result.seconds:.2f} s "
            f"({result.events_per_second:,.0f} events/s); generation {result.generation} is live"
        )
    if len(results) > 1:
        seconds = time.perf_counter() - clock
        events = max(r.events for r in results)
        print(f"all: {events:,} events into {len(results)} projections in {seconds:.2f} s "
              f"({events / seconds:,.0f} events/s)")  # fmt: skip


async def _balances(url: str, moment_text: str, output: str) -> None:
    from projections.as_of import Moment, balances_as_of, uncounted_as_of

    moment = Moment.parse(moment_text)
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction(isolation="repeatable_read", readonly=True):  # one snapshot
            balances = await balances_as_of(conn, moment)
            uncounted = await uncounted_as_of(conn, moment)
    finally:
        await conn.close()
    if uncounted:
        print(f"tally: {uncounted} events of a type this release has no rule for are not counted "
              "(tally verify names them)", file=sys.stderr)  # fmt: skip
    if output == "json":
        document: dict[str, object] = {"as_of": moment.describe(), "balances": balances}
        if uncounted:
            document["uncounted_events"] = uncounted
        print(msgspec.json.format(msgspec.json.encode(document), indent=2).decode())
    elif output == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(["account", "asset", "balance", "held", "available"])
        writer.writerows([b.account, b.asset, b.balance, b.held, b.available] for b in balances)
    else:
        print(f"balances as of {moment.describe()}")
        print(f"{'asset':<16} {'account':<40} {'balance':>24} {'held':>20} {'available':>24}")
        for b in balances:
            held = "" if b.held is None else str(b.held)
            available = "" if b.available is None else str(b.available)
            print(f"{b.asset:<16} {b.account:<40} {b.balance:>24} {held:>20} {available:>24}")


async def _projections(url: str, action: str, name: str | None, as_json: bool) -> int:
    from projections.status import projection_status, resume_projection

    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        if action == "resume":
            assert name is not None
            if not await resume_projection(pool, name):
                print(f"tally: no projection named {name!r}", file=sys.stderr)
                return 2
            print(f"{name}: resumed; the projector retries it on its next round")
            return 0
        statuses = await projection_status(pool)
    finally:
        await pool.close()
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(statuses), indent=2).decode())
        return 0
    print(f"{'projection':<10} {'gen':>4} {'applied':>12} {'behind':>8} {'lag s':>8}  state")
    for st in statuses:
        state = "running" if st.error is None else f"STOPPED at position {st.error_position}: {st.error}"
        print(
            f"{st.name:<10} {st.generation:>4} {st.events_applied:>12,} {st.events_behind:>8,} "
            f"{st.seconds_behind:>8.3f}  {state}"
        )
    return 0


def _print_key(key: CreatedKey, as_json: bool, verb: str) -> None:
    if as_json:
        print(msgspec.json.encode(key).decode())
        return
    assets = ", ".join(key.assets) if key.assets is not None else "every asset"
    print(f"client {key.name} {verb} (id {key.id}): scopes {', '.join(key.scopes)}; {assets}"
          + (f"; expires {key.expires_at:%Y-%m-%d %H:%M}Z" if key.expires_at else ""))  # fmt: skip
    print("secret (shown once; keep it in a secret store):")
    print(key.secret)


def _print_clients(clients: list[ClientInfo], as_json: bool) -> None:
    if as_json:
        print(msgspec.json.format(msgspec.json.encode(clients), indent=2).decode())
        return
    print(f"{'name':<24} {'state':<8} {'secrets':>7}  {'rate/s':>6}  {'scopes':<40} assets")
    for c in clients:
        state = "revoked" if c.revoked_at else "expired" if c.live_secrets == 0 and c.expires_at else "active"
        print(f"{c.name:<24} {state:<8} {c.live_secrets:>7}  {c.rate_limit or '-':>6}  "
              f"{','.join(c.scopes):<40} {','.join(c.assets) if c.assets is not None else '*'}")  # fmt: skip


async def _keys(url: str, args: argparse.Namespace, settings: Settings) -> int:
    from api import keys

    conn = await asyncpg.connect(url, server_settings={"application_name": "tally-keys"})
    try:
        if args.action == "create":
            created = await keys.create_client(
                conn, args.name, keys.parse_scopes(args.scopes), assets=keys.parse_assets(args.assets),
                rate_limit=args.rate_limit, expires_in_days=args.expires_in,
            )  # fmt: skip
            _print_key(created, args.json, "created")
        elif args.action == "list":
            _print_clients(await keys.list_clients(conn), args.json)
        elif args.action == "revoke":
            info = await keys.revoke_client(conn, args.name)
            print(f"client {info.name} revoked at {info.revoked_at:%Y-%m-%d %H:%M:%S}Z: its secrets fail "
                  "on every API process within seconds")  # fmt: skip
        elif args.action == "adopt":
            adopted = await keys.adopt_earlier_keys(conn, args.name)
            print(f"client {args.name} adopted {adopted} commands recorded before callers had identities: "
                  "its retries of them replay")  # fmt: skip
        elif args.action == "rotate":
            rotated = await keys.rotate_client(conn, args.name, args.grace)
            _print_key(rotated, args.json, f"rotated (the previous secret works for {args.grace:g} s more)")
        else:
            path = settings.data_dir / "development-key"
            kept = path.read_text().strip() if path.exists() else None
            secret = await keys.development_key(conn, kept)
            if secret != kept:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch(mode=0o600, exist_ok=True)
                path.write_text(secret + "\n")
            print(f"Development API key (all scopes): {secret}")
    except keys.KeysError as exc:
        print(f"tally keys: {exc}", file=sys.stderr)
        return 2
    finally:
        await conn.close()
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tally", description="Tally, the wallet ledger")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("migrate", help="apply pending migrations")
    sub.add_parser("seed", help="add the demo assets, wallets and transactions (idempotent)")
    serve = sub.add_parser("serve", help="serve the HTTP API on HOST:PORT")
    serve.add_argument(
        "--projector", action="store_true", help="also run the projector in this process (development)"
    )
    serve.add_argument(
        "--workers", type=_count(), default=1, metavar="N",
        help="API processes on HOST:PORT (default 1; measured: 2 on 2 cores serve nearly twice the spends)",
    )  # fmt: skip
    sub.add_parser(
        "projector",
        help="run the projector and the webhook dispatcher (one active per database; others stand by)",
    )
    webhooks = sub.add_parser("webhooks", help="webhook operations")
    webhooks_sub = webhooks.add_subparsers(dest="action", required=True)
    replay = webhooks_sub.add_parser("replay", help="send a webhook's events again, from a point of the feed")
    replay.add_argument("webhook_id")
    replay.add_argument("--after", metavar="CURSOR", help="a feed cursor (default: from the first event)")
    verify = sub.add_parser("verify", help="prove from the events that every balance is right")
    verify.add_argument("--report", metavar="FILE", help="also write the full report as JSON")
    verify.add_argument(
        "--anchor", metavar="FILE", action="append", default=[],
        help="also prove the history still holds what this anchor (tally anchor) committed to; repeatable",
    )  # fmt: skip
    anchor = sub.add_parser("anchor", help="a statement of every stream's head, to keep outside the database")
    anchor.add_argument("--out", metavar="FILE", help="write it here (default: print it)")
    rebuild = sub.add_parser("rebuild", help="replay every event into fresh read models, then swap them in")
    rebuild.add_argument("--projection", choices=["wallets", "history", "system"], help="only this one")
    rebuild.add_argument("--restart", action="store_true", help="discard an interrupted rebuild's progress")
    rebuild.add_argument("--batch", type=int, default=20_000, help="events per batch (default 20000)")
    balances = sub.add_parser("balances", help="every account's balance at a past moment, from the events")
    balances.add_argument("--as-of", required=True, metavar="TIME|POSITION", help="ISO 8601 time or position")
    form = balances.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_const", const="json", dest="output", help="JSON output")
    form.add_argument("--csv", action="store_const", const="csv", dest="output", help="CSV output")
    projections = sub.add_parser("projections", help="projection status and operations")
    projections_sub = projections.add_subparsers(dest="action", required=True)
    status = projections_sub.add_parser("status", help="checkpoints, generation, lag, stops")
    status.add_argument("--json", action="store_true")
    resume = projections_sub.add_parser("resume", help="retry a projection stopped by a poison event")
    resume.add_argument("name", choices=["wallets", "history", "system"])
    _keys_parser(sub.add_parser("keys", help="API clients: create, list, revoke, rotate"))
    batch = sub.add_parser(
        "batch",
        help="send a file of commands (JSON lines) to a running server in batches, with a progress bar",
    )
    batch.add_argument("file", help="one command per line, as in POST /v1/batches")
    batch.add_argument("--url", help="the server's base URL (default: http://HOST:PORT)")
    batch.add_argument(
        "--size",
        type=_count(MAX_BATCH_LIMIT),
        default=1000,
        help="commands per batch (default 1000; the server's TALLY_MAX_BATCH at most)",
    )
    batch.add_argument("--atomic", action="store_true", help="each batch all or nothing")
    return parser


def _keys_parser(keys: argparse.ArgumentParser) -> None:
    from api.auth import SCOPES

    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new client; prints its secret once")
    create.add_argument("name", help="the client's name: 1-64 characters of [A-Za-z0-9._-]")
    create.add_argument("--scopes", required=True, metavar="SCOPE[,SCOPE...]", help=", ".join(SCOPES))
    create.add_argument("--assets", metavar="CODE[,CODE...]", help="only these assets (default: every asset)")
    create.add_argument(
        "--rate-limit", type=int, metavar="N", help="requests per second (default TALLY_RATE_LIMIT)"
    )
    create.add_argument(
        "--expires-in", type=float, metavar="DAYS", help="the client's keys expire after this"
    )
    create.add_argument("--json", action="store_true", help="print one JSON object")
    listing = actions.add_parser("list", help="every client (never a secret)")
    listing.add_argument("--json", action="store_true")
    revoke = actions.add_parser("revoke", help="every secret of the client fails from now on")
    revoke.add_argument("name")
    rotate = actions.add_parser("rotate", help="a new secret; the old one works until the grace ends")
    rotate.add_argument("name")
    rotate.add_argument("--grace", type=float, default=3600.0, metavar="SECONDS", help="default 3600")
    rotate.add_argument("--json", action="store_true")
    adopt = actions.add_parser(
        "adopt", help="give the commands recorded before callers had identities to this client (once)"
    )
    adopt.add_argument("name")
    actions.add_parser("dev", help="the development client's key (make run), made once under TALLY_DATA_DIR")


# The commands that change the schema or what only the owner may write (clients, rebuild's tables);
# every other command connects as the application (api/database.py, app_url).
OWNER_COMMANDS = frozenset({"migrate", "seed", "rebuild", "keys"})


def _development_webhooks(settings: Settings) -> Settings:
    """With the embedded database (development): webhooks on, their key kept in
    TALLY_DATA_DIR/webhook-key (made once), and loopback allowed beside public hosts, unless set."""
    key = settings.webhook_key
    if key is None:
        path = settings.data_dir / "webhook-key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(mode=0o600)
            path.write_text(secrets.token_urlsafe(32) + "\n")
        key = path.read_text().strip()
    hosts = settings.webhook_allowed_hosts or "public,localhost,127.0.0.1,::1"
    return msgspec.structs.replace(settings, webhook_key=key, webhook_allowed_hosts=hosts)


def _count(high: int | None = None) -> Callable[[str], int]:
    """An argument type: a whole number from 1 (to ``high``)."""

    def check(raw: str) -> int:
        value = int(raw)
        if value < 1 or (high is not None and value > high):
            raise argparse.ArgumentTypeError(
                "must be 1 or more" if high is None else f"must be 1 to {high:,}"
            )
        return value

    return check


def _batch(args: argparse.Namespace, settings: Settings) -> int:
    """`tally batch FILE`: an API client; needs no database, only the server and a key."""
    from api.batch_file import BatchFileError, development_secret, send_file

    secret = os.environ.get("TALLY_API_KEY") or development_secret(settings.data_dir)
    if not secret:
        print(
            "tally batch: set TALLY_API_KEY to a key with the scopes of the file's commands", file=sys.stderr
        )
        return 2
    url = args.url or f"http://{settings.host}:{settings.port}"
    try:
        return send_file(Path(args.file), url, secret, size=args.size, atomic=args.atomic)
    except (BatchFileError, OSError) as exc:
        print(f"tally batch: {exc}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace, base: str, settings: Settings) -> int:
    command = args.command
    url = owner_url(settings, base) if command in OWNER_COMMANDS else app_url(settings, base)
    if command == "migrate":
        asyncio.run(_migrate(url, settings))
    elif command == "seed":
        asyncio.run(_seed(url, settings))
    elif command == "serve":
        _serve(url, settings, args.projector, args.workers)
    elif command == "projector":
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_projector(url, settings))
    elif command == "verify":
        anchors = _load_anchors(args.anchor)
        return _report_verification(asyncio.run(_verify(url, anchors, settings.anchor_key)), args.report)
    elif command == "anchor":
        _write_anchor(asyncio.run(_anchor(url, settings.anchor_key)), args.out)
    elif command == "rebuild":
        names = [args.projection] if args.projection else ["wallets", "history", "system"]
        asyncio.run(_rebuild(url, names, args.restart, args.batch))
    elif command == "balances":
        asyncio.run(_balances(url, args.as_of, args.output or "table"))
    elif command == "keys":
        return asyncio.run(_keys(url, args, settings))
    elif command == "webhooks":
        asyncio.run(_webhooks_replay(url, args.webhook_id, args.after))
    else:
        return asyncio.run(
            _projections(url, args.action, getattr(args, "name", None), getattr(args, "json", False))
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"tally: configuration error: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    if args.command == "batch":
        return _batch(args, settings)
    if not settings.database_url:
        settings = _development_webhooks(settings)
    try:
        with database_url(settings) as url:
            return _dispatch(args, url, settings)
    except MigrationError as exc:
        print(f"tally: migration refused: {exc}", file=sys.stderr)
        return 1
    except ValueError as exc:  # e.g. an --as-of that is neither a time nor a position
        print(f"tally: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
