"""Markdown table and latency-vs-accuracy PNG, rendered from the benchmark's JSON file only.

Both are built from the JSON on disk (never from in-memory results), so every number a
reader sees in the table or the plot is the one stored in the JSON.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from rrd_fast.atomic import atomic_path

COLUMNS = [
    ("student", "student"), ("method", "method"), ("backend", "backend"), ("precision", "precision"),
    ("batch", "batch_size"), ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"),
    ("img/s", "throughput_ips"), ("p50 / eager", "p50_vs_eager"), ("top-1 %", "top1"),
    ("torch top-1 %", "torch_top1"), ("Δ top-1", "top1_delta"), ("max abs Δlogit", "max_abs_logit_diff"),
    ("same top-1 %", "top1_agreement"),
]

_FORMATS = {
    "p50_ms": "{:.3f}", "p90_ms": "{:.3f}", "p99_ms": "{:.3f}", "throughput_ips": "{:.1f}", "p50_vs_eager": "{:.3f}",
    "top1": "{:.2f}", "torch_top1": "{:.2f}", "top1_delta": "{:+.2f}", "max_abs_logit_diff": "{:.2e}",
    "top1_agreement": "{:.2f}",
}


def cell(row: dict[str, Any], key: str) -> str:
    """One table cell, formatted from the JSON row (latency fields live under row['latency'])."""
    value = row["latency"].get(key) if key in ("p50_ms", "p90_ms", "p99_ms", "throughput_ips") else row.get(key)
    if value is None:
        return "–"
    fmt = _FORMATS.get(key)
    return fmt.format(value) if fmt else str(value)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of points no other point beats: lower (or equal) latency and higher (or equal) accuracy, one strictly."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return sorted(front, key=lambda i: points[i][0])


def render_markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        "# Export benchmark: latency against accuracy",
        "",
        f"- device: {report['device']['name']} ({report['device']['type']}), torch threads {s['threads']}",
        f"- created: {report['created']}; versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(report["versions"].items())),
        f"- latency: {s['warmup']} warm-up calls excluded, up to {s['iters']} timed calls per point"
        + (f" (time budget {s['budget_s']} s)" if s.get("budget_s") else "")
        + f", timer {report['device']['timer']}; img/s = batch × calls / timed seconds",
        "- top-1: the exported artifact run on the whole evaluation split; agreement is against the torch "
        "checkpoint in fp32 on the same images",
        "- p50 / eager: p50 latency over eager's at the same batch size and precision (eager fp32 where eager "
        "did not run that precision)",
        "",
    ]
    for st in report["students"]:
        d = st["data"]
        lines.append(f"- {st['student']}: {st['arch']} trained with {st['method']} ({st['run_dir']}); "
                     f"evaluated on {d['n_eval']} images of {d['format']} {d['split']} ({d['root']})")
    lines += ["", "| " + " | ".join(h for h, _ in COLUMNS) + " |", "|" + "|".join("---" for _ in COLUMNS) + "|"]
    for row in report["results"]:
        lines.append("| " + " | ".join(cell(row, key) for _, key in COLUMNS) + " |")
    if report.get("skipped"):
        lines += ["", "Skipped:", ""]
        lines += [f"- {k['student']} / {k['backend']} / {k['precision']}: {k['reason']}" for k in report["skipped"]]
    return "\n".join(lines) + "\n"


def render_png(report: dict[str, Any], path: str | Path):  # noqa: ANN201 - returns a matplotlib Figure
    """One panel per batch size: p50 latency (log x) against top-1, Pareto front marked, points labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["results"]
    sizes = sorted({r["batch_size"] for r in rows})
    backends = sorted({r["backend"] for r in rows})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    markers = {"fp32": "o", "fp16": "s", "bf16": "D", "int8": "^"}
    ncols = min(2, max(1, len(sizes)))
    nrows = -(-max(1, len(sizes)) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 5.2 * nrows), squeeze=False)
    offsets = [(5, 6), (5, -12), (5, 16), (5, -22), (5, 26), (5, -32)]
    legend: dict[str, Any] = {}
    for ax, size in zip(axes.flat, sizes):
        panel = [r for r in rows if r["batch_size"] == size]
        points = [(r["latency"]["p50_ms"], r["top1"]) for r in panel]
        for rank, i in enumerate(sorted(range(len(panel)), key=lambda k: points[k])):
            r, (x, y) = panel[i], points[i]
            handle = ax.scatter([x], [y], color=colors[r["backend"]], marker=markers.get(r["precision"], "o"), s=42,
                                zorder=3)
            legend.setdefault(f"{r['backend']} {r['precision']}", handle)
            ax.annotate(r["label"], (x, y), textcoords="offset points", xytext=offsets[rank % len(offsets)],
                        fontsize=6.5, arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})
        front = pareto_front(points)
        fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
        (line,) = ax.plot(fx, fy, linestyle="--", color="0.4", linewidth=1, drawstyle="steps-post", zorder=2)
        legend.setdefault("Pareto front", line)
        ax.scatter(fx, fy, facecolors="none", edgecolors="black", s=160, linewidths=1.2, zorder=4)
        ax.set_xscale("log")
        ax.margins(x=0.12, y=0.1)
        ax.set_xlabel("p50 latency per batch (ms, log scale)")
        ax.set_ylabel("top-1 of the exported artifact (%)")
        ax.set_title(f"batch {size}")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(sizes):]:
        ax.set_visible(False)
    fig.suptitle(f"Latency vs accuracy on {report['device']['name']} (circled: Pareto front)", fontsize=11)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=min(6, max(1, len(legend))),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    return fig


def write_reports(json_path: str | Path, md_path: str | Path | None = None, png_path: str | Path | None = None) -> tuple[Path, Path]:
    """Read the benchmark JSON and write the markdown table and the PNG next to it."""
    json_path = Path(json_path)
    report = json.loads(json_path.read_text())
    md_path = Path(md_path) if md_path else json_path.with_suffix(".md")
    png_path = Path(png_path) if png_path else json_path.with_suffix(".png")
    with atomic_path(md_path) as tmp:
        tmp.write_text(render_markdown(report))
    import matplotlib.pyplot as plt

    plt.close(render_png(report, png_path))
    return md_path, png_path
