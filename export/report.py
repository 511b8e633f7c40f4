"""Markdown table and latency-vs-accuracy PNG, rendered from the benchmark's JSON file only.

Both are built from the JSON on disk (never from in-memory results), so every number a
reader sees in the table or the plot is the one stored in the JSON.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from export.timing import NOISY_RATIO
from rrd_fast.atomic import atomic_path

COLUMNS = [
    ("run", "student"), ("method", "method"), ("backend", "backend"), ("precision", "precision"),
    ("batch", "batch_size"), ("p50 ms", "p50_ms"), ("p90 ms", "p90_ms"), ("p99 ms", "p99_ms"),
    ("p90 / p50", "p90_over_p50"), ("img/s (batch / p50)", "throughput_ips"), ("p50 / eager", "p50_vs_eager"),
    ("top-1 %", "top1"), ("torch top-1 %", "torch_top1"), ("Δ top-1", "top1_delta"),
    ("max abs Δlogit", "max_abs_logit_diff"), ("same top-1 %", "top1_agreement"),
]

_LATENCY_KEYS = ("p50_ms", "p90_ms", "p99_ms", "throughput_ips")
_FORMATS = {
    "p50_ms": "{:.3f}", "p90_ms": "{:.3f}", "p99_ms": "{:.3f}", "throughput_ips": "{:.1f}", "p50_vs_eager": "{:.3f}",
    "top1": "{:.2f}", "torch_top1": "{:.2f}", "top1_delta": "{:+.2f}", "max_abs_logit_diff": "{:.2e}",
    "top1_agreement": "{:.2f}", "p90_over_p50": "{:.2f}",
}


def spread(row: dict[str, Any]) -> tuple[float, bool]:
    """(p90 / p50, noisy) of a result row; computed from p50 and p90 for JSON written before they were stored."""
    lat = row["latency"]
    ratio = lat.get("p90_over_p50")
    if ratio is None:
        ratio = lat["p90_ms"] / lat["p50_ms"] if lat["p50_ms"] > 0 else float("inf")
    noisy = lat.get("noisy")
    return float(ratio), bool(ratio > NOISY_RATIO) if noisy is None else bool(noisy)


def cell(row: dict[str, Any], key: str) -> str:
    """One table cell, formatted from the JSON row (latency fields live under row['latency'])."""
    if key == "p90_over_p50":
        ratio, noisy = spread(row)
        return _FORMATS[key].format(ratio) + (" noisy" if noisy else "")
    value = row["latency"].get(key) if key in _LATENCY_KEYS else row.get(key)
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
        f"- latency (p50/p90/p99 ms): wall time of one call on one batch of `batch` images; {s['warmup']} warm-up "
        f"calls excluded, up to {s['iters']} timed calls per point"
        + (f" (time budget {s['budget_s']} s)" if s.get("budget_s") else "")
        + f", timer {report['device']['timer']}",
        "- img/s: throughput of those same calls, batch / p50 latency (so a row's img/s and p50 always agree)",
        f"- p90 / p50: spread of the timed calls; above {NOISY_RATIO:g} the point is marked noisy (in the plot too): "
        "the machine was busy or too few calls were timed, so rerun with more --iters on an idle machine",
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
    """One panel per batch size: p50 latency (log x, whisker to p90) against top-1.

    The Pareto front is circled, every point is labelled with its run, method and backend,
    and noisy points (p90 / p50 above NOISY_RATIO) are crossed in red and say so in their
    label. The figure is saved with a tight bounding box, so no label is cut off.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = report["results"]
    sizes = sorted({r["batch_size"] for r in rows})
    backends = sorted({r["backend"] for r in rows})
    colors = {b: plt.get_cmap("tab10")(i % 10) for i, b in enumerate(backends)}
    markers = {"fp32": "o", "fp16": "s", "bf16": "D", "int8": "^"}
    ncols = min(2, max(1, len(sizes)))
    nrows = -(-max(1, len(sizes)) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(8.0 * ncols, 5.4 * nrows), squeeze=False)
    offsets = [6, -12, 16, -22, 26, -32]
    legend: dict[str, Any] = {}
    for ax, size in zip(axes.flat, sizes):
        panel = [r for r in rows if r["batch_size"] == size]
        points = [(r["latency"]["p50_ms"], r["top1"]) for r in panel]
        logs = [math.log10(x) for x, _ in points if x > 0]
        middle = 10 ** ((min(logs) + max(logs)) / 2) if logs else 0.0  # the panel's middle on its log axis
        for rank, i in enumerate(sorted(range(len(panel)), key=lambda k: points[k])):
            r, (x, y) = panel[i], points[i]
            ratio, noisy = spread(r)
            color = colors[r["backend"]]
            ax.plot([x, r["latency"]["p90_ms"]], [y, y], color=color, linewidth=1.0, alpha=0.6, zorder=2)
            legend.setdefault("whisker: p50 to p90", Line2D([], [], color="0.4", linewidth=1.0))
            handle = ax.scatter([x], [y], color=color, marker=markers.get(r["precision"], "o"), s=42, zorder=3)
            legend.setdefault(f"{r['backend']} {r['precision']}", handle)
            if noisy:
                cross = ax.scatter([x], [y], color="red", marker="x", s=90, linewidths=1.4, zorder=5)
                legend.setdefault(f"noisy: p90/p50 > {NOISY_RATIO:g}", cross)
            text = r["label"] + (f" [noisy, p90/p50 {ratio:.1f}]" if noisy else "")
            right = x > middle  # labels of the slower half point left, so they stay inside the figure
            ax.annotate(text, (x, y), textcoords="offset points", xytext=(-6 if right else 6, offsets[rank % len(offsets)]),
                        ha="right" if right else "left", fontsize=6.5, color="red" if noisy else "black",
                        annotation_clip=False, arrowprops={"arrowstyle": "-", "color": "0.6", "linewidth": 0.5})
        front = pareto_front(points)
        fx, fy = [points[i][0] for i in front], [points[i][1] for i in front]
        (line,) = ax.plot(fx, fy, linestyle="--", color="0.4", linewidth=1, drawstyle="steps-post", zorder=2)
        legend.setdefault("Pareto front", line)
        ax.scatter(fx, fy, facecolors="none", edgecolors="black", s=160, linewidths=1.2, zorder=4)
        ax.set_xscale("log")
        ax.margins(x=0.15, y=0.12)
        ax.set_xlabel("p50 latency of one call on one batch (ms, log scale)")
        ax.set_ylabel("top-1 of the exported artifact (%)")
        ax.set_title(f"batch {size}: img/s = {size} / p50")
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(sizes):]:
        ax.set_visible(False)
    fig.suptitle(f"Latency vs accuracy on {report['device']['name']} (circled: Pareto front)", fontsize=11)
    fig.legend(list(legend.values()), list(legend.keys()), loc="lower center", ncol=min(5, max(1, len(legend))),
               fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", pad_inches=0.25)
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
