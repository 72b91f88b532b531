"""Machine facts for the report, and CPU accounting during a measurement window.

The figures only mean something next to the machine they came from: on a small box the server,
PostgreSQL and the load generator compete for the same cores, so the report also says how much CPU
each of them used while the window was open (from ``/proc``, Linux only). "% of one core" above
~90 for the server means the single uvicorn process is the bottleneck; PostgreSQL's figure is
the sum over its processes and can exceed 100 on several cores.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

Snapshot = tuple[float, dict[str, dict[int, int]], tuple[int, int, int] | None]


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, user+system CPU ticks) for every visible process."""
    table: dict[int, tuple[int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for name in entries:
        if not name.isdigit():
            continue
        try:
            raw = Path(f"/proc/{name}/stat").read_text()
        except OSError:
            continue  # exited meanwhile
        fields = raw.rsplit(")", 1)[1].split()
        table[int(name)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    return table


def _descendants(table: dict[int, tuple[int, int]], roots: Iterable[int]) -> set[int]:
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: set[int] = set()
    stack = [pid for pid in roots if pid in table]
    while stack:
        pid = stack.pop()
        if pid not in found:
            found.add(pid)
            stack.extend(children.get(pid, ()))
    return found


def _machine_ticks() -> tuple[int, int, int] | None:
    """(busy, iowait, total) jiffies over all CPUs since boot, from the first line of /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    values = [int(v) for v in first[1:]]
    iowait = values[4] if len(values) > 4 else 0
    total = sum(values[:8])  # guest time is already counted in user
    return total - values[3] - iowait, iowait, total


class CpuSampler:
    """CPU used by named groups of processes between ``mark_start`` and ``mark_end``.

    ``groups`` maps a name to a function giving the group's root pids (evaluated at each mark)
    and whether the roots' descendants belong to the group too (PostgreSQL's backends do; the
    load generator's do not, since the server under test is its child).
    """

    def __init__(self, groups: dict[str, tuple[Callable[[], Iterable[int]], bool]]) -> None:
        self._groups = groups
        self._start: Snapshot | None = None
        self._end: Snapshot | None = None

    def _snapshot(self) -> Snapshot:
        table = _proc_table()
        per_group: dict[str, dict[int, int]] = {}
        for name, (roots, with_descendants) in self._groups.items():
            pids = _descendants(table, roots()) if with_descendants else set(roots()) & table.keys()
            per_group[name] = {pid: table[pid][1] for pid in pids}
        return time.perf_counter(), per_group, _machine_ticks()

    def mark_start(self) -> None:
        self._start = self._snapshot()
        self._end = None

    def mark_end(self) -> None:
        if self._start is not None:
            self._end = self._snapshot()

    def report(self) -> dict[str, float | None]:
        """CPU over the window, in % of one core: ``<group>_pct_of_core`` per group, and
        ``other_pct_of_core`` for everything else on the machine (another workload competing for
        the cores shows up here); plus ``machine_busy_pct`` and ``machine_iowait_pct`` as % of all
        cores. Nones when the window was never opened or /proc is not there."""
        keys = [f"{name}_pct_of_core" for name in self._groups]
        keys += ["other_pct_of_core", "machine_busy_pct", "machine_iowait_pct"]
        if self._start is None or self._end is None or self._end[0] <= self._start[0]:
            return dict.fromkeys(keys)
        (t0, before, m0), (t1, after, m1) = self._start, self._end
        wall = t1 - t0
        out: dict[str, float | None] = {}
        ours = 0.0
        for name in self._groups:
            ticks = sum(t - before[name].get(pid, 0) for pid, t in after[name].items())
            ours += ticks
            out[f"{name}_pct_of_core"] = round(100 * ticks / _CLK_TCK / wall, 1)
        if m0 is not None and m1 is not None and m1[2] > m0[2]:
            busy, iowait, total = (m1[i] - m0[i] for i in range(3))
            out["other_pct_of_core"] = round(max(0.0, 100 * (busy - ours) / _CLK_TCK / wall), 1)
            out["machine_busy_pct"] = round(100 * busy / total, 1)
            out["machine_iowait_pct"] = round(100 * iowait / total, 1)
        else:
            out |= dict.fromkeys(["other_pct_of_core", "machine_busy_pct", "machine_iowait_pct"])
        return out


def background_load(seconds: float = 1.0) -> float | None:
    """% of one core busy on this machine over ``seconds`` before the benchmark starts: anything
    well above zero is another workload that will compete with the figures."""
    sampler = CpuSampler({})
    sampler.mark_start()
    time.sleep(seconds)
    sampler.mark_end()
    return sampler.report()["other_pct_of_core"]


def _first_line_value(path: str, prefix: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(prefix):
                return line.split(":", 1)[1].strip()
    except OSError:
        return None
    return None


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts() -> dict[str, object]:
    """What the figures depend on: cores, CPU model, memory, OS, Python and library versions."""
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    try:
        load = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        load = []
    return {
        "nproc": affinity or os.cpu_count(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _first_line_value("/proc/cpuinfo", "model name"),
        "memory_total": _first_line_value("/proc/meminfo", "MemTotal"),
        "loadavg_at_start": load,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "python_implementation": platform.python_implementation(),
        "packages": {
            name: _version(name)
            for name in ("litestar", "uvicorn", "uvloop", "httptools", "asyncpg", "msgspec")
        },
    }
