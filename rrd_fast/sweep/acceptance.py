"""Teacher acceptance: a teacher's top-1 on the students' eval split, measured once, against a threshold.

A student distilled from a weak teacher (a truncated run, the wrong checkpoint) wastes a
whole column of the table, so the sweep measures every teacher before any student starts
and stops, naming the checkpoint and both numbers, when one is below `teacher_min_top1`.
Measurements are kept in `teacher_top1.json` in the sweep folder, keyed by the weights'
sha256 and the eval data, so a rerun does not evaluate again.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import torch

from rrd_fast.atomic import write_json_atomic
from rrd_fast.config import DataConfig
from rrd_fast.sweep.plan import PairPlan, Plan
from rrd_fast.sweep.spec import SweepError

MEASURED_NAME = "teacher_top1.json"


def checkpoint_sha256(checkpoint: Path) -> str:
    from rrd_fast.checkpoint import read_sidecar, sha256_file

    return str(read_sidecar(checkpoint)["sha256"]) if checkpoint.is_dir() else sha256_file(checkpoint)


def measurement_key(sha256: str, data: DataConfig) -> str:
    return json.dumps([sha256, data.format, str(Path(data.root).resolve()), data.eval_limit])


@torch.no_grad()
def evaluate_teacher(checkpoint: Path, arch: str, data_cfg: DataConfig, seed: int) -> float:
    """Top-1 (%) of the checkpoint on the eval split that `data_cfg` builds, in fp32."""
    from rrd_fast.data import build_data
    from rrd_fast.checkpoint import load_teacher

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = build_data(data_cfg, seed, 0, 1, device, "no")
    model, _ = load_teacher(checkpoint, arch, data.fmt.num_classes, data.fmt.channels)
    model.to(device)
    correct = total = 0
    for batch in data.eval.epoch(0):
        correct += int((model(batch.images).argmax(1) == batch.labels).sum())
        total += len(batch)
    return 100.0 * correct / max(total, 1)


def recorded_top1(plan: Plan, pair: PairPlan, sha256: str) -> float | None:
    """The teacher top-1 a finished student recorded in its model.json (`teacher.top1`), if any."""
    for seeds in pair.runs.values():
        for name in seeds.values():
            path = plan.run_dir(name) / "model.json"
            if path.is_file():
                teacher = json.loads(path.read_text()).get("teacher") or {}
                if teacher.get("sha256") == sha256 and isinstance(teacher.get("top1"), (int, float)):
                    return float(teacher["top1"])
    return None


def measured_teachers(sweep_dir: Path) -> dict[str, Any]:
    path = sweep_dir / MEASURED_NAME
    return json.loads(path.read_text()) if path.is_file() else {}


def student_data(plan: Plan, pair: PairPlan) -> tuple[DataConfig, int] | None:
    """The data config (and seed) of the pair's students, whose eval split the teacher is judged on."""
    names = [n for seeds in pair.runs.values() for n in seeds.values()] + list(pair.student_alone.values())
    if not names:
        return None
    cfg = plan.runs[names[0]].load()
    return cfg.data, cfg.seed


def pair_key(plan: Plan, pair: PairPlan) -> tuple[str, DataConfig, int, str] | None:
    """(measurement key, students' data config, seed, weights sha256), or None without teacher or students."""
    checkpoint = Path(pair.teacher_checkpoint)
    found = student_data(plan, pair)
    if found is None or not checkpoint.exists():
        return None
    sha = checkpoint_sha256(checkpoint)
    return measurement_key(sha, found[0]), found[0], found[1], sha


def teacher_top1(plan: Plan, pair: PairPlan, log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """{"top1", "checkpoint", "sha256", "how"} for the pair's teacher, measuring it if needed."""
    found = pair_key(plan, pair)
    if found is None:
        return None
    key, data_cfg, seed, sha = found
    checkpoint = Path(pair.teacher_checkpoint)
    store = measured_teachers(plan.path)
    if key in store:
        return {**store[key], "checkpoint": str(checkpoint)}
    recorded = recorded_top1(plan, pair, sha)
    if recorded is not None:
        entry = {"top1": recorded, "how": "recorded by a student run (model.json teacher.top1)"}
    else:
        log(f"measuring teacher {checkpoint} on the eval split of {data_cfg.format} ({data_cfg.root})")
        entry = {"top1": evaluate_teacher(checkpoint, pair.teacher, data_cfg, seed),
                 "how": "evaluated by the sweep on the students' eval split"}
    entry.update(checkpoint=str(checkpoint), sha256=sha, arch=pair.teacher)
    store[key] = entry
    write_json_atomic(plan.path / MEASURED_NAME, store)
    return entry


def accept_teachers(plan: Plan, pairs: list[PairPlan], log: Callable[[str], None] = print) -> dict[str, float]:
    """Measure each pair's teacher; raise SweepError at the first one below its threshold."""
    measured = {}
    for pair in pairs:
        entry = teacher_top1(plan, pair, log)
        if entry is None:
            continue
        measured[pair.name] = entry["top1"]
        threshold = pair.threshold
        if threshold is not None and entry["top1"] < threshold["value"]:
            raise SweepError(f"teacher {entry['checkpoint']} (pair {pair.name}): top-1 {entry['top1']:.2f} on the eval "
                             f"split is below teacher_min_top1 {threshold['value']:.2f} ({threshold['text']}); "
                             "the sweep stops before its student runs")
    return measured
