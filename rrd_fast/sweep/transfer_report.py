"""The report's transfer table: the sweep's linear probes per pair, method and data set, like the paper's.

`collect_transfer` reads each planned probe's result.json (`rrd_fast.transfer.read_results`)
and groups seeds per pair, row (the teacher, the student alone, each method) and data set:
top-1 of the probe's last epoch (the paper's figure) and of its best epoch, mean and sample
std over seeds with n, the published value and the difference where the paper has one, and
the BatchNorm mode each result.json records. Rendering (markdown lines, CSV rows, the
figure) reads only that section of results.json.
"""

from __future__ import annotations

from typing import Any

from rrd_fast.sweep.plan import PairPlan, Plan, PlannedProbe
from rrd_fast.sweep.probes import DATASET_LABELS, probe_result
from rrd_fast.sweep.stats import mean_std_text, number_text as _num, stats
from rrd_fast.sweep.status import read_status

BN_TEXT = {
    "train": "the frozen network's BatchNorm ran in train mode while probing (the reference's protocol: batch "
             "statistics, running statistics adapting to the target data; its parameters never change)",
    "eval": "the frozen network's BatchNorm kept the checkpoint's statistics (eval mode) while probing",
}
METRIC = ("linear-probe top-1 (%) of the frozen network's pooled feature on the target's test split (STL-10 test, "
          "Tiny-ImageNet val); last: the probe's final epoch (what the paper reports), best: its best epoch")
TEACHER, STUDENT_ALONE = "teacher", "vanilla"


def _stats(values: list[float]) -> dict[str, Any]:

    return stats(values)


def _cell(plan: Plan, probes: dict[int, PlannedProbe], published: Any) -> dict[str, Any]:
    per_seed: dict[int, dict[str, Any]] = {}
    pending, failed = [], []
    for seed, probe in probes.items():
        result = probe_result(plan, probe)
        if result is not None:
            per_seed[seed] = result
        else:
            status = read_status(plan.path, probe.name)
            (failed if status and status.get("status") == "failed" else pending).append(seed)
    ordered = sorted(per_seed)
    last = _stats([float(per_seed[s]["top1_last"]) for s in ordered])
    best = _stats([float(per_seed[s]["top1_best"]) for s in ordered])
    pub = published.top1 if published else None
    return {
        "n": len(ordered), "seeds": ordered, "planned_seeds": sorted(probes), "pending_seeds": sorted(pending),
        "failed_seeds": sorted(failed), "runs": {str(s): probes[s].run for s in ordered},
        "top1_last": last, "top1_best": best,
        "best_epochs": [per_seed[s].get("best_epoch") for s in ordered],
        "epochs": [per_seed[s].get("epochs") for s in ordered],
        "bn": sorted({str(per_seed[s].get("bn")) for s in ordered}),
        "published": pub, "published_source": published.source if published else None,
        "diff_last": last["mean"] - pub if pub is not None and last["mean"] is not None else None,
        "diff_best": best["mean"] - pub if pub is not None and best["mean"] is not None else None,
    }


def _pair_rows(plan: Plan, pair: PairPlan, table: Any, labels: dict[str, Any]) -> list[dict[str, Any]]:
    transfer = plan.transfer or {}
    datasets = list(transfer.get("datasets", {}))
    order = ([TEACHER] if transfer.get("teacher") and pair.teacher_run else []) + list(transfer.get("methods", []))
    published_row = {TEACHER: "teacher", STUDENT_ALONE: "student"}
    rows = []
    for method in order:
        mine = [p for p in plan.probes.values() if p.method == method and pair.name in p.pairs]
        if not mine:
            continue  # a method excluded for this pair
        cells = {}
        for dataset in datasets:
            probes = {p.seed: p for p in mine if p.dataset == dataset}
            pub = table.transfer(pair.published, published_row.get(method, method), dataset) if table else None
            cells[dataset] = _cell(plan, probes, pub)
        label = {TEACHER: "Teacher", STUDENT_ALONE: "student alone"}.get(method) or \
            labels.get(method, {}).get("label", method)
        role = mine[0].role
        rows.append({"method": method, "label": label, "role": role, "datasets": cells})
    return rows


def collect_transfer(plan: Plan, table: Any, labels: dict[str, Any]) -> dict[str, Any] | None:
    """results.json's "transfer" section, or None for a sweep without one."""
    transfer = plan.transfer
    if not transfer:
        return None
    pairs = []
    for pair in plan.pairs:
        if pair.name not in transfer["pairs"]:
            continue
        notes = []
        if transfer.get("teacher") and not pair.teacher_run:
            notes.append("the teacher is imported (teacher_checkpoint), not trained by the sweep, so it is not probed")
        pairs.append({"pair": pair.name, "teacher": pair.teacher, "student": pair.student,
                      "published_key": pair.published, "rows": _pair_rows(plan, pair, table, labels), "notes": notes})
    epochs: dict[str, int] = {}
    for probe in plan.probes.values():
        epochs.setdefault(probe.dataset, probe.epochs)
    used = sorted({bn for p in pairs for r in p["rows"] for c in r["datasets"].values() for bn in c["bn"]})
    failed = []
    for name, probe in plan.probes.items():
        status = read_status(plan.path, name)
        if status and status.get("status") == "failed" and probe_result(plan, probe) is None:
            failed.append({"probe": name, "run": probe.run, "dataset": probe.dataset, "error": status.get("error")})
    info = table.transfer_info() if table else None
    published = None
    if info:
        published = {**info, "file": str(table.path), "source_text": table.source_text(info["source"])}
    return {"metric": METRIC, "bn": transfer["bn"], "bn_used": used, "bn_text": BN_TEXT[transfer["bn"]],
            "datasets": dict(transfer["datasets"]), "epochs": epochs, "published": published,
            "pairs": pairs, "failed": failed}


# ---------------------------------------------------------------------- rendering (from results.json only)
def render_transfer_markdown(results: dict[str, Any]) -> list[str]:
    """The second table of results.md (no lines for a sweep without a transfer section)."""
    transfer = results.get("transfer")
    if not transfer:
        return []
    datasets = list(transfer["datasets"])
    names = [DATASET_LABELS.get(d, d) for d in datasets]
    used = transfer["bn_used"] or [transfer["bn"]]
    bn = ", ".join(used) + (" (mixed: the result.json files disagree)" if len(used) > 1 else "")
    lines = ["", "## Transfer linear probe", "",
             f"{transfer['metric'][0].upper()}{transfer['metric'][1:]}. Mean ± sample std (ddof=1) over the finished "
             "seeds (n) of the last epoch; the best epoch is in results.json and results.csv. "
             "Published: the paper's number; Δ = our mean − published.",
             "", f"BatchNorm while probing: **{bn}**: {transfer['bn_text']}.",
             "Probe epochs: " + ", ".join(f"{DATASET_LABELS.get(d, d)} {transfer['epochs'].get(d, '?')}" for d in datasets)
             + " (a probe finished earlier with another count is marked in its row)."]
    if transfer.get("published"):
        pub = transfer["published"]
        lines += [f"Published transfer numbers ({', '.join(pub['pairs'])}, bn={pub.get('bn')}) from {pub['file']}: "
                  f"{pub['source_text']}."]
    header = "| method | " + " | ".join(f"{n} last | published | Δ" for n in names) + " |"
    for pair in transfer["pairs"]:
        lines += ["", f"### {pair['teacher']} → {pair['student']} ({pair['pair']}): transfer", "", header,
                  "|---|" + "---|---|---|" * len(datasets)]
        for row in pair["rows"]:
            label = row["label"] if row["label"] == row["method"] or row["method"] == "teacher" \
                else f"{row['label']} ({row['method']})"
            notes = []
            for dataset, name in zip(datasets, names):
                cell = row["datasets"][dataset]
                planned = transfer["epochs"].get(dataset)
                other = sorted({e for e in cell["epochs"] if e != planned})
                if other:
                    notes.append(f"{name} probes of {', '.join(map(str, other))} epochs, not the planned {planned}")
                if cell["failed_seeds"]:
                    notes.append(f"{name} failed seeds {cell['failed_seeds']}")
                if cell["pending_seeds"]:
                    notes.append(f"{name} pending seeds {cell['pending_seeds']}")
            label += f" [{'; '.join(notes)}]" if notes else ""
            parts = []
            for dataset in datasets:
                cell = row["datasets"][dataset]
                parts.append(f"{mean_std_text(cell['top1_last'], cell['n'], always_n=True)} | {_num(cell['published'])} | "
                             f"{_num(cell['diff_last'], sign=True)}")
            lines.append(f"| {label} | " + " | ".join(parts) + " |")
        lines += [f"- {note}" for note in pair["notes"]]
    if transfer["failed"]:
        lines += ["", "### Failed probes", ""] + [f"- {f['probe']}: {f['error']}" for f in transfer["failed"]]
    return lines


CSV_EXTRA = ["dataset", "bn", "probe_epochs", "best_epochs"]


def transfer_csv_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One CSV row per pair, row and data set (table "transfer"), in the main table's columns plus CSV_EXTRA."""
    transfer = results.get("transfer")
    if not transfer:
        return []
    out = []
    for pair in transfer["pairs"]:
        for row in pair["rows"]:
            for dataset, cell in row["datasets"].items():
                out.append({
                    "table": "transfer", "pair": pair["pair"], "teacher": pair["teacher"], "student": pair["student"],
                    "method": row["method"], "n": cell["n"], "seeds": " ".join(map(str, cell["seeds"])),
                    "top1_last_mean": cell["top1_last"]["mean"], "top1_last_std": cell["top1_last"]["std"],
                    "top1_best_mean": cell["top1_best"]["mean"], "top1_best_std": cell["top1_best"]["std"],
                    "published": cell["published"], "diff_last": cell["diff_last"], "diff_best": cell["diff_best"],
                    "dataset": dataset, "bn": " ".join(cell["bn"]) or transfer["bn"],
                    "probe_epochs": " ".join(map(str, cell["epochs"])),
                    "best_epochs": " ".join(map(str, cell["best_epochs"])),
                })
    return out


def build_transfer_figure(results: dict[str, Any]) -> Any:
    """Per pair and data set: each row's mean probe top-1 (last and best epoch) with its std, published as a star."""
    from matplotlib.figure import Figure

    transfer = results["transfer"]
    datasets = list(transfer["datasets"])
    pairs = transfer["pairs"]
    rows, cols = max(len(pairs), 1), max(len(datasets), 1)
    fig = Figure(figsize=(4.8 * cols, 3.8 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    nan = float("nan")
    legend: dict[str, Any] = {}
    for r, pair in enumerate(pairs):
        for c, dataset in enumerate(datasets):
            ax = axes[r][c]
            cells = [row["datasets"][dataset] for row in pair["rows"]]
            x = list(range(len(cells)))
            for which, offset, marker, face in (("top1_last", -0.12, "o", None), ("top1_best", 0.12, "s", "none")):
                means = [cell[which]["mean"] if cell[which]["mean"] is not None else nan for cell in cells]
                stds = [cell[which]["std"] if cell[which]["std"] is not None else 0.0 for cell in cells]
                ax.errorbar([i + offset for i in x], means, yerr=stds, fmt=marker, mfc=face, capsize=3,
                            color="C0" if which == "top1_last" else "C1",
                            label=f"ours, {'last' if which == 'top1_last' else 'best'} epoch (mean ± std)")
            pub = [(i, cell["published"]) for i, cell in zip(x, cells) if cell["published"] is not None]
            if pub:
                ax.scatter([i for i, _ in pub], [v for _, v in pub], marker="*", s=90, color="C3", zorder=3,
                           label="published")
            ax.set_xticks(x, [row["label"] for row in pair["rows"]], rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{pair['teacher']} → {pair['student']}: {DATASET_LABELS.get(dataset, dataset)}", fontsize=10)
            ax.set_ylabel("probe top-1 (%)")
            ax.grid(axis="y", alpha=0.3)
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
    if legend:
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", ncol=min(len(legend), 4), fontsize=8,
                   frameon=False)
    fig.suptitle(f"Sweep {results['sweep']}: transfer linear probe (bn={transfer['bn']})")
    return fig
