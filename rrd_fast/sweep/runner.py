"""Running planned runs: in this process one after another, or N worker processes at once
(`--parallel N`); rrd_fast.sweep.slurm adds one submitit job per run.

Every executor runs the same `execute_run`, which turns a planned run into a Trainer and
decides from the run folder what to do: skip a finished run, resume an interrupted one,
restart one killed before its first epoch ended, or start it. Its outcome is written to
`status/<run>.json`; a failed run is reported there and the others go on. Transfer probes
(rrd_fast.sweep.probes) are jobs too: `execute_job` runs either, by name, so every executor
runs both the same way.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from rrd_fast.sweep.plan import Plan, read_plan, run_state, seconds_text
from rrd_fast.sweep.status import finish_status, read_status, record_failure, status_path

LOG_DIR = "logs"


def execute_run(sweep_dir: str | Path, name: str) -> dict[str, Any]:
    """Train, resume or skip one planned run; never raises for a failed run (but does for Ctrl-C)."""
    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    run = plan.runs[name]
    start = time.perf_counter()
    result: dict[str, Any] = {"run": name, "role": run.role, "pid": os.getpid()}
    try:
        cfg = run.load()
        state = run_state(cfg.run_dir, cfg.optim.epochs)
        result["action"] = {"done": "skip", "interrupted": "resume", "partial": "restart", "new": "train"}[state.state]
        result["from_epoch"] = state.epochs_done
        if state.state != "done":
            from rrd_fast.trainer import Trainer

            trainer = Trainer(cfg, resume=state.state == "interrupted", overwrite=state.state == "partial")
            try:
                summary = trainer.fit()
            finally:
                trainer.close()
        else:
            summary = json.loads((cfg.run_dir / "summary.json").read_text())
        result.update(status="done", top1_last=summary.get("top1_last"), top1_best=summary.get("top1_best"))
    except Exception as exc:  # a failed run is reported, the sweep goes on
        record_failure(result, exc)
    return finish_status(sweep_dir, name, result, start)


def execute_job(sweep_dir: str | Path, name: str) -> dict[str, Any]:
    """A planned run or a planned transfer probe, by its name in sweep.json."""
    plan = read_plan(sweep_dir)
    if name in plan.probes:
        from rrd_fast.sweep.probes import execute_probe

        return execute_probe(sweep_dir, name)
    return execute_run(sweep_dir, name)


# ---------------------------------------------------------------------- executors
class Executor:
    """Runs a list of independent planned runs and returns their results, in order."""

    def run(self, plan: Plan, names: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
        raise NotImplementedError


class InProcess(Executor):
    """One run after another in this process (the default, and what tests and the demo use)."""

    def run(self, plan: Plan, names: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
        results = []
        for name in names:
            log(f"-> {name}")
            results.append(execute_job(plan.path, name))
            log(outcome_text(results[-1]))
        return results


def visible_devices() -> list[str]:
    """GPU ids a worker can be pinned to: CUDA_VISIBLE_DEVICES when set, else every CUDA device."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [d.strip() for d in env.split(",") if d.strip() not in ("", "-1")]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())]


CPUS_VAR = "RRD_FAST_SWEEP_CPUS"  # the worker pins itself to these cores before torch starts


def core_groups(workers: int, cores: list[int] | None = None) -> list[list[int]]:
    """This process's cores split into `workers` contiguous groups (one core each, shared, when fewer cores)."""
    if cores is None:
        cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if workers >= len(cores):
        return [[cores[i % len(cores)]] for i in range(workers)]
    size, extra = divmod(len(cores), workers)
    groups, start = [], 0
    for i in range(workers):
        end = start + size + (1 if i < extra else 0)
        groups.append(cores[start:end])
        start = end
    return groups


def worker_env(device: str | None, cores: list[int]) -> dict[str, str]:
    """One GPU per worker (round robin, so runs share a device when N > GPUs) and its own share of the cores:
    the trainer's automatic thread count (train.threads: 0) follows the cores a process may run on."""
    env = dict(os.environ)
    if device is not None:
        env["CUDA_VISIBLE_DEVICES"] = device
    env[CPUS_VAR] = ",".join(map(str, cores))
    return env


@dataclass
class Parallel(Executor):
    """N `python -m rrd_fast.sweep.worker SWEEP_DIR RUN` processes at once, logs in logs/<run>.log."""

    workers: int

    def run(self, plan: Plan, names: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
        devices = visible_devices()
        slots: queue.Queue[tuple[str | None, list[int]]] = queue.Queue()
        for i, cores in enumerate(core_groups(self.workers)):
            slots.put((devices[i % len(devices)] if devices else None, cores))
        (plan.path / LOG_DIR).mkdir(parents=True, exist_ok=True)

        def one(name: str) -> dict[str, Any]:
            device, cores = slot = slots.get()
            try:
                status_path(plan.path, name).unlink(missing_ok=True)
                log_file = plan.path / LOG_DIR / f"{name}.log"
                log(f"-> {name}" + (f" on GPU {device}" if device is not None else "") + f" (log: {log_file})")
                with open(log_file, "ab") as fh:
                    proc = subprocess.run([sys.executable, "-m", "rrd_fast.sweep.worker", str(plan.path), name],
                                          env=worker_env(device, cores), stdout=fh, stderr=subprocess.STDOUT,
                                          cwd=os.getcwd())
                result = read_status(plan.path, name)
                if result is None:
                    result = {"run": name, "status": "failed",
                              "error": f"worker exited with code {proc.returncode} before reporting; see {log_file}"}
                log(outcome_text(result))
                return result
            finally:
                slots.put(slot)

        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            return list(pool.map(one, names))


def outcome_text(result: dict[str, Any]) -> str:
    name = result.get("run", "?")
    if result.get("status") != "done":
        return f"   {name}: FAILED: {result.get('error', 'unknown error')}"
    if result.get("role") == "probe":
        action = {"skip": "finished already, skipped", "restart": "probed again (an earlier probe did not finish)",
                  "train": "probed"}[result.get("action", "train")]
    else:
        action = {"skip": "finished already, skipped", "resume": f"resumed after epoch {result.get('from_epoch')}",
                  "restart": "restarted (killed before its first epoch ended)",
                  "train": "trained"}[result.get("action", "train")]
    top1 = ""
    if isinstance(result.get("top1_last"), (int, float)):
        top1 = f", top-1 last {result['top1_last']:.2f}, best {result['top1_best']:.2f}"
    took = f" in {seconds_text(result['seconds'])}" if result.get("action") != "skip" and "seconds" in result else ""
    return f"   {name}: {action}{took}{top1}"
