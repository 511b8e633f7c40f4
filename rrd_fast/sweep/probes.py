"""The sweep's transfer probes: one `rrd_fast.transfer` linear probe per probed run and data set.

Each probe is its own job, in a wave after every training wave, rather than a step at the
end of its run's training job. A probe needs its run finished, which the waves already
guarantee; as a job of its own it has its own status file, log and Slurm time limit, so a
failed probe is reported without marking a finished run failed, a rerun probes a run
trained earlier without entering its training job again, and `--dry-run` lists probes
with their state. Every executor runs probes as it runs training (`runner.execute_job`):
in this process, in `--parallel` workers, or as submitit jobs of one job array.

A probe whose `result.json` exists is finished and skipped on rerun, even when the sweep
now asks for other probe settings (the rerun says so; delete the probe folder to probe
again); one without it (killed, or failed) starts over. The probe seed is the run's seed
unless `transfer.overrides` sets `seed=`. Teacher probes are selected by `--only` only
when it names no method or seed.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from rrd_fast.config import RunConfig
from rrd_fast.sweep.plan import Plan, PlannedProbe, RunState, _hours, estimate_line, read_plan
from rrd_fast.sweep.spec import SweepError, SweepSpec, transfer_methods
from rrd_fast.sweep.status import finish_status, record_failure
from rrd_fast.transfer import RESULT_NAME, TRANSFER_DIR, probe_folder_name, read_results

PROBE_WAVE = 3  # after teachers (0) and students (1, 2)
DATASET_LABELS = {"stl10": "STL-10", "tiny_imagenet": "Tiny-ImageNet"}


def probe_name(run: str, folder: str) -> str:
    return f"{run}.transfer.{folder}"


def plan_probes(spec: SweepSpec, plan: Plan, configs: dict[str, RunConfig]) -> None:
    """Fill `plan.probes` and `plan.transfer` from the sweep's transfer section (nothing without one)."""
    transfer = spec.transfer
    if transfer is None:
        return
    datasets = {d: str(Path(root).resolve()) for d, root in transfer.datasets.items()}
    methods = transfer_methods(spec)
    pairs = transfer.pairs or [p.name for p in plan.pairs]
    plan.transfer = {"datasets": datasets, "bn": transfer.bn, "pairs": pairs, "methods": methods,
                     "teacher": transfer.teacher, "overrides": list(transfer.overrides)}
    for pair in plan.pairs:
        if pair.name not in pairs:
            continue
        targets: list[tuple[str, str, str, int]] = []  # run, role, method, seed
        if transfer.teacher and pair.teacher_run:
            targets.append((pair.teacher_run, "teacher", "teacher", plan.runs[pair.teacher_run].seed))
        if "vanilla" in methods:
            targets += [(name, "student_alone", "vanilla", int(seed)) for seed, name in pair.student_alone.items()]
        for method in methods:
            for seed, name in pair.runs.get(method, {}).items():
                targets.append((name, "distill", method, int(seed)))
        for run, role, method, seed in targets:
            for dataset, root in datasets.items():
                values = {"dataset": dataset, "root": root, "bn": transfer.bn, "seed": seed}
                probe = PlannedProbe("", run, role, method, seed, dataset, "", values, list(transfer.overrides), 0)
                cfg = probe.load()
                probe.folder = probe_folder_name(dataset, cfg.bn, cfg.feature_views)
                probe.name = probe_name(run, probe.folder)
                probe.epochs = cfg.epochs
                probe.kind = json.dumps([configs[run].student.arch, dataset, cfg.bn, cfg.feature_views,
                                         cfg.train_limit, cfg.batch_size])
                existing = plan.probes.get(probe.name)
                if existing is not None:  # a student alone or a teacher shared by several pairs
                    if pair.name not in existing.pairs:
                        existing.pairs.append(pair.name)
                    continue
                probe.pairs = [pair.name]
                plan.probes[probe.name] = probe


def missing_transfer_data(plan: Plan) -> list[tuple[str, str]]:
    """(data set, folder) for each transfer data set folder that does not exist."""
    if not plan.transfer:
        return []
    return [(d, root) for d, root in plan.transfer["datasets"].items() if not Path(root).is_dir()]


def check_transfer_data(plan: Plan, source: str) -> None:
    for dataset, root in missing_transfer_data(plan):
        raise SweepError(f"{source}: transfer.datasets.{dataset}: dataset folder {root} does not exist "
                         "(give the data set's folder, or remove it from the transfer section)")


def select_probes(plan: Plan, names: list[str], wanted: dict[str, set[str]]) -> list[str]:
    """Probes of the selected runs; a teacher's only when the selection names no method or seed."""
    chosen = set(names)
    teachers = not ({"method", "seed"} & set(wanted))
    return [n for n, p in plan.probes.items() if p.run in chosen and (p.role != "teacher" or teachers)]


# ---------------------------------------------------------------------- state
def probe_dir(plan: Plan, probe: PlannedProbe) -> Path:
    return plan.run_dir(probe.run) / TRANSFER_DIR / probe.folder


def probe_result(plan: Plan, probe: PlannedProbe) -> dict[str, Any] | None:
    """The probe's result.json (through rrd_fast.transfer.read_results), or None."""
    return read_results(plan.run_dir(probe.run)).get(probe.folder)


def _records(folder: Path) -> list[dict[str, Any]]:
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def probe_state(plan: Plan, probe: PlannedProbe) -> RunState:
    """done: result.json; partial: epochs written but no result (it starts over); new: nothing yet."""
    folder = probe_dir(plan, probe)
    records = _records(folder)
    times = [r["epoch_time_s"] for r in records if r.get("epoch_time_s")]
    rates = [r["images_per_s"] for r in records if r.get("images_per_s")]
    state = RunState("new", len(records), sum(times) / len(times) if times else None,
                     sum(rates) / len(rates) if rates else None)
    result = probe_result(plan, probe)
    if result is not None:
        state.state, state.epochs_done = "done", int(result.get("epochs", len(records)))
    elif records or (folder / RESULT_NAME).exists():
        state.state = "partial"
    return state


def stale_note(probe: PlannedProbe, result: dict[str, Any]) -> str:
    """A note when a finished probe ran with other epochs than the sweep now asks for, else ''."""
    if int(result.get("epochs", probe.epochs)) == probe.epochs:
        return ""
    return (f" (it ran {result.get('epochs')} epochs, the sweep now asks for {probe.epochs}; delete "
            f"{probe.run}/{TRANSFER_DIR}/{probe.folder} to probe again)")


# ---------------------------------------------------------------------- execution
def execute_probe(sweep_dir: str | Path, name: str) -> dict[str, Any]:
    """Probe, or skip, one planned probe; never raises for a failed probe (but does for Ctrl-C)."""

    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    probe = plan.probes[name]
    start = time.perf_counter()
    result: dict[str, Any] = {"run": name, "role": "probe", "probe_of": probe.run, "dataset": probe.dataset,
                              "pid": os.getpid()}
    try:
        cfg = probe.load()
        state = probe_state(plan, probe)
        result["action"] = {"done": "skip", "partial": "restart", "new": "train"}[state.state]
        if state.state == "done":
            out = probe_result(plan, probe) or {}
        else:
            from rrd_fast.transfer.probe import LinearProbe

            out = LinearProbe(plan.run_dir(probe.run), cfg, overwrite=state.state == "partial").fit()
        result.update(status="done", top1_last=out.get("top1_last"), top1_best=out.get("top1_best"),
                      epochs=out.get("epochs"), bn=out.get("bn"))
    except Exception as exc:  # a failed probe is reported, the sweep goes on
        record_failure(result, exc)
    return finish_status(sweep_dir, name, result, start)


def skipped_probe(plan: Plan, name: str) -> dict[str, Any]:
    result = probe_result(plan, plan.probes[name]) or {}
    return {"run": name, "role": "probe", "status": "done", "action": "skip", "top1_last": result.get("top1_last"),
            "top1_best": result.get("top1_best"), "epochs": result.get("epochs"), "bn": result.get("bn")}


# ---------------------------------------------------------------------- dry run
def describe_probes(plan: Plan, names: list[str], out: Callable[[str], None] = print) -> dict[str, Any]:
    """Print each selected probe's state, and the time left from the epoch times of probes of its kind."""
    if not plan.transfer:
        return {"states": {}, "todo": 0}
    states = {n: probe_state(plan, p) for n, p in plan.probes.items()}
    rate: dict[str, float] = {}
    for name, st in states.items():
        if st.seconds_per_epoch is not None:
            rate.setdefault(plan.probes[name].kind, st.seconds_per_epoch)
    datasets = ", ".join(DATASET_LABELS.get(d, d) for d in plan.transfer["datasets"])
    out(f"transfer probes ({datasets}; bn={plan.transfer['bn']}), after every run of the sweep:")
    width = max([len(n) for n in names] + [3])
    out(f"  {'state':<12} {'wave':<4} {'probe':<{width}} {'epochs':>9} {'img/s':>8} {'GPU-h left':>10}")
    known_s, unknown = 0.0, 0
    counts: dict[str, int] = {}
    for name in names:
        probe, st = plan.probes[name], states[name]
        counts[st.state] = counts.get(st.state, 0) + 1
        per_epoch = rate.get(probe.kind)
        if st.state == "done":
            est = "-"
        elif per_epoch is None:
            est, unknown = "unknown", unknown + 1
        else:
            known_s += probe.epochs * per_epoch  # an unfinished probe starts over
            est = _hours(probe.epochs * per_epoch)
        ips = f"{st.images_per_s:.0f}" if st.images_per_s else "-"
        done = min(st.epochs_done, probe.epochs) if st.state != "done" else st.epochs_done
        out(f"  {st.state:<12} {PROBE_WAVE:<4} {name:<{width}} {f'{done}/{probe.epochs}':>9} {ips:>8} {est:>10}")
    todo = len(names) - counts.get("done", 0)
    out(estimate_line("probe", len(names), counts, known_s, unknown,
                      "no finished probe epoch of the same model, data set and settings in this sweep yet"))
    for dataset, root in missing_transfer_data(plan):
        out(f"warning: transfer.datasets.{dataset}: dataset folder {root} does not exist; the sweep would stop there")
    return {"states": {n: states[n].state for n in names}, "todo": todo}
