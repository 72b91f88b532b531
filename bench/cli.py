"""``python -m bench`` (``make bench``): set up, run the four scenarios, print and save the report.

Order of a run, and why:

1. a fresh ``tally_bench`` database, migrated, with the asset GOLD and the wallets opened and
   topped up through the event store's SQL functions, and every projection caught up;
2. the server (``tally serve --projector``) on a free loopback port, waited for on /health/live;
3. HTTP, many wallets, then HTTP, one hot wallet; before each a CHECKPOINT, after each a wait
   until the in-process projector has applied every event, so no scenario pays for the last;
4. the server is stopped (SIGTERM), so its projector does not compete with the raw-SQL runs;
5. raw SQL, many wallets, then raw SQL, one hot wallet (the limits the HTTP figures are set
   against), unless ``--skip-raw``.

Only one run at a time per checkout (a lock file under .data/): two would drop each other's
database and share the cores.

Durations default to 2 s of warm-up and 10 s measured per scenario; the whole run takes about a
minute. Nothing is asserted: the exit status is 0 when the benchmark ran, whatever the figures.
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

import uvloop

from api.settings import Settings, SettingsError, load_settings
from bench import report
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Spends per second and latency of Tally's HTTP API, against the raw-SQL limit.",
    )
    parser.add_argument(
        "--duration", type=_positive_float, default=10.0, help="measured seconds per scenario"
    )
    parser.add_argument(
        "--warmup", type=_non_negative_float, default=2.0, help="warm-up seconds per scenario"
    )
    parser.add_argument(
        "--wallets", type=_positive_int, default=10_000, help="wallets in the many-wallet run"
    )
    parser.add_argument("--clients-many", type=_positive_int, default=32, help="clients, many wallets")
    parser.add_argument("--clients-hot", type=_positive_int, default=64, help="clients, one hot wallet")
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
    server: Server,
    target: Target,
    workloads: list[Workload],
    *,
    tag: str,
    limits: LoadLimits,
    postmaster: int | None,
    results: list[report.Measured],
) -> float:
    health_s = await wait_live(server)
    for workload in workloads:
        await checkpoint(target.bench_url)
        _progress(
            f"HTTP {workload.title}: {workload.clients} clients, {limits.warmup:g}+{limits.duration:g} s"
        )
        sampler = CpuSampler({
            "server": (_pids(server.pid), True),
            "postgres": (_pids(postmaster), True),
            "load_generator": (_pids(os.getpid()), False),
        })  # fmt: skip
        key_prefix = f"{tag}-http-{workload.key}"
        async with sample_lag(target.bench_url) as lag:
            result = await run_http(
                workload, port=server.port, tag=key_prefix, limits=limits, sampler=sampler
            )
        caught_up = await wait_for_projections(target.bench_url, max_wait=PROJECTION_WAIT_TIMEOUT)
        accepted = await accepted_commands(target.bench_url, key_prefix + "-")
        results.append(
            report.Measured(
                workload, "http", result, caught_up, accepted_in_database=accepted, lag_ms=lag.summary_ms()
            )
        )
        _progress(f"  {result.spends_per_s:,.0f} spends/s, {sum(result.errors.values())} errors")
        if server.process.poll() is not None:
            raise RuntimeError(f"the server exited during the run:\n{server.log_tail()}")
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


def run(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """Everything but printing: returns the report."""
    clock = time.perf_counter()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    machine = machine_facts()
    machine["background_pct_of_core"] = background_load()
    many = wallet_ids(args.wallets)
    workloads = [
        Workload("many", f"many wallets ({args.wallets:,})", args.clients_many, many),
        Workload("hot", "one hot wallet", args.clients_hot, [HOT_WALLET]),
    ]
    limits = LoadLimits(warmup=args.warmup, duration=args.duration, max_requests=args.max_requests)
    tag = uuid.uuid4().hex[:8]  # keeps Idempotency-Keys unique across runs, should a database be kept
    results: list[report.Measured] = []

    with bench_postgres(ROOT) as target:
        _progress(f"setting up {BENCH_DATABASE}: {args.wallets:,} wallets + 1 hot wallet")
        setup, pg = uvloop.run(_prepare(target, [*many, HOT_WALLET]))
        _progress(f"  done: {setup}")
        postmaster = target.postmaster_pid or pg.get("local_postmaster_pid")
        _progress("starting the server")
        with running_server(target.bench_url, root=ROOT, log_path=RESULTS / "server.log") as server:
            setup["server_ready_s"] = uvloop.run(
                _http_phase(
                    server, target, workloads, tag=tag, limits=limits, postmaster=postmaster, results=results
                )
            )
        setup["server_exit_code"] = server.process.returncode
        if not args.skip_raw:
            uvloop.run(
                _sql_phase(
                    target,
                    settings,
                    workloads,
                    tag=tag,
                    limits=limits,
                    postmaster=postmaster,
                    pool_size=args.raw_pool,
                    results=results,
                )
            )

    meta: dict[str, Any] = {
        "started_at": started_at,
        "total_runtime_s": round(time.perf_counter() - clock, 1),
        "commit": _commit(),
        "machine": machine,
        "postgres": {**pg, "embedded": target.embedded, "database": BENCH_DATABASE},
        "config": {
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
    return report.build(meta, results)


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
    print(report.format_table(result))
    print(f"\nreport: {args.json}  (total {result['total_runtime_s']:g} s)")
    return 0
