"""submitit glue (the optional `slurm` extra): one job per run or transfer probe, submitted as a job array.

`RunJob` is checkpointable: when Slurm preempts a job or its time runs out, submitit
requeues the same call, and `execute_job` resumes the run from its last epoch (a probe
starts over).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from typing import Any, Callable

from rrd_fast.sweep.plan import Plan
from rrd_fast.sweep.runner import Executor, execute_job, outcome_text, visible_devices
from rrd_fast.sweep.spec import SweepError
from rrd_fast.sweep.status import one_line, read_status, status_path

try:
    import submitit
except ImportError:  # pragma: no cover - exercised only without the extra
    raise SweepError("--executor slurm/submitit-local needs submitit: pip install 'rrd-fast[slurm]'") from None

SUBMITIT_DIR = "submitit"


class RunJob(submitit.helpers.Checkpointable):
    """The job: `execute_job(sweep_dir, name)`, requeued as is on timeout or preemption."""

    def __call__(self, sweep_dir: str, name: str) -> dict[str, Any]:
        return execute_job(sweep_dir, name)


def make_executor(kind: str, plan: Plan) -> Any:
    """A submitit executor for the plan's jobs; logs and pickles go to SWEEP_DIR/submitit/."""
    folder = plan.path / SUBMITIT_DIR / "%j"
    slurm = plan.slurm
    if kind == "slurm":
        if shutil.which("sbatch") is None or shutil.which("srun") is None:
            raise SweepError("--executor slurm: no sbatch/srun on this machine; run the sweep on a Slurm login node "
                             "(or use --executor local / submitit-local)")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
        params: dict[str, Any] = {
            "name": f"sweep-{plan.name}", "timeout_min": int(slurm["timeout_min"]), "gpus_per_node": int(slurm["gpus_per_node"]),
            "cpus_per_task": int(slurm["cpus_per_task"]), "mem_gb": float(slurm["mem_gb"]),
            "slurm_array_parallelism": int(slurm["array_parallelism"]),
        }
        if slurm["partition"]:
            params["slurm_partition"] = slurm["partition"]
        if slurm["additional_parameters"]:
            params["slurm_additional_parameters"] = dict(slurm["additional_parameters"])
        if slurm["setup"]:
            params["slurm_setup"] = list(slurm["setup"])
        executor.update_parameters(**params)
        return executor
    if kind == "submitit-local":
        executor = submitit.LocalExecutor(folder=folder)
        executor.update_parameters(timeout_min=int(slurm["timeout_min"]), gpus_per_node=min(1, len(visible_devices())))
        return executor
    raise SweepError(f"--executor: {kind!r} is not a submitit executor")


@dataclass
class Submitit(Executor):
    """One submitit job per run, submitted together as a job array; `kind` is slurm or submitit-local."""

    kind: str

    def run(self, plan: Plan, names: list[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
        executor = make_executor(self.kind, plan)
        for name in names:
            status_path(plan.path, name).unlink(missing_ok=True)
        jobs = executor.map_array(RunJob(), [str(plan.path)] * len(names), names)
        log(f"submitted {len(jobs)} jobs ({self.kind}): " + ", ".join(str(j.job_id) for j in jobs[:8]) +
            (" ..." if len(jobs) > 8 else ""))
        results = []
        for name, job in zip(names, jobs):
            try:
                result = job.result()
            except Exception as exc:  # the job itself died: timeout, node failure, out of memory
                result = read_status(plan.path, name) or {"run": name, "status": "failed",
                                                          "error": f"job {job.job_id}: {one_line(exc)[-300:]}"}
            log(outcome_text(result))
            results.append(result)
        return results
