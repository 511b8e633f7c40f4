"""End-to-end training speed of rrd-fast against the RRD authors' own trainer, on the same data,
teacher weights and models: resnet32x4 -> resnet8x4, RRD+KD, batch 64 (issue 17's benchmark).

The reference is `cifar/train_student.py` of giakoumoglou/distillers, run and written against commit
a2ee80bd7179b808df63e4264318c40ca6e2966b. It is fetched, not vendored: nothing of it is copied into
this repository. Extract that commit somewhere (`--ref-dir`, default /tmp/ref/distillers) and give it
its own venv (`--ref-python`), because it needs torchvision, which does not import beside our torch:

    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.14.1 torchvision==0.29.1 tensorboard
    .venv/bin/python scripts/compare_reference.py run --work /tmp/rrd_ref_compare
    .venv/bin/python scripts/compare_reference.py table /tmp/rrd_ref_compare/results.jsonl

What it does:
- writes one CIFAR-100 data set in the real python-pickle layout (pipelines.synthetic) that both
  trainers read; the reference finds it through a `data` link in its working folder, as its
  datasets/cifar100.py expects (`./data/cifar-100-python`);
- saves a randomly initialised resnet32x4 from the reference venv in its `{'model': state_dict}`
  .pth format, under a folder named `resnet32x4_vanilla` (the reference parses the teacher's name
  from it), converts it with `python -m rrd_fast.import_teacher`, and checks that both trainers'
  teachers give the same logits and pooled features on one probe batch;
- runs the reference unmodified with the authors' RRD+KD command (`--distill rrd --model_s resnet8x4
  -a 1 -b 1`, its defaults otherwise: the 2025 temperatures 0.1/0.02, queue 16384, 8 loader
  workers) plus `--print_freq 1`, reads each iteration's `Time` from its log, and stops it once the
  window is complete (img/s = 64 x steps / the summed iteration times after `--ref-warmup`
  iterations). The only intervention is in its library, not its code: torchvision's CIFAR md5 check,
  which only real downloaded files pass, is switched off by the `_reference-launch` wrapper;
- runs ours end to end (`python rrd_fast/train.py`, real runs) with the same method and settings
  (`method.name=rrd_kd`, preset 2025, queue 16384), online and cached teacher, eager and
  `train.compile=on`, fp32 and `train.mixed_precision=bf16`; each run trains on the first
  64 x steps samples for 2 epochs, and the second epoch's `images_per_s` from metrics.jsonl is
  one window (the first is the warm-up, compilation included);
- builds each cached variant's teacher cache first (2 views of those samples) and times the build,
  which is projected to 32 views of the full training split and added, with the training time of
  240 epochs of the full split, to a projected full-run wall time (evaluation excluded, on both
  sides);
- interleaves the contenders (rounds; the order rotates each round), records the load average
  around every run, and prints medians of the windows.

Results go to WORK/results.jsonl, one JSON record per window or build, appended as they finish.
This script is not part of the test suite; it runs for tens of minutes on a 2-core machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parent.parent
REFERENCE_COMMIT = "a2ee80bd7179b808df63e4264318c40ca6e2966b"
BATCH = 64
TEACHER, STUDENT = "resnet32x4", "resnet8x4"
OUR_CONFIG = REPO / "configs" / "cifar100" / f"{TEACHER}_{STUDENT}.yaml"
RRD_OPTIONS = "method.options={rrd: {preset: '2025', queue_size: 16384}}"
REF_LINE = re.compile(r"Epoch: \[(\d+)\]\[(\d+)/(\d+)\]\s+Time ([\d.]+) \(([\d.]+)\)\s+Data ([\d.]+)")
BUILD_LINE = re.compile(r"built \d+ shards, (\d+) teacher passes in ([\d.]+) s")


@dataclass(frozen=True)
class Contender:
    """One trainer setting: the reference, or ours with a teacher source, a compile mode and a precision."""

    name: str
    cached: bool = False
    compiled: bool = False
    bf16: bool = False
    spin: bool = False  # ours with libgomp's own waiting (as the reference runs) instead of passive

    @property
    def reference(self) -> bool:
        return self.name.startswith("reference")

    @property
    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


# reference-tuned: the same unmodified reference, started with the two process settings our trainer
# gives itself before torch loads (rrd_fast/malloc_tuning.py): glibc malloc tunables and passive
# OpenMP waiting. It separates what our code gains from what those settings gain on a shared machine.
CONTENDERS = [Contender("reference"), Contender("reference-tuned")] + [
    Contender(f"{'cached' if c else 'online'}-{'compiled' if k else 'eager'}-{'bf16' if b else 'fp32'}", c, k, b)
    for k in (False, True) for c in (False, True) for b in (False, True)
]
# Only with --only: ours started with libgomp's default waiting (spin, then sleep), the counterpart
# of reference-tuned. GOMP_SPINCOUNT set means "the user chose", so our start-up leaves it alone.
EXTRA = [Contender(c.name + "-spin", c.cached, c.compiled, c.bf16, True) for c in CONTENDERS[2:]]


# --------------------------------------------------------------------------------------------
# The reference side: run inside the reference venv, so only the standard library at the top.
# --------------------------------------------------------------------------------------------

def reference_launch(ref_dir: Path, args: list[str]) -> None:
    """Run the reference's train_student.py as its own __main__, with torchvision's CIFAR md5 checks off.

    Real CIFAR files are the only ones whose md5 matches torchvision's table; the data here are
    written locally in the same layout, so the check (and the download it falls back to) is skipped.
    Nothing else changes: the reference's own code runs as published.
    """
    import runpy

    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda *a, **k: True
    cifar.CIFAR10._check_integrity = lambda self: True  # CIFAR100 inherits it
    script = ref_dir / "cifar" / "train_student.py"
    sys.path.insert(0, str(script.parent))
    sys.argv = [str(script), *args]
    runpy.run_path(str(script), run_name="__main__")


TEACHER_SNIPPET = """
import sys, numpy as np, torch
from models import model_dict
torch.manual_seed(int(sys.argv[2]))
model = model_dict['resnet32x4'](num_classes=100)
torch.save({'model': model.state_dict()}, sys.argv[1] + '/resnet32x4_vanilla/ckpt_epoch_240.pth')
model.eval()
x = torch.from_numpy(np.random.default_rng(1).standard_normal((4, 3, 32, 32)).astype(np.float32))
with torch.no_grad():
    feats, logits = model(x, is_feat=True)
np.savez(sys.argv[1] + '/probe.npz', x=x.numpy(), logits=logits.numpy(), pooled=feats[-1].numpy())
"""


# --------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------

def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _env(threads: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _check(cmd: list[str], cwd: Path, env: dict[str, str], log: Path) -> str:
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, text=True)
    text = log.read_text()
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd[:3])} ... failed (exit {proc.returncode}), see {log}:\n{text[-2000:]}")
    return text


def reference_tree_digest(ref_dir: Path) -> str:
    """sha256 over the reference's CIFAR code files, so a result names exactly what ran."""
    digest = hashlib.sha256()
    for path in sorted((ref_dir / "cifar").rglob("*.py")):
        digest.update(str(path.relative_to(ref_dir)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def setup(work: Path, ref_dir: Path, ref_python: str, n_train: int, n_test: int, seed: int) -> dict[str, Path]:
    """Data, both teachers (checked equal) and the reference's working folder; reused when present."""
    if not (ref_dir / "cifar" / "train_student.py").is_file():
        raise SystemExit(f"error: --ref-dir {ref_dir}: no cifar/train_student.py (extract giakoumoglou/distillers "
                         f"at {REFERENCE_COMMIT[:8]} there)")
    work.mkdir(parents=True, exist_ok=True)
    (work / "logs").mkdir(exist_ok=True)
    data = work / "data"
    stamp = data / "written.json"
    wanted = {"n_train": n_train, "n_test": n_test, "seed": seed}
    if not stamp.is_file() or json.loads(stamp.read_text()) != wanted:
        _log(f"writing CIFAR-100 ({n_train} train / {n_test} test images) to {data}")
        sys.path.insert(0, str(REPO))
        from pipelines.synthetic import write_cifar100

        shutil.rmtree(data, ignore_errors=True)
        write_cifar100(data, n_train, n_test, seed=seed)
        stamp.write_text(json.dumps(wanted))
    teachers = work / "teachers"
    pth = teachers / f"{TEACHER}_vanilla" / "ckpt_epoch_240.pth"
    ours = teachers / f"{TEACHER}_rrdfast"
    if not pth.is_file() or not (ours / "model.safetensors").is_file():
        pth.parent.mkdir(parents=True, exist_ok=True)
        _log("saving a random resnet32x4 teacher from the reference venv and importing it")
        _check([ref_python, "-c", TEACHER_SNIPPET, str(teachers), str(seed)], ref_dir / "cifar", _env(1),
               work / "logs" / "teacher_ref.log")
        shutil.rmtree(ours, ignore_errors=True)
        _check([sys.executable, "-m", "rrd_fast.import_teacher", str(pth), "--arch", TEACHER, "--out", str(ours)],
               REPO, _env(1), work / "logs" / "teacher_import.log")
    check_teachers_agree(ours, teachers / "probe.npz")
    ref_run = work / "ref_run"
    ref_run.mkdir(exist_ok=True)
    link = ref_run / "data"
    if not link.is_symlink():
        link.symlink_to(data)
    return {"data": data, "pth": pth, "ours": ours, "ref_run": ref_run}


def check_teachers_agree(ours: Path, probe: Path) -> None:
    """The imported teacher must compute what the reference's computes on the probe batch."""
    import numpy as np
    import torch

    sys.path.insert(0, str(REPO))
    from rrd_fast.checkpoint import load_teacher

    model, _ = load_teacher(ours, TEACHER, 100, 3)
    ref = np.load(probe)
    with torch.no_grad():
        out = model(torch.from_numpy(ref["x"]), features=True)
    for name, mine in (("logits", out.logits), ("pooled", out.pooled)):
        scale = float(np.abs(ref[name]).max())
        err = float(np.abs(mine.numpy() - ref[name]).max())
        if err > 1e-4 * max(scale, 1.0):
            raise SystemExit(f"error: {ours}: teacher {name} differ from the reference's by {err:g} (scale {scale:g})")
    _log(f"teachers agree on the probe batch ({ours.name} vs the reference's .pth)")


# --------------------------------------------------------------------------------------------
# Measuring
# --------------------------------------------------------------------------------------------

def _load() -> float:
    return os.getloadavg()[0]


def reference_env(threads: int, tuned: bool) -> dict[str, str]:
    """The reference's environment: as a user starts it, or with our trainer's process settings."""
    if not tuned:
        return _env(threads)
    sys.path.insert(0, str(REPO))
    from rrd_fast.malloc_tuning import TUNABLES, TUNABLES_VAR, WAIT_DEFAULT

    return _env(threads, **{TUNABLES_VAR: TUNABLES}, **WAIT_DEFAULT)


def run_reference(paths: dict[str, Path], ref_dir: Path, ref_python: str, threads: int, steps: int, warmup: int,
                  log: Path, timeout: float, tuned: bool = False) -> dict[str, Any]:
    """One reference window: its per-iteration times after `warmup` iterations, then stop it."""
    cmd = [ref_python, str(Path(__file__).resolve()), "_reference-launch", "--ref-dir", str(ref_dir), "--",
           "--path_t", str(paths["pth"]), "--distill", "rrd", "--model_s", STUDENT, "-a", "1", "-b", "1",
           "--trial", "1", "--print_freq", "1", "--batch_size", str(BATCH)]
    began, times, data_times, first_line_at = time.perf_counter(), [], [], None
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, cwd=paths["ref_run"], env=reference_env(threads, tuned), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                if time.perf_counter() - began > timeout:
                    raise TimeoutError(f"reference window not done in {timeout:.0f} s")
                m = REF_LINE.search(line)
                if not m:
                    continue
                first_line_at = first_line_at or time.perf_counter() - began
                idx = int(m.group(2))
                if warmup <= idx < warmup + steps:
                    times.append(float(m.group(4)))
                    data_times.append(float(m.group(6)))
                if idx + 1 >= warmup + steps:
                    break
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    if len(times) < steps:
        raise SystemExit(f"error: the reference stopped after {len(times)} of {steps} window iterations, see {log}")
    return {"img_s": BATCH * steps / sum(times), "window_s": sum(times), "data_s": sum(data_times),
            "startup_s": first_line_at, "wall_s": time.perf_counter() - began}


def our_overrides(paths: dict[str, Path], work: Path, c: Contender, threads: int, steps: int,
                  name: str, epochs: int) -> list[str]:
    """The run's key=value overrides on top of the shipped resnet32x4_resnet8x4 config."""
    out = [f"output_dir={work / 'runs'}", f"name={name}", f"data.root={paths['data']}", "data.pipeline=auto",
           f"data.batch_size={BATCH}", f"data.train_limit={BATCH * steps}", f"optim.epochs={epochs}",
           f"teacher.checkpoint={paths['ours']}", f"teacher.arch={TEACHER}", "teacher.eval_top1=false",
           "method.name=rrd_kd", RRD_OPTIONS, f"train.mixed_precision={'bf16' if c.bf16 else 'no'}",
           f"train.compile={'on' if c.compiled else 'off'}", f"train.threads={threads}"]
    if c.cached:
        out += [f"teacher.cache={cache_dir(work, c, threads, steps)}", "teacher.cache_views=2"]
    return out


def cache_dir(work: Path, c: Contender, threads: int, steps: int) -> Path:
    return work / "cache" / f"{c.precision}-{'compiled' if c.compiled else 'eager'}-t{threads}-s{steps}"


def _our_env(work: Path, threads: int, spin: bool = False) -> dict[str, str]:
    extra = {"GOMP_SPINCOUNT": "300000"} if spin else {}
    return _env(threads, TORCHINDUCTOR_CACHE_DIR=str(work / "inductor"), **extra)


def build_cache(paths: dict[str, Path], work: Path, c: Contender, threads: int, steps: int) -> list[dict[str, Any]]:
    """Build (and time) the cache a cached contender reads; nothing when it was built before.

    A compiled build's first batches compile the teacher, which a full-size build pays once, so a
    compiled build runs twice: the second, into a scratch folder with the kernels cached, gives the rate.
    """
    folder = cache_dir(work, c, threads, steps)
    manifest = folder / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
        return []
    records = []
    for warm in ((False, True) if c.compiled else (False,)):
        target = folder.with_name(folder.name + "-warm") if warm else folder
        shutil.rmtree(target, ignore_errors=True)
        overrides = [o if not o.startswith("teacher.cache=") else f"teacher.cache={target}"
                     for o in our_overrides(paths, work, c, threads, steps, "cache_build", 2)]
        log = work / "logs" / f"build-{target.name}.log"
        load, began = _load(), time.perf_counter()
        text = _check([sys.executable, "-m", "rrd_fast.cache", "build", "--config", str(OUR_CONFIG), *overrides],
                      REPO, _our_env(work, threads), log)
        wall = time.perf_counter() - began
        m = BUILD_LINE.search(text)
        if not m:
            raise SystemExit(f"error: no build line in {log}")
        passes, seconds = int(m.group(1)), float(m.group(2))
        records.append({"kind": "cache_build", "precision": c.precision, "compiled": c.compiled, "threads": threads,
                        "warm_kernels": warm, "passes": passes, "build_s": seconds, "img_s": passes / seconds,
                        "wall_s": wall, "load_before": load, "load_after": _load()})
    return records


def run_ours(paths: dict[str, Path], work: Path, c: Contender, threads: int, steps: int, name: str,
             timeout: float) -> dict[str, Any]:
    """One of our runs: epoch 1 warms up (and compiles), epoch 2 is the window."""
    overrides = our_overrides(paths, work, c, threads, steps, name, 2)
    log = work / "logs" / f"{name}.log"
    began = time.perf_counter()
    cmd = [sys.executable, str(REPO / "rrd_fast" / "train.py"), "--config", str(OUR_CONFIG), "--overwrite", *overrides]
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, env=_our_env(work, threads, c.spin), stdout=fh, stderr=subprocess.STDOUT,
                              text=True, timeout=timeout)
    if proc.returncode != 0:
        raise SystemExit(f"error: our run {name} failed (exit {proc.returncode}), see {log}")
    records = [json.loads(line) for line in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    first, window = records[0], records[1]
    compile_s = None
    m = re.search(r"the first compiled step took ([\d.]+) s", log.read_text())
    if m:
        compile_s = float(m.group(1))
    return {"img_s": window["images_per_s"], "window_s": window["epoch_time_s"],
            "warmup_epoch_s": first["epoch_time_s"], "first_step_s": compile_s,
            "wall_s": time.perf_counter() - began}


def rotated(items: list[Contender], k: int) -> list[Contender]:
    k %= len(items)
    return items[k:] + items[:k]


def measure(args: argparse.Namespace) -> Path:
    work, ref_dir = Path(args.work).resolve(), Path(args.ref_dir).resolve()
    chosen = CONTENDERS if args.only is None else [c for c in CONTENDERS + EXTRA if c.name in args.only]
    unknown = set(args.only or ()) - {c.name for c in chosen}
    if unknown or not chosen:
        raise SystemExit(f"error: --only: {sorted(unknown) or args.only} not among {[c.name for c in CONTENDERS + EXTRA]}")
    paths = setup(work, ref_dir, args.ref_python, args.n_train, args.n_test, args.seed)
    results = work / "results.jsonl"
    meta = {"kind": "meta", "reference_commit": REFERENCE_COMMIT, "reference_tree_sha256": reference_tree_digest(ref_dir),
            "steps": args.steps, "ref_warmup": args.ref_warmup, "n_train": args.n_train, "n_test": args.n_test,
            "threads": args.threads, "rounds": args.rounds, "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "cpu": _cpu_name(), "bf16_native": _bf16_native()}
    _append(results, meta)
    for threads in args.threads:
        for c in chosen:
            if c.cached:
                _log(f"building the teacher cache for {c.name}, {threads} thread(s)")
                for rec in build_cache(paths, work, c, threads, args.steps):
                    _append(results, rec)
                    _log(f"  {rec['passes']} teacher passes in {rec['build_s']:.1f} s ({rec['img_s']:.1f} img/s), "
                         f"kernels {'cached' if rec['warm_kernels'] else 'compiled' if rec['compiled'] else 'eager'}, "
                         f"load {rec['load_before']:.1f}")
    for rnd in range(args.rounds):
        for threads in args.threads:
            for c in rotated(chosen, rnd):
                load = _load()
                name = f"{c.name}-t{threads}-r{rnd}"
                _log(f"round {rnd + 1}/{args.rounds}: {name} (load {load:.1f})")
                if c.reference:
                    rec = run_reference(paths, ref_dir, args.ref_python, threads, args.steps, args.ref_warmup,
                                        work / "logs" / f"{name}.log", args.timeout, c.name == "reference-tuned")
                else:
                    rec = run_ours(paths, work, c, threads, args.steps, name, args.timeout)
                rec.update(kind="window", contender=c.name, threads=threads, round=rnd, steps=args.steps,
                           load_before=load, load_after=_load())
                _append(results, rec)
                _log(f"  {rec['img_s']:.1f} img/s over {args.steps} iterations ({rec['window_s']:.1f} s)")
    return results


def _append(path: Path, record: dict[str, Any]) -> None:
    with path.open("a") as fh:
        fh.write(json.dumps(record) + "\n")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def _bf16_native() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------

def _latest_meta(records: list[dict[str, Any]]) -> dict[str, Any]:
    metas = [r for r in records if r["kind"] == "meta"]
    return metas[-1] if metas else {}


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def table(records: list[dict[str, Any]], epochs: int, views: int, n_train: int | None = None) -> str:
    """Markdown: median img/s per contender and thread count, ratios to the reference, projected wall times."""
    meta = _latest_meta(records)
    n_train = n_train or int(meta.get("n_train", 50000))
    per_epoch = (n_train // BATCH) * BATCH
    windows: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in records:
        if r["kind"] == "window":
            windows.setdefault((r["threads"], r["contender"]), []).append(r)
    builds: dict[tuple[int, str, bool], dict[str, Any]] = {}
    for r in records:  # a compiled build's rate is its warm-kernel rerun's
        if r["kind"] == "cache_build":
            key = (r["threads"], r["precision"], r["compiled"])
            if r.get("warm_kernels") or not r["compiled"] or key not in builds:
                builds[key] = r
    steps = sorted({r.get("steps", meta.get("steps")) for rows in windows.values() for r in rows}, key=str)
    lines = [f"reference: giakoumoglou/distillers {meta.get('reference_commit', REFERENCE_COMMIT)[:8]}; "
             f"{meta.get('cpu', '?')}, native bf16: {meta.get('bf16_native', '?')}; windows of {steps} iterations "
             f"of batch {BATCH}; projection: {epochs} epochs x {per_epoch} images, plus for cached runs a cache build "
             f"of {views} views x {n_train} images (evaluation and compilation excluded on both sides)", "",
             "| threads | contender | img/s median (windows) | x ref | x ref-tuned | cache build img/s | build h "
             "| projected wall h | x ref (wall) | load 1-min median |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    order = {c.name: i for i, c in enumerate(CONTENDERS + EXTRA)}
    compiles = []
    for threads in sorted({t for t, _ in windows}, reverse=True):
        rates = {n: _median(r["img_s"] for r in rows) for (t, n), rows in windows.items() if t == threads}
        ref, tuned = rates.get("reference"), rates.get("reference-tuned")
        ref_wall = epochs * per_epoch / ref / 3600 if ref else None
        for name in sorted(rates, key=lambda n: order.get(n, 99)):
            rows, rate = windows[(threads, name)], rates[name]
            c = next(x for x in CONTENDERS + EXTRA if x.name == name)
            wall, build_rate, build_h = epochs * per_epoch / rate / 3600, "", ""
            b = builds.get((threads, c.precision, c.compiled)) if c.cached else None
            if b:
                hours = views * n_train / b["img_s"] / 3600
                build_rate, build_h, wall = f"{b['img_s']:.1f}", f"{hours:.2f}", wall + hours
            loads = _median((r["load_before"] + r["load_after"]) / 2 for r in rows)
            spread = ", ".join(f"{r['img_s']:.1f}" for r in sorted(rows, key=lambda r: r["round"]))
            cells = [str(threads), name, f"{rate:.1f} ({spread})", f"{rate / ref:.2f}" if ref else "",
                     f"{rate / tuned:.2f}" if tuned else "", build_rate, build_h, f"{wall:.1f}",
                     f"{ref_wall / wall:.2f}" if ref_wall else "", f"{loads:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
            firsts = [r["first_step_s"] for r in sorted(rows, key=lambda r: r["round"]) if r.get("first_step_s")]
            if firsts:
                compiles.append(f"| {threads} | {name} | {firsts[0]:.0f} | "
                                f"{_median(firsts[1:]):.0f} |" if len(firsts) > 1 else f"| {threads} | {name} | {firsts[0]:.0f} | |")
    if compiles:
        lines += ["", "first compiled step (s): the first run of a contender, then the median of its later runs "
                  "(kernels cached in WORK/inductor)", "", "| threads | contender | first run | later runs |",
                  "|---|---|---|---|", *compiles]
    return "\n".join(lines)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: Iterable[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_reference-launch"]:  # inside the reference venv
        sep = argv.index("--")
        parser = argparse.ArgumentParser(prog="compare_reference.py _reference-launch")
        parser.add_argument("--ref-dir", type=Path, required=True)
        opts = parser.parse_args(argv[1:sep])
        reference_launch(opts.ref_dir, argv[sep + 1:])
        return 0
    parser = argparse.ArgumentParser(prog="scripts/compare_reference.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="set up, measure every contender, print the table")
    run.add_argument("--work", default="/tmp/rrd_ref_compare", help="folder for data, teachers, runs, logs, results")
    run.add_argument("--ref-dir", default="/tmp/ref/distillers", help="giakoumoglou/distillers extracted at the commit")
    run.add_argument("--ref-python", default="/tmp/refvenv/bin/python", help="python of the reference's venv")
    run.add_argument("--threads", default="2,1", type=lambda s: [int(x) for x in s.split(",")],
                     help="comma-separated thread counts, each for both trainers (OMP_NUM_THREADS, train.threads)")
    run.add_argument("--rounds", type=int, default=3, help="windows per contender, one per round")
    run.add_argument("--steps", type=int, default=12, help="training iterations (batch 64) per window")
    run.add_argument("--ref-warmup", type=int, default=2, help="reference iterations before its window")
    run.add_argument("--n-train", type=int, default=50000)
    run.add_argument("--n-test", type=int, default=100, help="small: the reference evaluates its teacher first")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--only", type=lambda s: s.split(","), default=None,
                     help=f"comma-separated contenders (default: all but the -spin ones) of: "
                          f"{', '.join(c.name for c in CONTENDERS + EXTRA)}")
    run.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take")
    for p in (run, sub.add_parser("table", help="print the table of a results.jsonl")):
        p.add_argument("--epochs", type=int, default=240, help="epochs of the projected full run")
        p.add_argument("--views", type=int, default=32, help="cache views of the projected full run")
    sub.choices["table"].add_argument("results", type=Path)
    args = parser.parse_args(argv)
    if args.cmd == "run":
        results = measure(args)
    else:
        results = args.results
    print(table(_read(results), args.epochs, args.views))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
