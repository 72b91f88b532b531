"""The report as a picture: per scenario, spends per second and p50/p99 latency, HTTP beside the
raw-SQL limit (``make bench`` writes it beside the JSON report; the README embeds it)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import matplotlib as mpl

mpl.use("Agg")  # no screen: render to a file

import matplotlib.pyplot as plt

_COLOURS = {"http": "#3b6ea8", "sql": "#b0b0b0"}
_LABELS = {"http": "HTTP", "sql": "raw SQL (event store, no HTTP)"}


def write_chart(report: dict[str, Any], path: Path) -> Path | None:
    """Draw the report's spend scenarios to ``path`` (PNG); None when it has none."""
    scenarios = report.get("scenarios") or []
    workloads = list(dict.fromkeys(s["workload"] for s in scenarios))
    if not workloads:
        return None
    by = {(s["workload"], s["transport"]): s for s in scenarios}
    titles = {s["workload"]: f"{textwrap.fill(s['title'], 16)}\n{s['clients']} clients" for s in scenarios}
    fig, (rate_ax, latency_ax) = plt.subplots(1, 2, figsize=(15, 6), dpi=100)
    width = 0.38
    for offset, transport in ((-width / 2, "http"), (width / 2, "sql")):
        xs = [i + offset for i, w in enumerate(workloads) if (w, transport) in by]
        rows = [by[(w, transport)] for w in workloads if (w, transport) in by]
        if not rows:
            continue
        rates = [r["spends_per_s"] for r in rows]
        bars = rate_ax.bar(xs, rates, width, color=_COLOURS[transport], label=_LABELS[transport])
        rate_ax.bar_label(bars, labels=[f"{v:,.0f}" for v in rates], fontsize=8, padding=2)
        p50 = [r["latency_ms"]["p50"] or 0 for r in rows]
        p99 = [r["latency_ms"]["p99"] or 0 for r in rows]
        latency_ax.bar(
            xs, p99, width, color=_COLOURS[transport], alpha=0.45, label=f"{_LABELS[transport]} p99"
        )
        latency_ax.bar(xs, p50, width, color=_COLOURS[transport], label=f"{_LABELS[transport]} p50")
        for x, low, high in zip(xs, p50, p99, strict=True):
            latency_ax.annotate(f"{low:.1f} / {high:.1f}", (x, high), ha="center", va="bottom", fontsize=7)
    for ax in (rate_ax, latency_ax):
        ax.set_xticks(range(len(workloads)), [titles[w] for w in workloads], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    rate_ax.set_ylabel("per second: spends (each of a batch's), or reads")
    rate_ax.set_title("Throughput", fontsize=10)
    rate_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    latency_ax.set_ylabel("milliseconds per request (p50, p99)")
    latency_ax.set_yscale("log")
    latency_ax.set_title("Latency per request: p50 (solid), p99 (light)", fontsize=10)
    latency_ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, frameon=False)
    machine = report.get("machine", {})
    cores = machine.get("cpu_count") or machine.get("cores")
    fig.suptitle(
        f"Tally make bench, {str(report.get('started_at', ''))[:10]}, commit {report.get('commit') or '?'}"
        + (f", {cores} cores" if cores else "")
        + (f" ({machine['cpu_model']})" if machine.get("cpu_model") else ""),
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
