"""Does the teacher cache's storage type change distillation results, or only the chaotic path to them?

    python -m rrd_fast.bench cache-dtype [--teacher RUN] [--seeds 3] [--epochs 8] [--train-limit 6000] [--out JSON]

On real Fashion-MNIST (Debian's dataset-fashion-mnist, or --data DIR), with a resnet20 teacher trained
once (or --teacher RUN) and resnet8 KD students:

analysis    The teacher's outputs over every cached (sample, view): logit and pooled-feature range, the
            error of the fp16 and bf16 caches against the fp32 cache (and whether each equals the fp32
            values rounded by torch itself), KD's target softmax(t/4) (max |dp|, KL(p_fp32 || p_dtype)),
            and the relative change of one KD loss and of its gradient for a fresh and a trained student.
trajectory  KD runs per seed with the online teacher, an fp32, an fp16 and a bf16 cache, and a control:
            the fp32 cache with every value multiplied by (1 + u * 2**-11), u uniform in [-1, 1], a random
            perturbation of fp16's rounding size. Top-1 last/best mean ± std per mode, the largest
            difference of means against the pooled seed std, and per seed how each run's step losses
            part from the fp32 run's: the first step that differs, the relative difference over the
            steps, and its e-folding time while it grows. Chaos: every perturbation, rounding or random,
            starts at rounding size and grows exponentially at the same rate. A defect: a difference far
            above rounding size from the first steps on, or means that move beyond the seed spread
            while the random control does not.

The cached runs use V = epochs views, so every mode sees exactly the online run's augmentation.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from rrd_fast.bench.common import load_average, machine_info, write_json
from rrd_fast.cli import RunError

HELP = "fp32/fp16/bf16 teacher caches against the online teacher: logit error and KD trajectories over seeds"
MODES = ("online", "fp32", "fp16", "bf16", "fp32+noise")
CACHE_DTYPE = {"fp32": "fp32", "fp16": "fp16", "bf16": "bf16", "fp32+noise": "fp32"}
HALF_DTYPES = ("fp16", "bf16")
UNIT_ROUNDOFF = {"fp16": 2.0**-11, "bf16": 2.0**-8}  # round-to-nearest: |x_d - x| <= u |x| in the normal range
SMALLEST_NORMAL = {"fp16": 2.0**-14, "bf16": 2.0**-126}
FP16_MAX = 65504.0
NOISE = UNIT_ROUNDOFF["fp16"]
KD_T = 4.0
MACROSCOPIC = 1e-2  # a relative loss difference this large no longer comes from rounding
CHECKPOINTS = (1, 2, 3, 10, 30, 100, 300, 1000, 3000, 10000)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class Study:
    """What the bench trains and compares; the defaults are sized for one CPU thread (README: measured time)."""

    data: str
    work: str = "runs/bench-cache-dtype"
    data_format: str = "fashion_mnist"
    teacher: str = ""  # a trained teacher run folder; empty: train one under `work`
    teacher_arch: str = "resnet20"
    teacher_epochs: int = 5
    student_arch: str = "resnet8"
    seeds: int = 3
    epochs: int = 8
    train_limit: int = 6000
    eval_limit: int = 2000
    batch_size: int = 128
    lr: float = 0.1
    threads: int = 1
    modes: tuple[str, ...] = MODES
    analysis_batches: int = 0  # KD loss/gradient batches in the analysis; 0: every batch of view 0
    reuse: bool = False  # reuse a run's saved trace when its overrides are the same
    extra: list[str] = field(default_factory=list)  # more config overrides for every run (tests)


def milestones(epochs: int) -> list[int]:
    """lr decays at 1/2 and 3/4 of the schedule, as the CIFAR recipe's 150/180 of 240 roughly does."""
    return sorted({m for m in (epochs // 2, 3 * epochs // 4) if 0 < m < epochs})


def _common(study: Study) -> list[str]:
    return [f"data.format={study.data_format}", f"data.root={json.dumps(str(study.data))}",
            f"data.batch_size={study.batch_size}", "data.eval_batch_size=1000",
            f"data.train_limit={study.train_limit}", f"data.eval_limit={study.eval_limit}",
            f"optim.lr={study.lr}", "optim.lr_scaling=none", "train.mixed_precision=no", "train.progress=false",
            f"train.threads={study.threads}", f"output_dir={json.dumps(str(Path(study.work) / 'runs'))}", *study.extra]


def teacher_overrides(study: Study) -> list[str]:
    return [*_common(study), f"name=teacher-{study.teacher_arch}-n{study.train_limit}-e{study.teacher_epochs}",
            f"student.arch={study.teacher_arch}", "method.name=vanilla", f"optim.epochs={study.teacher_epochs}",
            f"optim.milestones={milestones(study.teacher_epochs)}", "seed=0"]


def kd_overrides(study: Study, teacher: Path, seed: int, mode: str) -> list[str]:
    out = [*_common(study), f"name=seed{seed}-{mode.replace('+', '-')}", f"seed={seed}",
           f"student.arch={study.student_arch}", "method.name=kd", f"optim.epochs={study.epochs}",
           f"optim.milestones={milestones(study.epochs)}", f"teacher.checkpoint={json.dumps(str(teacher))}",
           "teacher.eval_top1=false"]
    if mode != "online":
        cache = Path(study.work) / "cache" / f"seed{seed}-{CACHE_DTYPE[mode]}"
        out += [f"teacher.cache={json.dumps(str(cache))}", f"teacher.cache_dtype={CACHE_DTYPE[mode]}",
                f"teacher.cache_views={study.epochs}"]
    return out


def train_teacher(study: Study) -> Path:
    """The teacher run folder: --teacher's, a finished one from an earlier bench, or a fresh one."""
    from rrd_fast.config import load_config
    from rrd_fast.trainer import Trainer

    if study.teacher:
        path = Path(study.teacher)
        if not (path / "model.json").is_file():
            raise RunError(f"--teacher {path}: not a checkpoint folder (expected model.json and model.safetensors)")
        return path
    cfg = load_config(None, teacher_overrides(study))
    if (cfg.run_dir / "summary.json").is_file() and (cfg.run_dir / "model.json").is_file():
        return cfg.run_dir
    _log(f"training the teacher {study.teacher_arch} ({study.teacher_epochs} epochs) in {cfg.run_dir}")
    Trainer(cfg, overwrite=True).fit()
    return cfg.run_dir


class NoisyTeacher:
    """A teacher source whose logits and pooled features are each scaled by (1 + u * rel), u ~ U[-1, 1]:
    a random, unbiased perturbation of a rounding's size, the chaos control for the half caches."""

    def __init__(self, inner: Callable[..., Any], rel: float, seed: int) -> None:
        import torch

        self.inner = inner
        self.rel = rel
        self.generator = torch.Generator().manual_seed(seed)

    def _nudge(self, t: Any) -> Any:
        import torch

        u = torch.rand(t.shape, generator=self.generator, dtype=t.dtype, device="cpu").to(t.device) * 2 - 1
        return t * (1 + self.rel * u)

    def __call__(self, batch: Any, images: Any) -> Any:
        out = self.inner(batch, images)
        return replace(out, logits=self._nudge(out.logits), pooled=self._nudge(out.pooled))


class StepTrace:
    """Forward hook on the objective: every training step's weighted loss terms, as Python floats."""

    def __init__(self) -> None:
        self.terms: dict[str, list[float]] = {}

    def __call__(self, module: Any, args: Any, output: dict[str, Any]) -> None:
        for name, value in output.items():
            self.terms.setdefault(name, []).append(float(value.detach()))

    def total(self) -> list[float]:
        columns = list(self.terms.values())
        return [math.fsum(vals) for vals in zip(*columns)] if columns else []


def run_kd(study: Study, teacher: Path, seed: int, mode: str) -> dict[str, Any]:
    """One KD run in this process; its per-epoch top-1 and per-step losses (saved beside the run)."""
    from rrd_fast.config import load_config
    from rrd_fast.trainer import Trainer

    overrides = kd_overrides(study, teacher, seed, mode)
    cfg = load_config(None, overrides)
    saved = cfg.run_dir / "bench_trace.json"
    if study.reuse and saved.is_file():
        record = json.loads(saved.read_text())
        if record.get("overrides") == overrides:
            return record
    began = time.perf_counter()
    trainer = Trainer(cfg, overwrite=True)
    trace = StepTrace()
    hook = trainer.unwrapped.objective.register_forward_hook(trace)
    cached = trainer.teacher
    if mode == "fp32+noise":
        trainer.teacher = NoisyTeacher(cached, NOISE, seed=1000 + seed)
    try:
        summary = trainer.fit()
    finally:
        hook.remove()
        if hasattr(cached, "close"):
            cached.close()
    main = [r for r in trainer.state.history if r["stage"] == "main"]
    record = {"overrides": overrides, "mode": mode, "seed": seed, "top1_last": summary["top1_last"],
              "top1_best": summary["top1_best"], "top1_by_epoch": [r.get("top1") for r in main],
              "trace": {"total": trace.total(), **trace.terms}, "wall_s": time.perf_counter() - began}
    write_json(saved, record)
    return record


# ------------------------------------------------------------------ analysis of the cached outputs
def read_cache(path: Path) -> dict[str, Any]:
    """Every stored row of a complete cache, view-major, as fp32 tensors (through the trainer's reader)."""
    import torch

    from rrd_fast.cache import read_manifest
    from rrd_fast.cache.shards import CacheReader, as_tensor

    manifest = read_manifest(path)
    if manifest is None or not manifest["complete"]:
        raise RunError(f"{path}: no complete teacher cache")
    reader = CacheReader(path, manifest)
    try:
        index = np.arange(reader.num_samples)
        views = [reader.gather(v, index) for v in range(reader.views)]
        return {name: torch.cat([as_tensor(v[name], reader.dtype).float() for v in views])
                for name in ("logits", "pooled")} | {"views": reader.views, "num_samples": reader.num_samples}
    finally:
        reader.close()


def value_errors(approx: Any, exact: Any, dtype: str) -> dict[str, float]:
    """Absolute and relative error of stored values; relative only where `dtype` holds |x| as a normal number."""
    err = (approx - exact).abs()
    normal = exact.abs() >= SMALLEST_NORMAL[dtype]
    rel = err[normal] / exact.abs()[normal]
    max_rel = float(rel.max()) if rel.numel() else 0.0
    return {"max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()), "max_rel_err": max_rel,
            "mean_rel_err": float(rel.mean()) if rel.numel() else 0.0, "rel_bound": UNIT_ROUNDOFF[dtype],
            "within_bound": max_rel <= UNIT_ROUNDOFF[dtype],
            "subnormal_max_abs_err": float(err[~normal].max()) if (~normal).any() else 0.0}


def softmax_effect(logits32: Any, logits_d: Any, T: float = KD_T) -> dict[str, float]:
    """KD's target softmax(t/T) from rounded logits against exact ones: max |dp| and KL(p_fp32 || p_d)."""
    import torch

    log_p = torch.log_softmax(logits32.double() / T, dim=1)
    log_q = torch.log_softmax(logits_d.double() / T, dim=1)
    kl = (log_p.exp() * (log_p - log_q)).sum(1)
    return {"max_abs_dp": float((log_p.exp() - log_q.exp()).abs().max()), "kl_mean": float(kl.mean()),
            "kl_max": float(kl.max()), "max_rel_dp": float(((log_q - log_p).exp() - 1).abs().max())}


def kd_effect(student_logits: list[Any], t32: list[Any], t_d: list[Any], T: float = KD_T) -> dict[str, float]:
    """Relative change of the KD loss and of its gradient w.r.t. the student logits, per batch."""
    import torch

    from rrd_fast.methods.kd import kd_loss

    loss_rel, grad_rel = [], []
    for s, a, b in zip(student_logits, t32, t_d):
        values, grads = [], []
        for t in (a, b):
            s_ = s.detach().clone().requires_grad_(True)
            loss = kd_loss(s_, t, T)
            values.append(float(loss.detach()))
            grads.append(torch.autograd.grad(loss, s_)[0])
        loss_rel.append(abs(values[1] - values[0]) / abs(values[0]))
        grad_rel.append(float((grads[1] - grads[0]).norm() / grads[0].norm()))
    return {"loss_rel_mean": statistics.fmean(loss_rel), "loss_rel_max": max(loss_rel),
            "grad_rel_mean": statistics.fmean(grad_rel), "grad_rel_max": max(grad_rel), "batches": len(loss_rel)}


def _student_logits(study: Study, weights: Path | None, seed: int, index_batches: list[np.ndarray]) -> list[Any]:
    """A student's logits on view 0 of these batches: freshly initialised (seed), or a run's trained weights."""
    import torch

    from rrd_fast.checkpoint import load_teacher
    from rrd_fast.config import load_config
    from rrd_fast.data import build_data
    from rrd_fast.models import create_model

    cfg = load_config(None, _common(study))
    data = build_data(cfg.data, seed, 0, 1, torch.device("cpu"))
    if weights is None:
        torch.manual_seed(seed)
        model = create_model(study.student_arch, num_classes=data.num_classes, in_channels=data.fmt.channels)
    else:
        model, _ = load_teacher(str(weights), study.student_arch, data.num_classes, data.fmt.channels)
    model.eval()
    with torch.no_grad():
        return [model(data.train.batch_for(idx, 0).images) for idx in index_batches]


def analyse(study: Study, seed: int, trained: Path | None) -> dict[str, Any]:
    """The fp16 and bf16 caches of `seed` against its fp32 cache (all present: the runs built them)."""
    import torch

    dtypes = [d for d in ("fp32", *HALF_DTYPES) if (Path(study.work) / "cache" / f"seed{seed}-{d}").is_dir()]
    if "fp32" not in dtypes:
        raise RunError(f"{study.work}/cache/seed{seed}-fp32: no fp32 cache to compare with (run the fp32 mode)")
    caches = {d: read_cache(Path(study.work) / "cache" / f"seed{seed}-{d}") for d in dtypes}
    ref = caches["fp32"]
    logits, pooled = ref["logits"], ref["pooled"]
    n = ref["num_samples"]
    out: dict[str, Any] = {
        "seed": seed, "views": ref["views"], "num_samples": n, "values": int(logits.numel() + pooled.numel()),
        "logits": {"min": float(logits.min()), "max": float(logits.max()), "abs_max": float(logits.abs().max()),
                   "mean_abs": float(logits.abs().mean()),
                   "row_range_max": float((logits.max(1).values - logits.min(1).values).max())},
        "pooled": {"min": float(pooled.min()), "max": float(pooled.max()), "abs_max": float(pooled.abs().max()),
                   "zero_fraction": float((pooled == 0).double().mean())},
        "fp16_overflow_values": int((logits.abs() > FP16_MAX).sum() + (pooled.abs() > FP16_MAX).sum()),
        "dtypes": {},
    }
    size = study.batch_size
    starts = list(range(0, n - size + 1, size)) or [0]
    if study.analysis_batches:
        starts = starts[: study.analysis_batches]
    index_batches = [np.arange(s, min(s + size, n)) for s in starts]
    students = {"fresh": _student_logits(study, None, seed, index_batches)}
    if trained is not None:
        students["trained"] = _student_logits(study, trained, seed, index_batches)
    view0 = [logits[idx] for idx in index_batches]  # view 0 is rows [0, n)
    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}
    for d in dtypes[1:]:
        got = caches[d]
        entry = {"equals_own_rounding": bool(torch.equal(got["logits"], logits.to(torch_dtype[d]).float())
                                             and torch.equal(got["pooled"], pooled.to(torch_dtype[d]).float())),
                 "logits": value_errors(got["logits"], logits, d), "pooled": value_errors(got["pooled"], pooled, d),
                 "softmax_T4": softmax_effect(logits, got["logits"]),
                 "kd": {name: kd_effect(s, view0, [got["logits"][idx] for idx in index_batches])
                        for name, s in students.items()}}
        out["dtypes"][d] = entry
    return out


# ------------------------------------------------------------------ trajectories
def mean_std(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "values": values}


def _relative(run: list[float], ref: list[float]) -> np.ndarray:
    steps = min(len(run), len(ref))
    a, b = np.asarray(run[:steps], dtype=np.float64), np.asarray(ref[:steps], dtype=np.float64)
    return np.abs(a - b) / np.maximum(np.abs(b), 1e-30)


def _first_nonzero(rel: np.ndarray) -> int | None:
    hit = np.flatnonzero(rel > 0)
    return int(hit[0]) + 1 if hit.size else None


def efolding_steps(rel: np.ndarray) -> float | None:
    """Steps per e-fold of a growing relative difference: a least-squares line through ln(rel) from its
    first nonzero step to the step before it reaches MACROSCOPIC; None with fewer than 5 points or less than one
    e-fold of growth over them."""
    first = _first_nonzero(rel)
    if first is None:
        return None
    big = np.flatnonzero(rel >= MACROSCOPIC)
    stop = int(big[0]) if big.size else len(rel)
    steps = np.arange(first - 1, stop)
    steps = steps[rel[steps] > 0]
    if steps.size < 5:
        return None
    slope = float(np.polyfit(steps + 1.0, np.log(rel[steps]), 1)[0])
    grows = slope * (steps[-1] - steps[0]) >= 1.0  # at least one e-fold over the fitted steps
    return 1.0 / slope if grows else None


def _at_checkpoints(rel: np.ndarray) -> dict[str, float]:
    """Median relative difference over steps [k, 2k) for log-spaced k (1-based), and over the last tenth."""
    out = {str(k): float(np.median(rel[k - 1 : min(2 * k - 1, len(rel))])) for k in CHECKPOINTS if k <= len(rel)}
    if len(rel):
        out["last"] = float(np.median(rel[-max(1, len(rel) // 10) :]))
    return out


def divergence(run: list[float], ref: list[float], ce_run: list[float] | None = None,
               ce_ref: list[float] | None = None) -> dict[str, Any]:
    """How `run`'s step losses part from `ref`'s: the first differing step (1-based), the relative difference
    at log-spaced steps, the steps until it reaches MACROSCOPIC, and its e-folding time while it grows.

    With the CE terms given, the growth is measured on them: CE reads only the student, so it differs only
    once the students' weights do, while the total also carries the teacher targets' own (constant) difference.
    """
    rel = _relative(run, ref)
    big = np.flatnonzero(rel >= MACROSCOPIC)
    out: dict[str, Any] = {"steps": len(rel), "identical": bool(len(rel) and not rel.any()),
                           "first_diff_step": _first_nonzero(rel), "rel_at": _at_checkpoints(rel),
                           "steps_to_macroscopic": int(big[0]) + 1 if big.size else None}
    growth = rel
    if ce_run is not None and ce_ref is not None:
        growth = _relative(ce_run, ce_ref)
        out["first_diff_step_ce"] = _first_nonzero(growth)
        out["ce_rel_at"] = _at_checkpoints(growth)
    out["efold_steps"] = efolding_steps(growth)
    return out


def summarise(study: Study, runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per mode mean ± std; the largest difference of means against the pooled seed std; per-seed divergence."""
    from rrd_fast.sweep.report import pooled_std

    per_mode: dict[str, Any] = {}
    for mode, by_seed in runs.items():
        seeds = sorted(by_seed)
        def at_epoch(e: int) -> dict[str, Any]:
            return mean_std([by_seed[s]["top1_by_epoch"][min(e, len(by_seed[s]["top1_by_epoch"])) - 1] for s in seeds])

        per_mode[mode] = {"n": len(seeds), "top1_last": mean_std([by_seed[s]["top1_last"] for s in seeds]),
                          "top1_best": mean_std([by_seed[s]["top1_best"] for s in seeds]),
                          "top1_epoch1": at_epoch(1), "top1_epoch2": at_epoch(2)}
    between: dict[str, Any] = {}
    for which in ("top1_last", "top1_best"):
        modes = list(per_mode)
        pairs = [(a, b) for i, a in enumerate(modes) for b in modes[i + 1 :]]
        if not pairs:
            continue
        a, b = max(pairs, key=lambda p: abs(per_mode[p[0]][which]["mean"] - per_mode[p[1]][which]["mean"]))
        stds = [per_mode[m][which]["std"] for m in modes if per_mode[m][which]["std"] is not None]
        pooled_all = math.sqrt(statistics.fmean([s * s for s in stds])) if stds else None
        diff = per_mode[a][which]["mean"] - per_mode[b][which]["mean"]
        pooled = pooled_std(per_mode[a][which], per_mode[a]["n"], per_mode[b][which], per_mode[b]["n"])
        between[which] = {"largest": [a, b], "diff": diff, "pooled_std_pair": pooled, "pooled_std_all": pooled_all,
                          "exceeds": None if pooled is None else abs(diff) > pooled}
        if "fp32" in per_mode:
            between[which]["vs_fp32"] = {}
            for m in modes:
                if m == "fp32":
                    continue
                d = per_mode[m][which]["mean"] - per_mode["fp32"][which]["mean"]
                p = pooled_std(per_mode[m][which], per_mode[m]["n"], per_mode["fp32"][which], per_mode["fp32"]["n"])
                paired = [runs[m][s][which] - runs["fp32"][s][which] for s in sorted(runs[m]) if s in runs["fp32"]]
                between[which]["vs_fp32"][m] = {"diff": d, "pooled_std": p, "exceeds": None if p is None else abs(d) > p,
                                                "paired": mean_std(paired) if paired else None}
    diverge: dict[str, Any] = {}
    if "fp32" in runs:
        for mode in runs:
            if mode == "fp32":
                continue
            diverge[mode] = {}
            for seed, rec in sorted(runs[mode].items()):
                ref = runs["fp32"].get(seed)
                if ref is not None:
                    diverge[mode][str(seed)] = divergence(rec["trace"]["total"], ref["trace"]["total"],
                                                          rec["trace"].get("ce"), ref["trace"].get("ce"))
    return {"per_mode": per_mode, "between_modes": between, "divergence": diverge}


def run_study(study: Study, log: Callable[[str], None] = _log) -> dict[str, Any]:
    """Teacher, every (seed, mode) KD run, the analysis of seed 0's caches, and the summary."""
    import torch

    torch.set_num_threads(study.threads)
    unknown = [m for m in study.modes if m not in MODES]
    if unknown:
        raise RunError(f"--modes: {unknown} not among {', '.join(MODES)}")
    if "fp32" not in study.modes:
        raise RunError("--modes: must include fp32, the run every other mode is compared with")
    began = time.perf_counter()
    teacher = train_teacher(study)
    teacher_meta = json.loads((teacher / "model.json").read_text())
    runs: dict[str, dict[int, dict[str, Any]]] = {m: {} for m in study.modes}
    for seed in range(study.seeds):
        for mode in study.modes:
            rec = run_kd(study, teacher, seed, mode)
            runs[mode][seed] = rec
            log(f"seed {seed} {mode:10s} top-1 last {rec['top1_last']:.2f} best {rec['top1_best']:.2f} "
                f"({rec['wall_s']:.0f} s)")
    trained = None
    if "fp32" in runs and 0 in runs["fp32"]:
        trained = Path(study.work) / "runs" / "seed0-fp32"
    analysis = analyse(study, 0, trained)
    result = {"study": asdict(study) | {"modes": list(study.modes)}, "teacher": {"run": str(teacher),
              "top1": teacher_meta.get("top1_final"), "arch": teacher_meta.get("arch")},
              "analysis": analysis, "summary": summarise(study, runs),
              "runs": {m: {str(s): r for s, r in by_seed.items()} for m, by_seed in runs.items()},
              "wall_s": time.perf_counter() - began}
    return result


# ------------------------------------------------------------------ report
def _ms(entry: dict[str, Any]) -> str:
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}" if entry["std"] is not None else f"{entry['mean']:.2f}"


def report(result: dict[str, Any]) -> list[str]:
    """The tables and the evidence lines, as printed."""
    a, s = result["analysis"], result["summary"]
    study = result["study"]
    lines = [f"teacher {result['teacher']['arch']} (top-1 {result['teacher']['top1']}) from {result['teacher']['run']}; "
             f"students {study['student_arch']} KD T={KD_T:g}, {study['epochs']} epochs x {study['train_limit']} samples, "
             f"batch {study['batch_size']}, {study['seeds']} seeds, {study['threads']} thread(s)",
             "",
             f"Teacher outputs over {a['num_samples']} samples x {a['views']} views (seed {a['seed']}'s caches):",
             f"  logits min {a['logits']['min']:.3f} max {a['logits']['max']:.3f} |max| {a['logits']['abs_max']:.3f} "
             f"mean |x| {a['logits']['mean_abs']:.3f}; pooled min {a['pooled']['min']:.3f} max {a['pooled']['max']:.3f} "
             f"(zeros {100 * a['pooled']['zero_fraction']:.1f}%); values beyond fp16's 65504: {a['fp16_overflow_values']}",
             "",
             "| dtype | = own rounding | logits max abs err | mean abs err | max rel err (bound) | pooled max abs err | "
             "max rel err | softmax(t/4) max abs dp | KL(p32||p) mean | max | KD loss rel (fresh / trained) | "
             "KD grad rel (fresh / trained) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for d in (d for d in HALF_DTYPES if d in a["dtypes"]):
        e = a["dtypes"][d]
        kd = e["kd"]
        loss = " / ".join(f"{kd[k]['loss_rel_max']:.1e}" for k in kd)
        grad = " / ".join(f"{kd[k]['grad_rel_max']:.1e}" for k in kd)
        lines.append(f"| {d} | {'yes' if e['equals_own_rounding'] else 'NO'} | {e['logits']['max_abs_err']:.2e} | "
                     f"{e['logits']['mean_abs_err']:.2e} | {e['logits']['max_rel_err']:.2e} ({e['logits']['rel_bound']:.1e}) | "
                     f"{e['pooled']['max_abs_err']:.2e} | {e['pooled']['max_rel_err']:.2e} | "
                     f"{e['softmax_T4']['max_abs_dp']:.2e} | {e['softmax_T4']['kl_mean']:.2e} | {e['softmax_T4']['kl_max']:.2e} | "
                     f"{loss} | {grad} |")
    lines += ["  (KD loss and gradient w.r.t. the student logits: max over batches of view 0)", "",
              "| mode | top-1 last | top-1 best | top-1 at epoch 1 | at epoch 2 | last - fp32 (paired mean ± std) |",
              "|---|---|---|---|---|---|"]
    vs = s["between_modes"].get("top1_last", {}).get("vs_fp32", {})
    for mode, e in s["per_mode"].items():
        paired = vs.get(mode, {}).get("paired")
        lines.append(f"| {mode} | {_ms(e['top1_last'])} | {_ms(e['top1_best'])} | {_ms(e['top1_epoch1'])} | "
                     f"{_ms(e['top1_epoch2'])} | "
                     f"{_ms(paired) if paired else '-'} |")
    for which, e in s["between_modes"].items():
        verdict = "n/a (one seed)" if e["exceeds"] is None else ("BEYOND" if e["exceeds"] else "within")
        pooled = "n/a" if e["pooled_std_pair"] is None else f"{e['pooled_std_pair']:.2f}"
        lines.append(f"{which}: largest difference of means {e['largest'][0]} - {e['largest'][1]} = {e['diff']:+.2f}, "
                     f"pooled seed std of the pair {pooled}: {verdict} the seed spread")
    ks = (1, 10, 100, "last")
    lines += ["", "Step losses against the fp32-cache run of the same seed (relative |difference|, median over steps "
              "[k, 2k) or the last tenth; CE reads only the student, so it measures how far the students' weights "
              "have parted):",
              "| mode | seed | identical | first differing step (loss / CE) | loss rel diff at step "
              + " / ".join(map(str, ks)) + " | CE rel diff at step " + " / ".join(map(str, (2, *ks[1:])))
              + " | steps to 1e-2 | CE e-fold steps |", "|---|---|---|---|---|---|---|---|"]

    def at(values: dict[str, float], steps: tuple[Any, ...]) -> str:
        return " / ".join(f"{values[str(k)]:.1e}" if str(k) in values else "-" for k in steps)

    for mode, by_seed in s["divergence"].items():
        for seed, d in by_seed.items():
            ef = f"{d['efold_steps']:.1f}" if d.get("efold_steps") else "-"
            lines.append(f"| {mode} | {seed} | {'yes' if d['identical'] else 'no'} | {d['first_diff_step'] or '-'} / "
                         f"{d.get('first_diff_step_ce') or '-'} | {at(d['rel_at'], ks)} | "
                         f"{at(d.get('ce_rel_at', {}), (2, *ks[1:]))} | {d['steps_to_macroscopic'] or '-'} | {ef} |")
    lines.append(f"\nwall time {result['wall_s'] / 60:.1f} min")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, help="folder with the Fashion-MNIST IDX files (default: Debian's package)")
    parser.add_argument("--work", type=Path, default=Path("runs/bench-cache-dtype"), help="teacher, caches and runs")
    parser.add_argument("--teacher", type=Path, help="a trained teacher run folder (default: train one in --work)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=8, help="KD epochs (also the cache's views V)")
    parser.add_argument("--train-limit", type=int, default=6000, help="training samples (the first N)")
    parser.add_argument("--eval-limit", type=int, default=2000, help="test samples evaluated each epoch")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (train.threads) of every run")
    parser.add_argument("--reuse", action="store_true", help="reuse finished runs' saved traces (same overrides)")
    parser.add_argument("--out", type=Path, help="write everything, per-step traces included, as JSON")
    parser.add_argument("--from-json", type=Path, help="run nothing: summarise and print a saved --out file again")


def command(args: argparse.Namespace) -> int:
    if args.from_json:
        try:
            result = json.loads(args.from_json.read_text())
            study = Study(**{k: tuple(v) if k == "modes" else v for k, v in result["study"].items()})
            runs = {m: {int(s): r for s, r in result["runs"][m].items()} for m in study.modes if m in result["runs"]}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RunError(f"--from-json {args.from_json}: not a saved cache-dtype result ({exc})") from None
        result["summary"] = summarise(study, runs)
        print("\n".join(report(result)))
        if args.out:
            write_json(args.out, result)
        return 0
    for name in ("seeds", "epochs", "train_limit", "teacher_epochs", "threads"):
        if getattr(args, name) < 1:
            raise RunError(f"--{name.replace('_', '-')}: expected a positive integer, got {getattr(args, name)}")
    if args.eval_limit < 0:
        raise RunError(f"--eval-limit: expected 0 (all) or a positive integer, got {args.eval_limit}")
    from rrd_fast.demo import find_data

    data = find_data(args.data, Path("data/fashion-mnist"))
    study = Study(data=str(data), work=str(args.work), teacher=str(args.teacher or ""), teacher_epochs=args.teacher_epochs,
                  seeds=args.seeds, epochs=args.epochs, train_limit=args.train_limit, eval_limit=args.eval_limit,
                  threads=args.threads, modes=tuple(m for m in args.modes.split(",") if m), reuse=args.reuse)
    result = run_study(study)
    result["machine"] = machine_info() | {"load_average_end": load_average()}
    print("\n".join(report(result)))
    if args.out:
        write_json(args.out, result)
    return 0
