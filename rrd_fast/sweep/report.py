"""The sweep's results: results.json from the run folders, then results.md, .csv and .png from results.json.

`collect` reads each finished run's metrics.jsonl (top-1 of the last and of the best
epoch), groups seeds per pair and method (mean and sample std, ddof=1), and adds the
teacher's measured top-1 and the published numbers with their differences.
`render` reads only results.json, so the table and the figure show exactly what the JSON
holds; `write_report` does both. A sweep with a transfer section also gets the transfer
table (rrd_fast.sweep.transfer_report): results.json's "transfer", a second table in
results.md, rows with table "transfer" in results.csv, and results_transfer.png.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

from rrd_fast.atomic import atomic_path, write_json_atomic
from rrd_fast.sweep.acceptance import measured_teachers, pair_key
from rrd_fast.sweep.plan import Plan, main_records, read_plan, run_state
from rrd_fast.sweep.stats import mean_std_text as _mean_std, number_text as _num, pooled_std, stats
from rrd_fast.sweep.status import read_status
from rrd_fast.sweep.transfer_report import (CSV_EXTRA, build_transfer_figure, collect_transfer,
                                            render_transfer_markdown, transfer_csv_rows)

RESULTS_FORMAT = "rrd-fast-sweep-results/1"
STUDENT_ALONE = "vanilla"


def run_top1(run_dir: Path, epochs: int) -> dict[str, float] | None:
    """Top-1 of the last and the best epoch of a finished run, from its metrics.jsonl."""
    if run_state(run_dir, epochs).state != "done":
        return None
    evaluated = [r for r in main_records(run_dir) if "top1" in r]
    if not evaluated:
        return None
    best = max(evaluated, key=lambda r: r["top1"])
    return {"last": float(evaluated[-1]["top1"]), "best": float(best["top1"]), "best_epoch": int(best["epoch"])}


def _row(plan: Plan, method: str, seeds: dict[str, str], label: str, published: Any) -> dict[str, Any]:
    per_seed = {}
    pending, failed = [], []
    for seed, name in seeds.items():
        top1 = run_top1(plan.run_dir(name), plan.runs[name].epochs)
        if top1 is not None:
            per_seed[int(seed)] = top1
        else:
            status = read_status(plan.path, name)
            (failed if status and status.get("status") == "failed" else pending).append(int(seed))
    ordered = sorted(per_seed)
    last = stats([per_seed[s]["last"] for s in ordered])
    best = stats([per_seed[s]["best"] for s in ordered])
    pub = published.top1 if published else None
    return {
        "method": method, "label": label, "n": len(ordered), "seeds": ordered, "planned_seeds": sorted(int(s) for s in seeds),
        "pending_seeds": sorted(pending), "failed_seeds": sorted(failed),
        "runs": {str(s): seeds[str(s)] for s in ordered},
        "top1_last": last, "top1_best": best,
        "best_epochs": [per_seed[s]["best_epoch"] for s in ordered],
        "published": pub, "published_source": published.source if published else None,
        "diff_last": last["mean"] - pub if pub is not None and last["mean"] is not None else None,
        "diff_best": best["mean"] - pub if pub is not None and best["mean"] is not None else None,
    }


def compare_to_student(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each method against the student alone: |mean difference| against the pooled seed std."""
    base = next((r for r in rows if r["method"] == STUDENT_ALONE), None)
    out = []
    if base is None or not base["n"]:
        return out
    for row in rows:
        if row is base or not row["n"]:
            continue
        entry: dict[str, Any] = {"method": row["method"], "label": row["label"]}
        for which in ("top1_last", "top1_best"):
            diff = row[which]["mean"] - base[which]["mean"]
            pooled = pooled_std(row[which], row["n"], base[which], base["n"])
            entry[which] = {"diff": diff, "pooled_std": pooled,
                            "exceeds": None if pooled is None else abs(diff) > pooled}
        out.append(entry)
    return out


def collect(sweep_dir: str | Path) -> dict[str, Any]:
    """results.json's content, from the plan and the run folders."""
    plan = read_plan(sweep_dir)
    table = None
    if plan.published:
        from rrd_fast.sweep.published import load_published

        table = load_published(plan.published)
    measured = measured_teachers(plan.path)
    from rrd_fast.sweep.published import load_published as _load

    labels = (table or _load("cifar100")).data.get("methods", {})  # "KD", "RRD+KD", ... even without a published table
    pairs = []
    for pair in plan.pairs:
        key = pair.published
        found = pair_key(plan, pair)
        teacher = measured.get(found[0]) if found else None
        rows = []
        if pair.student_alone:
            rows.append(_row(plan, STUDENT_ALONE, pair.student_alone, "student alone",
                             table.student(key) if table else None))
        for method, seeds in pair.runs.items():
            label = labels.get(method, {}).get("label", method)
            rows.append(_row(plan, method, seeds, label, table.method(key, method) if table else None))
        teacher_pub = table.teacher(key) if table else None
        pairs.append({
            "pair": pair.name, "teacher": pair.teacher, "student": pair.student, "published_key": key,
            "teacher_checkpoint": pair.teacher_checkpoint, "teacher_run": pair.teacher_run or None,
            "teacher_top1": teacher["top1"] if teacher else None,
            "teacher_published": teacher_pub.top1 if teacher_pub else None,
            "teacher_min_top1": pair.threshold["value"] if pair.threshold else None,
            "rows": rows, "vs_student_alone": compare_to_student(rows), "excluded": pair.excluded,
        })
    failed = []
    for name in plan.runs:
        status = read_status(plan.path, name)
        if status and status.get("status") == "failed" and run_state(plan.run_dir(name), plan.runs[name].epochs).state != "done":
            failed.append({"run": name, "error": status.get("error")})
    return {
        "format": RESULTS_FORMAT, "sweep": plan.name, "source": plan.source, "sweep_dir": plan.sweep_dir,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seeds": plan.seeds,
        "metric": "top-1 (%) on the eval split; last: the final epoch, best: the best epoch of each run",
        "published": ({"file": str(table.path), "metric": table.data.get("metric"), "sources": table.sources}
                      if table else None),
        "pairs": pairs, "failed": failed,
        "transfer": collect_transfer(plan, table, labels),
    }


# ---------------------------------------------------------------------- rendering (from results.json only)
def verdict(entry: dict[str, Any], which: str) -> str:
    """One clause in words: the mean difference, and whether it exceeds the pooled seed std."""
    part = entry[which]
    when = "last epoch" if which == "top1_last" else "best epoch"
    diff, pooled = part["diff"], part["pooled_std"]
    if pooled is None:
        return f"{_num(diff, sign=True)} ({when}; the spread is unknown with a single seed)"
    if pooled == 0:
        words = "no difference, and no spread" if diff == 0 else "no spread among the seeds, so any difference exceeds it"
        return f"{_num(diff, sign=True)} ({when}; {words})"
    words = "exceeds" if part["exceeds"] else "does not exceed"
    return f"{_num(diff, sign=True)} ({when}), which {words} the pooled seed std {_num(pooled)} ({abs(diff) / pooled:.1f}x)"


def render_markdown(results: dict[str, Any]) -> str:
    lines = [f"# Sweep {results['sweep']}: results", "",
             "Top-1 (%) on the eval split, mean ± sample std (ddof=1) over the finished seeds (n) of the last and of "
             "the best epoch of each run. Published: the paper's number; Δ = our mean − published."]
    if results.get("published"):
        lines += ["", f"Published numbers from {results['published']['file']}:"]
        lines += [f"- {key}: {text}" for key, text in results["published"]["sources"].items()]
    for pair in results["pairs"]:
        lines += ["", f"## {pair['teacher']} → {pair['student']} ({pair['pair']})", ""]
        teacher = f"Teacher {pair['teacher']}: measured top-1 {_num(pair['teacher_top1'])}"
        teacher += f", published {_num(pair['teacher_published'])}" if pair["teacher_published"] is not None else ""
        teacher += f" ({pair['teacher_checkpoint']})"
        lines += [teacher, "", "| method | n | top-1 last | top-1 best | published | Δ last | Δ best | source |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in pair["rows"]:
            label = row["label"] if row["label"] == row["method"] else f"{row['label']} ({row['method']})"
            notes = []
            if row["failed_seeds"]:
                notes.append(f"failed seeds {row['failed_seeds']}")
            if row["pending_seeds"]:
                notes.append(f"pending seeds {row['pending_seeds']}")
            label += f" [{'; '.join(notes)}]" if notes else ""
            lines.append(f"| {label} | {row['n']} | {_mean_std(row['top1_last'], row['n'])} | "
                         f"{_mean_std(row['top1_best'], row['n'])} | {_num(row['published'])} | "
                         f"{_num(row['diff_last'], sign=True)} | {_num(row['diff_best'], sign=True)} | "
                         f"{row['published_source'] or ''} |")
        for method, reason in pair["excluded"].items():
            lines.append(f"| {method} | — | excluded: {reason} | | | | | |")
        comparisons = compare_to_student(pair["rows"])
        if comparisons:
            lines += ["", "Against the student alone:"]
            for entry in comparisons:
                lines.append(f"- {entry['label']}: {verdict(entry, 'top1_last')}; {verdict(entry, 'top1_best')}.")
    if results["failed"]:
        lines += ["", "## Failed runs", ""] + [f"- {f['run']}: {f['error']}" for f in results["failed"]]
    lines += render_transfer_markdown(results)
    return "\n".join(lines) + "\n"


# `table`: "main" for the sweep's own table, "transfer" for the linear probes (their dataset, bn and epochs filled).
CSV_FIELDS = ["table", "pair", "teacher", "student", "method", "n", "seeds", "top1_last_mean", "top1_last_std",
              "top1_best_mean", "top1_best_std", "published", "diff_last", "diff_best", "teacher_top1",
              "teacher_published", *CSV_EXTRA]


def render_csv(results: dict[str, Any]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    writer.writeheader()
    for pair in results["pairs"]:
        for row in pair["rows"]:
            writer.writerow({
                "table": "main", "pair": pair["pair"], "teacher": pair["teacher"], "student": pair["student"], "method": row["method"],
                "n": row["n"], "seeds": " ".join(map(str, row["seeds"])),
                "top1_last_mean": row["top1_last"]["mean"], "top1_last_std": row["top1_last"]["std"],
                "top1_best_mean": row["top1_best"]["mean"], "top1_best_std": row["top1_best"]["std"],
                "published": row["published"], "diff_last": row["diff_last"], "diff_best": row["diff_best"],
                "teacher_top1": pair["teacher_top1"], "teacher_published": pair["teacher_published"],
            })
    for entry in transfer_csv_rows(results):
        writer.writerow(entry)
    return buf.getvalue()


def build_figure(results: dict[str, Any]) -> Any:
    """Per pair: each method's mean top-1 (last and best epoch) with its std as error bar, published as a star."""
    from matplotlib.figure import Figure

    pairs = results["pairs"]
    cols = min(3, max(len(pairs), 1))
    rows = math.ceil(max(len(pairs), 1) / cols)
    fig = Figure(figsize=(4.8 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    nan = float("nan")
    for ax, pair in zip(axes, pairs):
        entries = pair["rows"]
        x = list(range(len(entries)))
        for which, offset, marker, face in (("top1_last", -0.12, "o", None), ("top1_best", 0.12, "s", "none")):
            means = [r[which]["mean"] if r[which]["mean"] is not None else nan for r in entries]
            stds = [r[which]["std"] if r[which]["std"] is not None else 0.0 for r in entries]
            ax.errorbar([i + offset for i in x], means, yerr=stds, fmt=marker, mfc=face, capsize=3,
                        color="C0" if which == "top1_last" else "C1",
                        label=f"ours, {'last' if which == 'top1_last' else 'best'} epoch (mean ± std)")
        pub = [(i, r["published"]) for i, r in zip(x, entries) if r["published"] is not None]
        if pub:
            ax.scatter([i for i, _ in pub], [v for _, v in pub], marker="*", s=90, color="C3", zorder=3, label="published")
        if pair["teacher_top1"] is not None:
            ax.axhline(pair["teacher_top1"], color="0.5", linestyle="--", linewidth=1, label="teacher (measured)")
        ax.set_xticks(x, [r["label"] for r in entries], rotation=45, ha="right", fontsize=8)
        ax.set_title(f"{pair['teacher']} → {pair['student']}", fontsize=10)
        ax.set_ylabel("top-1 (%)")
        ax.grid(axis="y", alpha=0.3)
    for ax in axes[len(pairs):]:
        ax.set_visible(False)
    legend: dict[str, Any] = {}
    for ax in axes[:len(pairs)]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 2 * cols), fontsize=8,
                   frameon=False)
    fig.suptitle(f"Sweep {results['sweep']}")
    return fig


def render(sweep_dir: str | Path) -> dict[str, Path]:
    """results.md, results.csv and results.png (and results_transfer.png) from results.json (and nothing else)."""
    sweep_dir = Path(sweep_dir)
    results = json.loads((sweep_dir / "results.json").read_text())
    paths = {"json": sweep_dir / "results.json", "md": sweep_dir / "results.md", "csv": sweep_dir / "results.csv",
             "png": sweep_dir / "results.png"}
    with atomic_path(paths["md"]) as tmp:
        tmp.write_text(render_markdown(results))
    with atomic_path(paths["csv"]) as tmp:
        tmp.write_text(render_csv(results))
    fig = build_figure(results)
    with atomic_path(paths["png"]) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    if results.get("transfer"):
        paths["transfer_png"] = sweep_dir / "results_transfer.png"
        with atomic_path(paths["transfer_png"]) as tmp:
            build_transfer_figure(results).savefig(tmp, format="png", dpi=110)
    return paths


def write_report(sweep_dir: str | Path) -> dict[str, Path]:
    sweep_dir = Path(sweep_dir)
    write_json_atomic(sweep_dir / "results.json", collect(sweep_dir))
    return render(sweep_dir)
