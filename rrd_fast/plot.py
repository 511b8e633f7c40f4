"""Training curves drawn from runs' metrics.jsonl: top-1 and every loss term against epoch.

    python -m rrd_fast.plot RUN_DIR [RUN_DIR ...] [--out FILE.png]

One panel for top-1 (eval solid, train dashed) and one per loss term, one colour per run, so
several runs compare side by side. Init-stage records ("stage": "init", the AB/FT/FSP
pretraining epochs, numbered from 1 on their own) get their own shaded panels with an
"init epoch" axis rather than being squeezed in front of epoch 1. A panel whose values span
decades is drawn on a log scale. The figure is built on matplotlib's Agg canvas directly (no
pyplot), so calling it from the trainer touches no global backend state.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import matplotlib
import yaml
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from pipelines.errors import UserError
from rrd_fast.atomic import atomic_path
from rrd_fast.cli import run_cli

CURVES_NAME = "curves.png"
METRICS_NAME = "metrics.jsonl"
_LOG_RATIO = 20.0  # max/min of a panel's values above which it gets a log scale
_MARKERS_UP_TO = 40  # epochs per line up to which points are marked (a lone epoch is still visible)
_INIT_FACE = "#f4efe1"


class PlotError(UserError):
    """A run folder that cannot be plotted (missing or malformed metrics.jsonl)."""


@dataclass(frozen=True)
class RunCurves:
    """One run's epoch records and the name it goes by in the legend."""

    path: Path
    method: str
    records: list[dict[str, Any]]

    @property
    def folder(self) -> str:
        return self.path.name


def _method_section(run_dir: Path) -> dict[str, Any]:
    """The method as the run recorded it: model.json's sidecar, else config.yaml; {} when neither reads."""
    for name, read in (("model.json", json.loads), ("config.yaml", yaml.safe_load)):
        try:
            data = read((run_dir / name).read_text())
        except (OSError, ValueError, yaml.YAMLError):
            continue
        section = data.get("method") if isinstance(data, dict) else None
        if isinstance(section, dict) and section.get("name"):
            return section
    return {}


def method_label(run_dir: str | Path) -> str:
    """`rrd`, `rrd+kd` (a method with a KD term on top), `kd`, ...; `?` when the run names none."""
    section = _method_section(Path(run_dir))
    name = str(section.get("name") or "?")
    alpha = section.get("alpha")
    if name not in ("kd", "?") and isinstance(alpha, (int, float)) and alpha > 0:
        return f"{name}+kd"
    return name


def read_run(run_dir: str | Path) -> RunCurves:
    """Read RUN_DIR/metrics.jsonl; a missing folder, file or malformed line is a one-line PlotError."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: not a run folder (expected a folder holding {METRICS_NAME})")
    path = run_dir / METRICS_NAME
    if not path.is_file():
        raise PlotError(f"{path}: not found; expected a run folder written by rrd_fast.train")
    records = []
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PlotError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise PlotError(f"{path}:{lineno}: expected a JSON object with an integer 'epoch'")
        records.append(record)
    if not records:
        raise PlotError(f"{path}: holds no epoch records yet")
    return RunCurves(run_dir, method_label(run_dir), records)


def _labels(runs: Sequence[RunCurves]) -> list[str]:
    """Folder name and method; runs whose folders share a name are told apart by their parent folder."""
    names = [r.folder for r in runs]
    return [f"{r.path.parent.name}/{r.folder}" if names.count(r.folder) > 1 else r.folder for r in runs]


def _stage(record: dict[str, Any]) -> str:
    return "init" if record.get("stage") == "init" else "main"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _loss_panels(runs: Sequence[RunCurves]) -> list[tuple[str, str]]:
    """(stage, key) for every `loss_*` key present; init-stage panels last, CE and KD first."""
    found: set[tuple[str, str]] = set()
    for run in runs:
        for record in run.records:
            found.update((_stage(record), k) for k, v in record.items() if k.startswith("loss_") and _is_number(v))
    order = {"loss_ce": 0, "loss_kd": 1}
    return sorted(found, key=lambda sk: (sk[0] == "init", order.get(sk[1], 2), sk[1]))


def _series(run: RunCurves, stage: str, key: str) -> tuple[list[int], list[float]]:
    points = [(r["epoch"], float(r[key])) for r in run.records if _stage(r) == stage and _is_number(r.get(key))]
    return [p[0] for p in points], [p[1] for p in points]


def _finish_axis(ax: Any, values: list[float], xlabel: str, ylabel: str, title: str) -> None:
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) >= _LOG_RATIO:
        ax.set_yscale("log")
        title += " (log scale)"
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="major", alpha=0.3)
    ax.xaxis.get_major_locator().set_params(integer=True)


def build_figure(runs: Sequence[RunCurves]) -> Figure:
    """The curves figure; every data line carries gid `<legend label>|<stage>|<key>` so it can be read back."""
    if not runs:
        raise PlotError("no runs to plot")
    labels = _labels(runs)
    cmap = matplotlib.colormaps["tab10" if len(runs) <= 10 else "tab20"]
    colors = [cmap(i % cmap.N) for i in range(len(runs))]
    panels: list[tuple[str, str]] = [("main", "top1")] + _loss_panels(runs)
    ncols = 2 if len(panels) in (2, 4) else min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig = Figure(figsize=(4.8 * ncols, 3.5 * nrows + 0.5 + 0.25 * len(runs) / ncols), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax, (stage, key) in zip(axes, panels):
        values: list[float] = []
        for run, label, color in zip(runs, labels, colors):
            series = [("top1", "-"), ("train_top1", "--")] if key == "top1" else [(key, "-")]
            for name, style in series:
                xs, ys = _series(run, stage, name)
                if not xs:
                    continue
                marker = "o" if len(xs) <= _MARKERS_UP_TO else None
                ax.plot(xs, ys, linestyle=style, marker=marker, markersize=3.5, color=color, linewidth=1.6,
                        gid=f"{label}|{stage}|{name}")
                values += ys
            if key == "top1":
                xs, ys = _series(run, "main", "top1")
                finite = [(y, x) for x, y in zip(xs, ys) if math.isfinite(y)]
                if finite:
                    best_y, best_x = max(finite)
                    ax.plot([best_x], [best_y], marker="*", markersize=11, color=color, markeredgecolor="black",
                            markeredgewidth=0.6, linestyle="none", zorder=5, gid=f"{label}|main|best_top1")
        if key == "top1":
            _finish_axis(ax, [], "epoch", "top-1 (%)", "top-1")
            ax.legend(handles=[Line2D([], [], color="0.3", linestyle="-", label="eval"),
                               Line2D([], [], color="0.3", linestyle="--", label="train"),
                               Line2D([], [], color="0.3", marker="*", linestyle="none", markersize=9, label="best eval")],
                      fontsize=8, loc="best", framealpha=0.85)
        elif stage == "init":
            ax.set_facecolor(_INIT_FACE)
            _finish_axis(ax, values, "init epoch", "loss", f"{key}, init stage")
        else:
            _finish_axis(ax, values, "epoch", "loss", key)
    for ax in axes[len(panels):]:
        ax.set_visible(False)
    handles = [Line2D([], [], color=c, linewidth=2.5, label=label if label == run.method else f"{label} ({run.method})")
               for run, label, c in zip(runs, labels, colors)]
    ncol = min(len(handles), 3)
    row_major = [h for c in range(ncol) for h in handles[c::ncol]]  # legends fill column by column
    fig.legend(handles=row_major, loc="outside lower center", ncol=ncol, fontsize=9, frameon=False)
    title = f"Training curves: {handles[0].get_label()}" if len(runs) == 1 else f"Training curves: {len(runs)} runs"
    fig.suptitle(title, fontsize=12)
    return fig


def save_figure(fig: Figure, out: str | Path) -> Path:
    """Write the figure as PNG atomically (a reader never sees half a file)."""
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight", pad_inches=0.15)
    return out


def plot_runs(run_dirs: Sequence[str | Path], out: str | Path) -> Path:
    """Read every run, draw them side by side and write `out`."""
    return save_figure(build_figure([read_run(d) for d in run_dirs]), out)


def write_curves(run_dir: str | Path) -> Path:
    """Write RUN_DIR/curves.png for one run (the trainer calls this when a run ends)."""
    run_dir = Path(run_dir)
    return plot_runs([run_dir], run_dir / CURVES_NAME)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rrd_fast.plot",
                                     description="Plot loss terms and top-1 against epoch from runs' metrics.jsonl.")
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders holding metrics.jsonl")
    parser.add_argument("--out", metavar="FILE.png",
                        help=f"output PNG (default: RUN_DIR/{CURVES_NAME} for one run, ./{CURVES_NAME} for several)")
    args = parser.parse_args(argv)
    out = Path(args.out) if args.out else (Path(args.runs[0]) / CURVES_NAME if len(args.runs) == 1 else Path(CURVES_NAME))
    if out.suffix.lower() != ".png":
        raise PlotError(f"--out {out}: expected a .png file name")
    print(plot_runs(args.runs, out))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
