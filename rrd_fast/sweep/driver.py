"""A whole sweep: check the file, plan, teachers, teacher acceptance, students, transfer probes, report.

Waves keep the order (teachers, then students alone and each teacher cache's first run,
then the rest, then the transfer probes of the finished runs); jobs within a wave go to
the chosen executor together.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from rrd_fast.sweep.plan import Plan, build_plan, describe, parse_only, run_state, select, write_plan
from rrd_fast.sweep.runner import Executor, InProcess, Parallel, outcome_text
from rrd_fast.sweep.spec import SweepError, SweepSpec
from rrd_fast.sweep.status import write_status

EXECUTORS = ("local", "slurm", "submitit-local")


def make(executor: str, parallel: int) -> Executor:
    if executor not in EXECUTORS:
        raise SweepError(f"--executor: {executor!r} is not one of {', '.join(EXECUTORS)}")
    if parallel < 1:
        raise SweepError(f"--parallel: expected at least 1, got {parallel}")
    if executor != "local":
        if parallel != 1:
            raise SweepError("--parallel: only for --executor local; submitit jobs run side by side anyway")
        from rrd_fast.sweep.slurm import Submitit  # a missing submitit is a one-line error, before any run

        return Submitit(executor)
    return Parallel(parallel) if parallel > 1 else InProcess()


def _skipped(plan: Plan, name: str) -> dict[str, Any]:
    summary = json.loads((plan.run_dir(name) / "summary.json").read_text())
    return {"run": name, "status": "done", "action": "skip", "top1_last": summary.get("top1_last"),
            "top1_best": summary.get("top1_best")}


def probe_wave(plan: Plan, probes: list[str], runner: Executor,
               log: Callable[[str], None]) -> dict[str, dict[str, Any]]:
    """The transfer probes of finished runs: skip finished probes, report those whose run did not finish."""
    from rrd_fast.sweep.probes import probe_state, skipped_probe, stale_note

    results: dict[str, dict[str, Any]] = {}
    todo = []
    for name in probes:
        probe = plan.probes[name]
        if run_state(plan.run_dir(probe.run), plan.runs[probe.run].epochs).state != "done":
            results[name] = {"run": name, "role": "probe", "status": "failed",
                             "error": f"not started: its run {probe.run} did not finish"}
            write_status(plan.path, name, results[name])
            log(outcome_text(results[name]))
        elif probe_state(plan, probe).state == "done":
            results[name] = skipped_probe(plan, name)
            log(outcome_text(results[name]) + stale_note(probe, results[name]))
        else:
            todo.append(name)
    for name, result in zip(todo, runner.run(plan, todo, log) if todo else []):
        results[name] = result
    return results


def run_sweep(spec: SweepSpec, only: list[str] | None = None, executor: str = "local", parallel: int = 1,
              dry_run: bool = False, log: Callable[[str], None] = print) -> int:
    """Check everything, then teachers, acceptance, students, probes; write the report. 0: all done, 1: some failed."""
    from rrd_fast.sweep.acceptance import accept_teachers
    from rrd_fast.sweep.probes import check_transfer_data, describe_probes, plan_probes, select_probes
    from rrd_fast.sweep.report import write_report

    plan = build_plan(spec, check_data=not dry_run)
    plan_probes(spec, plan, plan.configs)  # type: ignore[attr-defined]
    if not dry_run:
        check_transfer_data(plan, spec.source)
    wanted = parse_only(list(only or []), plan)
    names = select(plan, wanted)
    probes = select_probes(plan, names, wanted)
    runner = make(executor, parallel)
    if dry_run:
        describe(plan, names, log)
        if plan.transfer:
            describe_probes(plan, probes, log)
        return 0
    write_plan(plan)
    log(f"sweep {plan.name}: {len(names)} runs" + (f" and {len(probes)} transfer probes" if probes else "")
        + f" in {plan.sweep_dir} ({executor}"
        + (f", {parallel} at once" if parallel > 1 else "") + ")")
    results: dict[str, dict[str, Any]] = {}

    def wave(number: int) -> None:
        todo = []
        for name in (n for n in names if plan.runs[n].wave == number):
            run = plan.runs[name]
            missing = [d for d in run.needs if run_state(plan.run_dir(d), plan.runs[d].epochs).state != "done"]
            if missing:
                results[name] = {"run": name, "status": "failed", "error": f"not started: its teacher run {missing[0]} did not finish"}
                write_status(plan.path, name, results[name])
                log(outcome_text(results[name]))
            elif run_state(plan.run_dir(name), run.epochs).state == "done":
                results[name] = _skipped(plan, name)
                log(outcome_text(results[name]))
            else:
                todo.append(name)
        for name, result in zip(todo, runner.run(plan, todo, log) if todo else []):
            results[name] = result

    wave(0)
    chosen = set(names)
    pairs = [p for p in plan.pairs if chosen & ({n for s in p.runs.values() for n in s.values()} | set(p.student_alone.values()))
             and (not p.teacher_run or run_state(plan.run_dir(p.teacher_run), plan.runs[p.teacher_run].epochs).state == "done")]
    accept_teachers(plan, pairs, log)  # a pair whose teacher run did not finish has its students reported as not started
    wave(1)
    wave(2)
    probe_results = probe_wave(plan, probes, runner, log)
    paths = write_report(plan.path)
    failed = [r for r in [*results.values(), *probe_results.values()] if r.get("status") != "done"]

    def summary(group: dict[str, dict[str, Any]], noun: str) -> str:
        counts: dict[str, int] = {}
        for r in group.values():
            key = r.get("action", "train") if r.get("status") == "done" else "failed"
            key = "probed" if noun == "probes" and key == "train" else key
            counts[key] = counts.get(key, 0) + 1
        return f"{len(group)} {noun} ({', '.join(f'{v} {k}' for k, v in sorted(counts.items())) or 'none'})"

    text = summary(results, "runs") + (", " + summary(probe_results, "probes") if probes else "")
    log(f"sweep {plan.name}: {text}; report: {paths['md']}")
    for r in failed:
        log(f"   failed: {r['run']}: {r.get('error')}")
    return 1 if failed else 0
