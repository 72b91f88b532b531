"""``python -m bench`` (``make bench``): set up, run the scenarios, print and save the report.

The scenarios: spends over many wallets (``many``) and on one hot wallet (``hot``), each over
HTTP and as raw SQL; and the read cost (``reads``, bench.reads): as-of and history pages on a
wallet of 1,000,000 events against one of ten. ``--scenario`` picks some (repeatable; ``spends``
is ``many`` and ``hot``); by default all run.

Order of a run, and why:

1. (spends) a fresh ``tally_bench`` database, migrated, with the asset GOLD and the wallets opened
   and topped up through the event store's SQL functions, and every projection caught up;
2. the server (``tally serve --projector``) on a free loopback port, waited for on /health/live;
3. HTTP, many wallets, then HTTP, one hot wallet; before each a CHECKPOINT, after each a wait
   until the in-process projector has applied every event, so no scenario pays for the last;
4. the server is stopped (SIGTERM), so its projector does not compete with the raw-SQL runs;
5. raw SQL, many wallets, then raw SQL, one hot wallet (the limits the HTTP figures are set
   against), unless ``--skip-raw``; then ``tally verify`` on everything the runs wrote (every
   balance and rule proven from the events; the report says whether every check passed);
6. (reads) the kept ``tally_bench_reads`` database, migrated, its two wallets built if missing
   (bench.read_wallets: several minutes the first time, nothing later), every projection caught
   up; a CHECKPOINT; a server on it; the reads over HTTP; the server stopped; the same reads as
   raw SQL, unless ``--skip-raw``. Last, so building cannot disturb the spend figures.

Only one run at a time per checkout (a lock file under .data/): two would drop each other's
database and share the cores.

Durations default to 2 s of warm-up and 10 s measured per spend scenario; the spends take about a
minute, the reads one to two more once their database is built. Nothing is asserted: the exit
status is 0 when the benchmark ran, whatever the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import uvloop

from api.settings import Settings, SettingsError, load_settings
from bench import read_wallets, reads, report
from bench.chart import write_chart
from bench.database import (
    BENCH_DATABASE,
    Target,
    accepted_commands,
    bench_postgres,
    checkpoint,
    populate,
    postgres_facts,
    recreate,
    wait_for_projections,
)
from bench.lag import sample_lag
from bench.scenarios import HOT_WALLET, LoadLimits, Workload, run_http, run_sql, wallet_ids
from bench.server import Server, running_server, wait_live
from bench.sysinfo import CpuSampler, background_load, machine_facts
from projections.verify import verify

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
PROJECTION_WAIT_TIMEOUT = 60.0


def _positive_float(raw: str) -> float:
    value = float(raw)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be greater than zero")
    return value


def _non_negative_float(raw: str) -> float:
    value = float(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _positive_int(raw: str) -> int:
    value = int(raw)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _non_negative_int(raw: str) -> int:
    value = int(raw)
    if value < 0:
        raise argparse.ArgumentTypeError("must not be negative")
    return value


def _deep_events(raw: str) -> int:
    value = int(raw)
    if value <= read_wallets.SHALLOW_EVENTS:
        raise argparse.ArgumentTypeError(f"must be more than {read_wallets.SHALLOW_EVENTS}")
    return value


SCENARIOS = ("many", "hot", "batch", "get", "many-2p", "reads")
_SCENARIO_CHOICES = (*SCENARIOS, "spends")


def selected_scenarios(chosen: list[str] | None) -> list[str]:
    """The scenarios to run, in run order: all of them unless some were chosen."""
    if not chosen:
        return list(SCENARIOS)
    wanted = set(chosen) | ({"many", "hot"} if "spends" in chosen else set())
    return [name for name in SCENARIOS if name in wanted]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Spends per second and latency of Tally's HTTP API, against the raw-SQL limit; "
        "and what as-of and history reads cost on a wallet of 1,000,000 events against one of ten.",
    )
    parser.add_argument(
        "--scenario", action="append", choices=_SCENARIO_CHOICES, metavar="NAME",
        help="run only this scenario (repeatable): many, hot, spends (both), batch, get, many-2p, reads; "
        "default: all",
    )  # fmt: skip
    parser.add_argument(
        "--duration", type=_positive_float, default=10.0, help="measured seconds per spend scenario"
    )
    parser.add_argument(
        "--warmup", type=_non_negative_float, default=2.0, help="warm-up seconds per spend scenario"
    )
    parser.add_argument(
        "--wallets", type=_positive_int, default=10_000, help="wallets in the many-wallet run"
    )
    parser.add_argument("--clients-many", type=_positive_int, default=32, help="clients, many wallets")
    parser.add_argument("--clients-hot", type=_positive_int, default=64, help="clients, one hot wallet")
    parser.add_argument("--clients-batch", type=_positive_int, default=4, help="clients, batches")
    parser.add_argument("--clients-get", type=_positive_int, default=32, help="clients, wallet reads")
    parser.add_argument(
        "--batch-size", type=_positive_int, default=1000, help="spends per batch (distinct wallets)"
    )
    parser.add_argument(
        "--max-requests", type=_positive_int, default=1_000_000,
        help="hard cap on requests per scenario, warm-up included",
    )  # fmt: skip
    parser.add_argument("--skip-raw", action="store_true", help="skip the raw-SQL limit runs")
    parser.add_argument(
        "--raw-pool", type=_positive_int, default=None, metavar="N",
        help="connections in the raw-SQL pool (default: one per client); e.g. the API's pool size",
    )  # fmt: skip
    parser.add_argument(
        "--reads-requests", type=_positive_int, default=200, metavar="N",
        help="reads: measured sequential requests per wallet and read (after a warm-up)",
    )  # fmt: skip
    parser.add_argument(
        "--reads-clients", type=_non_negative_int, default=8, metavar="N",
        help="reads: clients of the concurrent HTTP run (0: none)",
    )  # fmt: skip
    parser.add_argument(
        "--reads-max-seconds", type=_positive_float, default=10.0, metavar="S",
        help="reads: measured seconds at most per run (a slow read stops early)",
    )  # fmt: skip
    parser.add_argument(
        "--deep-events", type=_deep_events, default=read_wallets.DEEP_EVENTS, metavar="N",
        help="reads: events of the large wallet (built once, kept in tally_bench_reads)",
    )  # fmt: skip
    parser.add_argument(
        "--rebuild-reads",
        action="store_true",
        help="reads: drop the kept tally_bench_reads and build it again",
    )
    parser.add_argument(
        "--json", type=Path, default=RESULTS / "latest.json", metavar="PATH", help="where to write the report"
    )
    return parser.parse_args(argv)


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def _commit() -> str | None:
    """The checked-out commit, read from .git without running git (read-only, no index refresh)."""
    git = ROOT / ".git"
    with contextlib.suppress(OSError):
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head[:12]
        ref = head.removeprefix("ref: ")
        if (git / ref).exists():
            return (git / ref).read_text().strip()[:12]
        for line in (git / "packed-refs").read_text().splitlines():
            if line.endswith(" " + ref):
                return line.split(" ", 1)[0][:12]
    return None


def _pids(*pids: int | None) -> Callable[[], list[int]]:
    found = [pid for pid in pids if pid is not None]
    return lambda: found


async def _prepare(target: Target, user_ids: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    started = time.perf_counter()
    await recreate(target)
    timings = {"recreate_and_migrate_s": round(time.perf_counter() - started, 2)}
    timings |= await populate(target.bench_url, user_ids)
    return timings, await postgres_facts(target.bench_url)


async def _http_phase(
    servers: list[Server],
    target: Target,
    workloads: list[Workload],
    *,
    tag: str,
    limits: LoadLimits,
    postmaster: int | None,
    results: list[report.Measured],
) -> float:
    health_s = max([await wait_live(server) for server in servers])
    for workload in workloads:
        await checkpoint(target.bench_url)
        _progress(
            f"HTTP {workload.title}: {workload.clients} clients, {limits.warmup:g}+{limits.duration:g} s"
        )
        used = servers[: workload.processes]
        sampler = CpuSampler({
            "server": (_pids(*(server.pid for server in used)), True),
            "postgres": (_pids(postmaster), True),
            "load_generator": (_pids(os.getpid()), False),
        })  # fmt: skip
        key_prefix = f"{tag}-http-{workload.key}"
        async with sample_lag(target.bench_url) as lag:
            result = await run_http(
                workload,
                ports=[server.port for server in used],
                tag=key_prefix,
                limits=limits,
                sampler=sampler,
            )
        caught_up = await wait_for_projections(target.bench_url, max_wait=PROJECTION_WAIT_TIMEOUT)
        accepted = await accepted_commands(target.bench_url, key_prefix + "-")
        results.append(
            report.Measured(
                workload, "http", result, caught_up, accepted_in_database=accepted, lag_ms=lag.summary_ms()
            )
        )
        _progress(
            f"  {result.spends_per_s:,.0f} {'reads' if workload.read else 'spends'}/s, "
            f"{sum(result.errors.values())} errors"
        )
        for server in servers:
            if server.process.poll() is not None:
                raise RuntimeError(f"a server exited during the run:\n{server.log_tail()}")
    return health_s


async def _sql_phase(
    target: Target,
    settings: Settings,
    workloads: list[Workload],
    *,
    tag: str,
    limits: LoadLimits,
    postmaster: int | None,
    pool_size: int | None,
    results: list[report.Measured],
) -> None:
    for workload in workloads:
        await checkpoint(target.bench_url)
        _progress(
            f"SQL  {workload.title}: {workload.clients} clients, {limits.warmup:g}+{limits.duration:g} s"
        )
        sampler = CpuSampler({
            "postgres": (_pids(postmaster), True),
            "load_generator": (_pids(os.getpid()), False),
        })  # fmt: skip
        connections = min(workload.clients, pool_size or workload.clients)
        key_prefix = f"{tag}-sql-{workload.key}"
        result = await run_sql(
            workload, url=target.bench_url, settings=settings, tag=key_prefix,
            limits=limits, sampler=sampler, connections=connections,
        )  # fmt: skip
        accepted = await accepted_commands(target.bench_url, key_prefix + "-")
        results.append(
            report.Measured(workload, "sql", result, connections=connections, accepted_in_database=accepted)
        )
        _progress(f"  {result.spends_per_s:,.0f} spends/s, {sum(result.errors.values())} errors")


async def _reads_http_phase(
    server: Server, wallets: list[read_wallets.ReadWallet], config: reads.ReadConfig
) -> tuple[float, list[reads.ReadMeasured]]:
    health_s = await wait_live(server)
    measured = await reads.run_http(server.port, wallets, config, _progress)
    if server.process.poll() is not None:
        raise RuntimeError(f"the server exited during the run:\n{server.log_tail()}")
    return health_s, measured


def _run_reads(
    args: argparse.Namespace, settings: Settings, target: Target
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The read-cost scenario (step 6 of the module doc): its part of the report, and the facts of
    its database's server."""
    clock = time.perf_counter()
    url = read_wallets.reads_url(target)
    _progress(
        f"reads: {read_wallets.READS_DATABASE}, wallets of {read_wallets.SHALLOW_EVENTS} and "
        f"{args.deep_events:,} events"
    )
    wallets, setup = uvloop.run(
        read_wallets.prepare(
            target, deep_events=args.deep_events, rebuild=args.rebuild_reads, progress=_progress
        )
    )
    setup["prepare_s"] = round(time.perf_counter() - clock, 2)
    _progress(f"  ready in {setup['prepare_s']:g} s ({setup['database']})")
    uvloop.run(checkpoint(url))
    pg = uvloop.run(postgres_facts(url))
    config = reads.ReadConfig(
        requests=args.reads_requests, clients=args.reads_clients, max_seconds=args.reads_max_seconds
    )
    _progress("starting the server on the read-cost database")
    with running_server(url, root=ROOT, log_path=RESULTS / "server-reads.log") as server:
        setup["server_ready_s"], measured = uvloop.run(_reads_http_phase(server, wallets, config))
    setup["server_exit_code"] = server.process.returncode
    if not args.skip_raw:
        measured += uvloop.run(reads.run_sql(url, settings, wallets, config, _progress))
    setup["total_s"] = round(time.perf_counter() - clock, 1)
    part = report.reads_json(
        database=read_wallets.READS_DATABASE, setup=setup, config=config, wallets=wallets, measured=measured
    )
    return part, pg


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Everything but printing: returns the report."""
    clock = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    scenarios = selected_scenarios(args.scenario)
    machine = machine_facts()
    machine["background_pct_of_core"] = background_load()
    many = wallet_ids(args.wallets)
    workloads = [
        workload
        for workload in (
            Workload("many", f"many wallets ({args.wallets:,})", args.clients_many, many),
            Workload("hot", "one hot wallet", args.clients_hot, [HOT_WALLET]),
            Workload(
                "batch", f"batches of {args.batch_size:,}", args.clients_batch, many, batch=args.batch_size
            ),
            Workload("get", f"GET a wallet ({args.wallets:,})", args.clients_get, many, read=True),
            Workload("many-2p", "many wallets, 2 API processes", args.clients_many, many, processes=2),
        )
        if workload.key in scenarios
    ]
    limits = LoadLimits(warmup=args.warmup, duration=args.duration, max_requests=args.max_requests)
    tag = uuid.uuid4().hex[:8]  # keeps Idempotency-Keys unique across runs, should a database be kept
    results: list[report.Measured] = []
    setup: dict[str, Any] = {}
    pg: dict[str, Any] = {}
    reads_part: dict[str, Any] | None = None

    with bench_postgres(ROOT) as target:
        if workloads:
            _spends(
                args, settings, target, workloads, tag=tag, limits=limits, setup=setup, pg=pg, results=results
            )
        if "reads" in scenarios:
            reads_part, reads_pg = _run_reads(args, settings, target)
            pg = pg or reads_pg

    meta: dict[str, Any] = {
        "started_at": started_at,
        "total_runtime_s": round(time.perf_counter() - clock, 1),
        "commit": _commit(),
        "machine": machine,
        "postgres": {
            **pg,
            "embedded": target.embedded,
            "database": BENCH_DATABASE if workloads else read_wallets.READS_DATABASE,
        },
        "config": {
            "scenarios": scenarios,
            "warmup_s": args.warmup,
            "duration_s": args.duration,
            "wallets": args.wallets,
            "clients_many": args.clients_many,
            "clients_hot": args.clients_hot,
            "max_requests": args.max_requests,
            "raw_sql": not args.skip_raw,
            "server_pool": f"{settings.pool_min_size}-{settings.pool_max_size} connections",
            "raw_sql_pool": (
                f"a pool of {args.raw_pool} connections (at most one per client)"
                if args.raw_pool
                else "a pool of one connection per client"
            ),
            "server": "tally serve --projector (1 uvicorn process, uvloop, httptools)",
            "spend": "POST /v1/wallets/{user_id}/spends {asset: GOLD, amount: 1}",
        },
        "setup": setup,
    }
    return report.build(meta, results, reads_part)


def _spends(
    args: argparse.Namespace,
    settings: Settings,
    target: Target,
    workloads: list[Workload],
    *,
    tag: str,
    limits: LoadLimits,
    setup: dict[str, Any],
    pg: dict[str, Any],
    results: list[report.Measured],
) -> None:
    """The spend scenarios (steps 1 to 5 of the module doc); fills ``setup``, ``pg`` and ``results``."""
    many = next((w.user_ids for w in workloads if len(w.user_ids) > 1), [])
    user_ids = [*many, HOT_WALLET]
    _progress(f"setting up {BENCH_DATABASE}: {len(many):,} wallets + 1 hot wallet")
    prepared, facts = uvloop.run(_prepare(target, user_ids))
    setup |= prepared
    pg |= facts
    _progress(f"  done: {prepared}")
    postmaster = target.postmaster_pid or pg.get("local_postmaster_pid")
    processes = max(w.processes for w in workloads)
    _progress(
        "starting the server" + (f"s ({processes} processes, the first with the projector)" * (processes > 1))
    )
    logs = [RESULTS / "server.log", *(RESULTS / f"server-{i}.log" for i in range(2, processes + 1))]
    with contextlib.ExitStack() as stack:
        servers = [
            stack.enter_context(running_server(target.bench_url, root=ROOT, log_path=log, projector=i == 0))
            for i, log in enumerate(logs)
        ]
        setup["server_ready_s"] = uvloop.run(
            _http_phase(
                servers, target, workloads, tag=tag, limits=limits, postmaster=postmaster, results=results
            )
        )
    setup["server_exit_code"] = servers[0].process.returncode
    if not args.skip_raw:
        uvloop.run(
            _sql_phase(
                target,
                settings,
                [w for w in workloads if w.raw_key == w.key],
                tag=tag,
                limits=limits,
                postmaster=postmaster,
                pool_size=args.raw_pool,
                results=results,
            )
        )
    _progress("tally verify on what the runs wrote")
    setup["verify"] = uvloop.run(_verify(target.bench_url))
    _progress(f"  done: {setup['verify']}")


async def _verify(url: str) -> dict[str, Any]:
    """`tally verify` on the benchmark's database: the speed was not bought with correctness."""
    conn = await asyncpg.connect(url)
    try:
        checked = await verify(conn)
    finally:
        await conn.close()
    return {
        "ok": checked.ok,
        "findings": len(checked.findings),
        "events": checked.events,
        "seconds": checked.seconds,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings()
    except SettingsError as exc:
        print(f"bench: configuration error: {exc}", file=sys.stderr)
        return 2
    lock_path = ROOT / ".data" / "bench.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("w") as lock:
        try:  # two runs at once would drop each other's database and share the cores
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print("bench: another benchmark is running in this checkout", file=sys.stderr)
            return 1
        return _run_and_report(args, settings)


def _run_and_report(args: argparse.Namespace, settings: Settings) -> int:
    try:
        result = run(args, settings)
    except KeyboardInterrupt:
        print("bench: interrupted; the server and the database were stopped", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    report.write_json(result, args.json)
    picture = write_chart(result, args.json.with_suffix(".png"))
    print(report.format_table(result))
    print(
        f"\nreport: {args.json}"
        + (f", chart: {picture}" if picture else "")
        + f"  (total {result['total_runtime_s']:g} s)"
    )
    return 0
