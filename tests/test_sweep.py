"""Sweeps end to end on tiny CIFAR-100 data: local, parallel and submitit runs, resume after a kill,
failures, teacher acceptance, the report against the run folders, transfer probes and their table,
bad input, and the demo's quick mode."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from pipelines.formats.fashion_mnist import DEBIAN_FASHION_MNIST
from pipelines.synthetic import class_images, write_py2_pickle, write_stl10, write_tiny_imagenet
from rrd_fast.checkpoint import read_model_checkpoint, write_model_checkpoint
from rrd_fast.cli import run_cli
from rrd_fast.methods import list_methods
from rrd_fast.models import create_model
from rrd_fast.sweep.__main__ import main as sweep_main
from rrd_fast.sweep.report import build_figure, render
from rrd_fast.sweep.driver import run_sweep
from rrd_fast.sweep.runner import core_groups
from rrd_fast.sweep.spec import SweepError, parse_sweep
from rrd_fast.sweep.transfer_report import build_transfer_figure

REPO = Path(__file__).resolve().parent.parent
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
CLASSES = 4  # of CIFAR-100's 100 labels, so that one epoch of 64 images learns something


def write_tiny_cifar100(root: Path, n_train: int = 64, n_test: int = 64) -> Path:
    """cifar-100-python/{train,test,meta} as Python-2 pickles, with labels drawn from the first 4 classes."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.permutation(np.arange(n) % CLASSES)
        images = class_images(labels, 32, 3, 100, rng)
        write_py2_pickle(folder / split, {
            b"filenames": [f"{split}_{i}.png".encode() for i in range(n)], b"batch_label": b"tiny",
            b"fine_labels": [int(v) for v in labels], b"coarse_labels": [int(v) // 5 for v in labels],
            b"data": np.ascontiguousarray(images.transpose(0, 3, 1, 2)).reshape(n, 3072),
        })
    write_py2_pickle(folder / "meta", {b"fine_label_names": [f"c{i}".encode() for i in range(100)],
                                       b"coarse_label_names": [f"s{i}".encode() for i in range(20)]})
    return root


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_cifar100(tmp_path_factory.mktemp("cifar"))


@pytest.fixture(scope="module")
def base(cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "data": {"format": "cifar100", "root": str(cifar), "batch_size": 16, "eval_batch_size": 64, "pipeline": "torch"},
        "optim": {"epochs": 1, "milestones": [], "lr": 0.1},
        "train": {"progress": False, "mixed_precision": "no", "threads": 1},
    }))
    return path


@pytest.fixture(scope="module")
def random_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An untrained resnet8 checkpoint folder for 100 classes, to import as a teacher."""
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("teacher")
    write_model_checkpoint(out, create_model("resnet8", num_classes=100, in_channels=3),
                           {"arch": "resnet8", "num_classes": 100, "in_channels": 3, "image_size": 32,
                            "normalization": {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}})
    return out


@pytest.fixture(scope="module")
def targets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny STL-10 (20 train, 10 test) and Tiny-ImageNet (3 classes, 4 train and 2 val each) in their real layouts."""
    base = tmp_path_factory.mktemp("targets")
    return {"stl10": write_stl10(base / "stl", 20, 10, seed=1),
            "tiny_imagenet": write_tiny_imagenet(base / "tiny", 3, 4, 2, seed=2)}


PROBE_OVERRIDES = ["epochs=2", "milestones=[1]", "batch_size=8", "eval_batch_size=16", "device=cpu", "progress=false",
                   "workers=1"]


def transfer_section(targets: dict[str, Path], **fields: Any) -> dict[str, Any]:
    return {"datasets": {k: str(v) for k, v in targets.items()}, "overrides": PROBE_OVERRIDES, **fields}


def tree(out: Path, base: Path, teacher: Path, **fields: Any) -> dict[str, Any]:
    """A 2 pairs x 2 methods x 2 seeds sweep on the tiny data: one pair trains its teacher and is keyed to a
    published column, the other imports `teacher`."""
    return {"name": "tiny", "output_dir": str(out), "config_dir": None,
            "pairs": [{"name": "r14_r8", "teacher": "resnet14", "student": "resnet8", "config": str(base),
                       "published": "resnet32x4_resnet8x4"},
                      {"name": "imp", "teacher": "resnet8", "student": "resnet8", "config": str(base),
                       "teacher_checkpoint": str(teacher)}],
            "methods": ["kd", "rrd"], "seeds": [0, 1], "teacher_min_top1": 0,
            "method_overrides": {"rrd": ["method.options={rrd: {queue_size: 64}}"]}, **fields}


def sweep_file(path: Path, content: dict[str, Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(content))
    return path


def records(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def row(results: dict[str, Any], pair: str, method: str) -> dict[str, Any]:
    entry = next(p for p in results["pairs"] if p["pair"] == pair)
    return next(r for r in entry["rows"] if r["method"] == method)


@pytest.fixture(scope="module")
def local(base: Path, random_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, list[str]]:
    root = tmp_path_factory.mktemp("local")
    path = sweep_file(root / "sweep.yaml", tree(root / "out", base, random_teacher))
    log: list[str] = []
    code = run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), log=log.append)
    return root / "out", code, log


RUNS = ["resnet14_vanilla_seed0", "resnet8_vanilla_seed0", "resnet8_vanilla_seed1"] + [
    f"{pair}_{m}_seed{s}" for pair in ("r14_r8", "imp") for m in ("kd", "rrd") for s in (0, 1)]


def test_local_sweep_trains_teachers_once_then_every_student(local: tuple[Path, int, list[str]], random_teacher: Path) -> None:
    out, code, log = local
    assert code == 0, log
    assert sorted(p.name for p in out.iterdir() if (p / "config.yaml").is_file()) == sorted(RUNS)
    for name in RUNS:
        assert (out / name / "summary.json").is_file(), name
    cfg = yaml.safe_load((out / "r14_r8_rrd_seed1" / "config.yaml").read_text())
    assert cfg["teacher"]["checkpoint"] == str(out / "resnet14_vanilla_seed0")
    assert (cfg["method"]["name"], cfg["seed"], cfg["student"]["arch"]) == ("rrd", 1, "resnet8")
    assert cfg["method"]["options"] == {"rrd": {"queue_size": 64}}
    teacher = yaml.safe_load((out / "resnet14_vanilla_seed0" / "config.yaml").read_text())
    assert (teacher["method"]["name"], teacher["student"]["arch"], teacher["teacher"]["checkpoint"]) == ("vanilla", "resnet14", "")
    imported = yaml.safe_load((out / "imp_kd_seed0" / "config.yaml").read_text())
    assert imported["teacher"]["checkpoint"] == str(random_teacher)
    for suffix in ("md", "csv", "json"):
        assert (out / f"results.{suffix}").stat().st_size > 0
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_numbers_are_the_run_folders_metrics(local: tuple[Path, int, list[str]]) -> None:
    out, _, _ = local
    results = json.loads((out / "results.json").read_text())
    published = json.loads((REPO / "rrd_fast" / "sweep" / "published_cifar100.json").read_text())["tables"][0]
    column = published["pairs"].index("resnet32x4_resnet8x4")
    seen = set()
    for pair, prefix in (("r14_r8", "r14_r8"), ("imp", "imp")):
        for method in ("vanilla", "kd", "rrd"):
            names = [f"resnet8_vanilla_seed{s}" if method == "vanilla" else f"{prefix}_{method}_seed{s}" for s in (0, 1)]
            top1 = [[r["top1"] for r in records(out / n) if r["stage"] == "main"] for n in names]
            last, best = np.array([t[-1] for t in top1]), np.array([max(t) for t in top1])
            seen.update(last.tolist())
            got = row(results, pair, method)
            assert got["n"] == 2 and got["seeds"] == [0, 1]
            assert got["top1_last"]["mean"] == pytest.approx(last.mean())
            assert got["top1_last"]["std"] == pytest.approx(last.std(ddof=1))
            assert got["top1_best"]["mean"] == pytest.approx(best.mean())
            assert got["top1_best"]["std"] == pytest.approx(best.std(ddof=1))
            if pair == "r14_r8":
                value = published["student"][column] if method == "vanilla" else published["rows"][method][column]
                assert got["published"] == value
                assert got["diff_last"] == pytest.approx(last.mean() - value)
            else:
                assert got["published"] is None and got["diff_last"] is None
    assert len(seen) > 1, "the tiny data should give differing top-1 values"
    teacher = next(p for p in results["pairs"] if p["pair"] == "r14_r8")
    model, _ = read_model_checkpoint(out / "resnet14_vanilla_seed0")
    assert teacher["teacher_top1"] == pytest.approx(teacher_accuracy(model, Path(yaml.safe_load(
        (out / "r14_r8_kd_seed0" / "config.yaml").read_text())["data"]["root"])))
    assert teacher["teacher_published"] == published["teacher"][column]


def teacher_accuracy(model: torch.nn.Module, root: Path) -> float:
    """Top-1 of `model` on the tiny test split, read and normalised here, not by the sweep."""
    from pipelines.formats import read_split

    split = read_split("cifar100", root, "test")
    x = torch.from_numpy(np.asarray(split.images)).float().div(255).permute(0, 3, 1, 2)
    x = (x - torch.tensor(CIFAR100_MEAN)[:, None, None]) / torch.tensor(CIFAR100_STD)[:, None, None]
    with torch.no_grad():
        pred = model.eval()(x).argmax(1).numpy()
    return 100.0 * float((pred == np.asarray(split.labels)).mean())


def test_markdown_csv_and_figure_are_rendered_from_results_json(local: tuple[Path, int, list[str]], tmp_path: Path) -> None:
    out, _, _ = local
    results = json.loads((out / "results.json").read_text())
    target = row(results, "imp", "kd")
    target["top1_last"].update(mean=12.345, std=0.678)
    target["top1_best"].update(mean=23.456, std=None)
    (tmp_path / "results.json").write_text(json.dumps(results))  # nothing else is in this folder
    paths = render(tmp_path)
    md = paths["md"].read_text()
    assert "| KD (kd) | 2 | 12.35 ± 0.68 | 23.46 (n=1) |" in md
    assert "12.345" in paths["csv"].read_text()
    fig = build_figure(results)
    ax = fig.axes[[p["pair"] for p in results["pairs"]].index("imp")]
    index = [r["method"] for r in next(p for p in results["pairs"] if p["pair"] == "imp")["rows"]].index("kd")
    last = next(c for c in ax.containers if c.get_label().startswith("ours, last"))
    assert last.lines[0].get_ydata()[index] == pytest.approx(12.345)
    segment = last.lines[2][0].get_segments()[index]
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * 0.678)
    best = next(c for c in ax.containers if c.get_label().startswith("ours, best"))
    assert best.lines[0].get_ydata()[index] == pytest.approx(23.456)
    r14 = fig.axes[0]
    stars = r14.collections[-1].get_offsets()
    published = [r["published"] for r in results["pairs"][0]["rows"]]
    assert sorted(stars[:, 1].tolist()) == pytest.approx(sorted(published))


def copy_without(out: Path, dest: Path, drop: list[str]) -> None:
    shutil.copytree(out, dest, ignore=shutil.ignore_patterns("results.*", "sweep.json", "status", "logs"))
    for name in drop:
        shutil.rmtree(dest / name)


def test_submitit_local_executor_runs_a_job_array_with_the_same_results(
        local: tuple[Path, int, list[str]], base: Path, random_teacher: Path, targets: dict[str, Path],
        tmp_path: Path) -> None:
    pytest.importorskip("submitit", reason="the slurm extra (submitit) is not installed")
    out, _, _ = local
    drop = ["r14_r8_kd_seed1", "imp_rrd_seed1"]
    copy_without(out, tmp_path / "out", drop)
    transfer = transfer_section({"stl10": targets["stl10"]}, pairs=["imp"], methods=["rrd"])
    path = sweep_file(tmp_path / "sweep.yaml", tree(tmp_path / "out", base, random_teacher, slurm={"timeout_min": 10},
                                                    transfer=transfer))
    log: list[str] = []
    # Both dropped runs have seed 1, so --only seed=1 trains the same two; of the probes, only imp_rrd_seed1's runs.
    code = run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), only=["seed=1"], executor="submitit-local",
                     log=log.append)
    assert code == 0, log
    runs = next(i for i, line in enumerate(log) if line.startswith("submitted 2 jobs (submitit-local)"))
    probes = next(i for i, line in enumerate(log) if line.startswith("submitted 1 jobs (submitit-local)"))
    assert runs < probes and "imp_rrd_seed1: trained" in "\n".join(log[runs:probes]), log  # the probe after the runs
    name = "imp_rrd_seed1.transfer.stl10_bn-train"
    status = json.loads((tmp_path / "out" / "status" / f"{name}.json").read_text())
    assert (status["action"], status["status"], status["role"]) == ("train", "done", "probe")
    assert status["pid"] != os.getpid()
    result = json.loads((tmp_path / "out" / "imp_rrd_seed1" / "transfer" / "stl10_bn-train" / "result.json").read_text())
    assert status["top1_last"] == result["top1_last"] and result["epochs"] == 2
    assert not (tmp_path / "out" / "imp_rrd_seed0" / "transfer").exists()
    for name in drop:
        status = json.loads((tmp_path / "out" / "status" / f"{name}.json").read_text())
        assert status["action"] == "train" and status["pid"] != os.getpid()
        assert [r["top1"] for r in records(tmp_path / "out" / name)] == [r["top1"] for r in records(out / name)]
    mine, theirs = json.loads((tmp_path / "out" / "results.json").read_text()), json.loads((out / "results.json").read_text())
    for pair in theirs["pairs"]:
        for r in pair["rows"]:
            assert row(mine, pair["pair"], r["method"])["top1_last"] == r["top1_last"]
            assert row(mine, pair["pair"], r["method"])["top1_best"] == r["top1_best"]


def test_slurm_executor_takes_the_sweep_files_parameters(base: Path, random_teacher: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("submitit", reason="the slurm extra (submitit) is not installed")
    from rrd_fast.sweep.plan import build_plan
    from rrd_fast.sweep.slurm import make_executor

    slurm = {"partition": "gpu", "timeout_min": 90, "array_parallelism": 7, "setup": ["source .venv/bin/activate"],
             "additional_parameters": {"qos": "high"}}
    path = sweep_file(tmp_path / "sweep.yaml", tree(tmp_path / "out", base, random_teacher, slurm=slurm))
    plan = build_plan(parse_sweep(yaml.safe_load(path.read_text()), path))
    monkeypatch.setenv("PATH", str(tmp_path / "no-slurm"))
    with pytest.raises(SweepError, match="no sbatch/srun"):
        make_executor("slurm", plan)
    bin_dir = tmp_path / "bin"  # stand-ins: submitit only checks that the Slurm commands exist before submitting
    bin_dir.mkdir()
    for tool in ("sbatch", "srun"):
        (bin_dir / tool).write_text("#!/bin/sh\nexit 1\n")
        (bin_dir / tool).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    params = make_executor("slurm", plan)._executor.parameters
    assert (params["partition"], params["time"], params["array_parallelism"], params["gpus_per_node"]) == ("gpu", 90, 7, 1)
    assert params["setup"] == ["source .venv/bin/activate"] and params["additional_parameters"] == {"qos": "high"}
    assert params["job_name"] == "sweep-tiny" and params["mem"] == "32GB" and params["cpus_per_task"] == 8


def test_dry_run_estimates_from_the_measured_step_rate(local: tuple[Path, int, list[str]], base: Path,
                                                       random_teacher: Path, tmp_path: Path) -> None:
    out, _, _ = local
    path = sweep_file(tmp_path / "sweep.yaml", tree(out, base, random_teacher, seeds=[0, 1, 2]))
    lines: list[str] = []
    assert run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), dry_run=True, log=lines.append) == 0
    text = "\n".join(lines)
    done = [ln for ln in lines if ln.strip().startswith("done")]
    new = [ln for ln in lines if ln.strip().startswith("new")]
    assert len(done) == len(RUNS) and len(new) == 5  # seed 2: one student alone, four distillations
    seconds = [r["epoch_time_s"] for r in records(out / "r14_r8_kd_seed0")]
    kd2 = next(ln for ln in new if "r14_r8_kd_seed2" in ln)
    assert kd2.split()[-1] == f"{sum(seconds) / len(seconds) / 3600:.2f}"
    assert "for 5 runs at the measured step rate" in text
    assert not (out / "r14_r8_kd_seed2").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys, threading, time
    from pathlib import Path
    target = Path(sys.argv[2]) / "resume" / "state.pt"
    def watch():
        while not target.exists():
            time.sleep(0.001)
        os.kill(os.getpid(), signal.SIGKILL)
    threading.Thread(target=watch, daemon=True).start()
    from rrd_fast.sweep.__main__ import main
    main([sys.argv[1]])
""")


def test_killed_sweep_skips_finished_runs_and_resumes_the_interrupted_one(
        base: Path, random_teacher: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    content = {"name": "kill", "output_dir": str(out), "config_dir": None, "seeds": [0], "student_baseline": False,
               "pairs": [{"name": "imp", "teacher": "resnet8", "student": "resnet8", "config": str(base),
                          "teacher_checkpoint": str(random_teacher)}],
               "methods": ["kd", "rrd"],
               "method_overrides": {"rrd": ["optim.epochs=2", "method.options={rrd: {queue_size: 64}}"]}}
    path = sweep_file(tmp_path / "sweep.yaml", content)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RRD_FAST_NO_MALLOC_TUNING": "1"}
    proc = subprocess.run([sys.executable, "-c", KILLER, str(path), str(out / "imp_rrd_seed0")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / "imp_kd_seed0" / "summary.json").is_file()
    assert not (out / "imp_rrd_seed0" / "summary.json").exists()
    assert len(records(out / "imp_rrd_seed0")) == 1
    kd_summary = (out / "imp_kd_seed0" / "summary.json").stat().st_mtime_ns
    log: list[str] = []
    code = run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), parallel=2, log=log.append)
    assert code == 0, log
    assert any("imp_kd_seed0: finished already, skipped" in line for line in log), log
    assert (out / "imp_kd_seed0" / "summary.json").stat().st_mtime_ns == kd_summary
    status = json.loads((out / "status" / "imp_rrd_seed0.json").read_text())
    assert (status["action"], status["from_epoch"], status["status"]) == ("resume", 1, "done")
    assert status["pid"] != os.getpid()  # --parallel ran it in a worker process, on its share of the cores
    assert status["cpus"] == core_groups(2)[0]
    assert [r["epoch"] for r in records(out / "imp_rrd_seed0")] == [1, 2]
    assert row(json.loads((out / "results.json").read_text()), "imp", "rrd")["n"] == 1


def test_a_failing_run_is_reported_and_the_others_finish(base: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    teacher = tmp_path / "t8x4"
    write_model_checkpoint(teacher, create_model("resnet8x4", num_classes=100, in_channels=3),
                           {"arch": "resnet8x4", "num_classes": 100, "in_channels": 3, "image_size": 32,
                            "normalization": {"mean": list(CIFAR100_MEAN), "std": list(CIFAR100_STD)}})
    out = tmp_path / "out"
    content = {"name": "fail", "output_dir": str(out), "config_dir": None, "seeds": [0], "student_baseline": False,
               "pairs": [{"teacher": "resnet8x4", "student": "resnet8", "config": str(base), "teacher_checkpoint": str(teacher)}],
               "methods": ["fsp", "kd"]}  # FSP needs equal channel counts: 64/128/256 against 16/32/64 fails
    path = sweep_file(tmp_path / "sweep.yaml", content)
    log: list[str] = []
    assert run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), log=log.append) == 1
    assert (out / "resnet8x4_resnet8_kd_seed0" / "summary.json").is_file()
    results = json.loads((out / "results.json").read_text())
    assert [f["run"] for f in results["failed"]] == ["resnet8x4_resnet8_fsp_seed0"]
    assert "fsp" in results["failed"][0]["error"] and "channel" in results["failed"][0]["error"]
    assert row(results, "resnet8x4_resnet8", "kd")["n"] == 1
    assert row(results, "resnet8x4_resnet8", "fsp")["failed_seeds"] == [0]
    assert "## Failed runs" in (out / "results.md").read_text()
    assert any("FAILED" in line and "fsp" in line for line in log)


# ---------------------------------------------------------------------- transfer probes
TRANSFER_ROWS = {"teacher": ["resnet14_vanilla_seed0"], "vanilla": ["resnet8_vanilla_seed0", "resnet8_vanilla_seed1"],
                 "kd": ["r14_r8_kd_seed0", "r14_r8_kd_seed1"]}
PUBLISHED_TRANSFER = {"teacher": (68.6, 31.5), "vanilla": (69.7, 33.7), "kd": (70.9, 33.9)}  # wrn_40_2 -> wrn_16_2


def probe_results(out: Path, run: str) -> dict[str, dict[str, Any]]:
    """{dataset: result.json} of a run's probes, read here from the files."""
    found = {}
    for dataset in ("stl10", "tiny_imagenet"):
        path = out / run / "transfer" / f"{dataset}_bn-train" / "result.json"
        if path.is_file():
            found[dataset] = json.loads(path.read_text())
    return found


@pytest.fixture(scope="module")
def probed(local: tuple[Path, int, list[str]], base: Path, random_teacher: Path, targets: dict[str, Path],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The local sweep's finished runs, copied, with a transfer section, so that only probes run: first with one
    student's weights corrupted (its two probes fail), then again with them restored."""
    out, _, _ = local
    root = tmp_path_factory.mktemp("probed")
    copy_without(out, root / "out", [])
    content = tree(root / "out", base, random_teacher,
                   transfer=transfer_section(targets, pairs=["r14_r8"], methods=["vanilla", "kd"]))
    content["pairs"][0]["published"] = "wrn_40_2_wrn_16_2"  # the column the paper's transfer table has
    path = sweep_file(root / "sweep.yaml", content)
    weights = root / "out" / "r14_r8_kd_seed1" / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    first: list[str] = []
    first_code = run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), log=first.append)
    first_results = json.loads((root / "out" / "results.json").read_text())
    first_md = (root / "out" / "results.md").read_text()
    mtimes = {p: p.stat().st_mtime_ns for p in (root / "out").glob("*/transfer/*/result.json")}
    weights.write_bytes(good)
    log: list[str] = []
    code = run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), log=log.append)
    dry: list[str] = []
    run_sweep(parse_sweep(yaml.safe_load(path.read_text()), path), dry_run=True, log=dry.append)
    return {"out": root / "out", "first_code": first_code, "first_log": first, "first_results": first_results,
            "first_md": first_md, "mtimes": mtimes, "code": code, "log": log, "dry": dry}


def transfer_row(results: dict[str, Any], method: str) -> dict[str, Any]:
    (pair,) = results["transfer"]["pairs"]
    return next(r for r in pair["rows"] if r["method"] == method)


def test_transfer_table_numbers_are_the_probes_result_files(probed: dict[str, Any]) -> None:
    out = probed["out"]
    results = json.loads((out / "results.json").read_text())
    transfer = results["transfer"]
    assert transfer["bn"] == "train" and transfer["bn_used"] == ["train"]
    assert [r["method"] for r in transfer["pairs"][0]["rows"]] == ["teacher", "vanilla", "kd"]
    seen = set()
    for method, runs in TRANSFER_ROWS.items():
        row = transfer_row(results, method)
        for i, dataset in enumerate(("stl10", "tiny_imagenet")):
            files = [probe_results(out, run)[dataset] for run in runs]
            assert [f["seed"] for f in files] == [int(run[-1]) for run in runs]  # the probe seed is the run's
            last, best = np.array([f["top1_last"] for f in files]), np.array([f["top1_best"] for f in files])
            seen.update(last.tolist())
            cell = row["datasets"][dataset]
            assert cell["n"] == len(runs) and cell["bn"] == ["train"] and cell["epochs"] == [2] * len(runs)
            assert cell["top1_last"]["mean"] == pytest.approx(last.mean())
            assert cell["top1_best"]["mean"] == pytest.approx(best.mean())
            if len(runs) > 1:
                assert cell["top1_last"]["std"] == pytest.approx(last.std(ddof=1))
                assert cell["top1_best"]["std"] == pytest.approx(best.std(ddof=1))
            assert cell["published"] == PUBLISHED_TRANSFER[method][i]
            assert cell["diff_last"] == pytest.approx(last.mean() - PUBLISHED_TRANSFER[method][i])
    assert len(seen) > 1, "the tiny probes should give differing top-1 values"
    md = (out / "results.md").read_text()
    assert "BatchNorm while probing: **train**" in md
    cells = transfer_row(results, "kd")["datasets"]
    expected = "| KD (kd) | " + " | ".join(
        f"{c['top1_last']['mean']:.2f} ± {c['top1_last']['std']:.2f} (n=2) | {c['published']:.2f} | {c['diff_last']:+.2f}"
        for c in (cells["stl10"], cells["tiny_imagenet"])) + " |"
    assert expected in md.splitlines(), md
    rows = [r for r in csv_rows(out) if r["table"] == "transfer"]
    assert len(rows) == 6 and {r["dataset"] for r in rows} == {"stl10", "tiny_imagenet"}
    teacher = next(r for r in rows if r["method"] == "teacher" and r["dataset"] == "stl10")
    assert float(teacher["top1_last_mean"]) == probe_results(out, "resnet14_vanilla_seed0")["stl10"]["top1_last"]
    assert teacher["bn"] == "train" and teacher["probe_epochs"] == "2"
    assert (out / "results_transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def csv_rows(out: Path) -> list[dict[str, str]]:
    import csv

    with open(out / "results.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def test_a_failed_probe_is_reported_and_the_others_finish(probed: dict[str, Any]) -> None:
    assert probed["first_code"] == 1
    failed = probed["first_results"]["transfer"]["failed"]
    assert sorted(f["probe"] for f in failed) == [f"r14_r8_kd_seed1.transfer.{d}_bn-train" for d in ("stl10", "tiny_imagenet")]
    assert all("sha256" in f["error"] for f in failed), failed
    kd = transfer_row(probed["first_results"], "kd")["datasets"]["stl10"]
    assert kd["n"] == 1 and kd["failed_seeds"] == [1]
    assert "### Failed probes" in probed["first_md"] and "STL-10 failed seeds [1]" in probed["first_md"]
    assert len(probed["mtimes"]) == 8  # every other probe finished
    assert sum("FAILED" in line and ".transfer." in line for line in probed["first_log"]) == 2


def test_a_rerun_skips_finished_probes(probed: dict[str, Any]) -> None:
    assert probed["code"] == 0, probed["log"]
    assert sum(".transfer." in line and "finished already, skipped" in line for line in probed["log"]) == 8
    assert sum(".transfer." in line and ": probed in" in line for line in probed["log"]) == 2, probed["log"]
    for path, mtime in probed["mtimes"].items():
        assert path.stat().st_mtime_ns == mtime, path
    results = json.loads((probed["out"] / "results.json").read_text())
    assert transfer_row(results, "kd")["datasets"]["stl10"]["n"] == 2 and not results["transfer"]["failed"]
    probes = [ln for ln in probed["dry"] if ".transfer." in ln]
    assert len(probes) == 10 and all(ln.split()[0] == "done" for ln in probes)
    assert any(ln.startswith("10 probes (10 done)") for ln in probed["dry"]), probed["dry"]


def test_transfer_table_and_figure_are_rendered_from_results_json(probed: dict[str, Any], tmp_path: Path) -> None:
    results = json.loads((probed["out"] / "results.json").read_text())
    cell = transfer_row(results, "vanilla")["datasets"]["tiny_imagenet"]
    cell["top1_last"].update(mean=12.345, std=0.678)
    (tmp_path / "results.json").write_text(json.dumps(results))  # nothing else is in this folder
    paths = render(tmp_path)
    assert "| 12.35 ± 0.68 (n=2) | 33.70 |" in paths["md"].read_text()
    assert "12.345" in paths["csv"].read_text() and paths["transfer_png"].is_file()
    fig = build_transfer_figure(results)
    ax = fig.axes[1]  # the pair's Tiny-ImageNet panel
    last = next(c for c in ax.containers if c.get_label().startswith("ours, last"))
    assert last.lines[0].get_ydata()[1] == pytest.approx(12.345)
    segment = last.lines[2][0].get_segments()[1]
    assert segment[1][1] - segment[0][1] == pytest.approx(2 * 0.678)
    stars = ax.collections[-1].get_offsets()
    assert stars[:, 1].tolist() == pytest.approx([31.5, 33.7, 33.9])


def test_parallel_workers_get_disjoint_cores() -> None:
    assert core_groups(2, [0, 1, 2, 3]) == [[0, 1], [2, 3]]
    assert core_groups(3, [4, 5, 6, 7, 8]) == [[4, 5], [6, 7], [8]]
    assert core_groups(3, [0, 1]) == [[0], [1], [0]]  # more workers than cores: one core each, shared


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run_cli(lambda: sweep_main(argv))
    return code, capsys.readouterr().err.strip()


def test_teacher_below_the_threshold_stops_the_sweep(base: Path, cifar: Path, random_teacher: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    content = {"name": "accept", "output_dir": str(out), "config_dir": None, "seeds": [0],
               "pairs": [{"teacher": "resnet8", "student": "resnet8", "config": str(base),
                          "teacher_checkpoint": str(random_teacher), "published": "resnet32x4_resnet8x4"}],
               "methods": ["kd"], "teacher_min_top1": "published - 1"}
    code, err = _cli([str(sweep_file(tmp_path / "sweep.yaml", content))], capsys)
    model, _ = read_model_checkpoint(random_teacher)
    measured = teacher_accuracy(model, cifar)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert str(random_teacher) in err and f"top-1 {measured:.2f}" in err and "78.42" in err, err
    assert not [p for p in out.iterdir() if (p / "config.yaml").exists()]


BAD = {
    "unknown pair": ({"pairs": ["no_such_pair"], "config_dir": "{tmp}"}, ["pairs[0]", "no_such_pair", "no_such_pair.yaml"]),
    "unknown method": ({"methods": ["kd", "rdd"]}, ["methods[1]", "'rdd'", "did you mean"]),
    "unknown model": ({"pairs": [{"teacher": "resnet9", "student": "resnet8", "config": "{base}"}]},
                      ["pairs[0].teacher", "resnet9"]),
    "unknown sweep key": ({"seed": [0]}, ["'seed'", "did you mean 'seeds'"]),
    "unknown config key": ({"overrides": ["optim.epoch=3"]}, ["overrides[0]", "optim.epoch"]),
    "empty seeds": ({"seeds": []}, ["seeds", "empty"]),
    "missing dataset": ({"overrides": ["data.root={tmp}/nowhere"]}, ["data.root", "nowhere", "does not exist"]),
    "unknown transfer key": ({"transfer": {"datasets": {"stl10": "{tmp}"}, "epochs": 3}}, ["'transfer.epochs'"]),
    "unknown transfer data set": ({"transfer": {"datasets": {"stl-10": "{tmp}"}}},
                                  ["transfer.datasets.stl-10", "unknown data set", "did you mean 'stl10'"]),
    "missing transfer folder": ({"transfer": {"datasets": {"tiny_imagenet": "{tmp}/nowhere"}}},
                                ["transfer.datasets.tiny_imagenet", "nowhere", "does not exist"]),
    "transfer method not in the sweep": ({"transfer": {"datasets": {"stl10": "{tmp}"}, "methods": ["kd", "crd"]}},
                                         ["transfer.methods[1]", "'crd'", "not a method of this sweep"]),
    "unknown transfer pair": ({"transfer": {"datasets": {"stl10": "{tmp}"}, "pairs": ["r14"]}},
                              ["transfer.pairs[0]", "'r14'"]),
    "unknown probe key": ({"transfer": {"datasets": {"stl10": "{tmp}"}, "overrides": ["epoch=3"]}},
                          ["transfer.overrides[0]", "epoch=3", "did you mean 'epochs'"]),
    "probe root in overrides": ({"transfer": {"datasets": {"stl10": "{tmp}"}, "overrides": ["root=/data"]}},
                                ["transfer.overrides[0]", "set by transfer.datasets"]),
    "unknown bn mode": ({"transfer": {"datasets": {"stl10": "{tmp}"}, "bn": "frozen"}}, ["transfer.bn", "'frozen'"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_exit_2_and_nothing_runs(case: str, base: Path, random_teacher: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    change, needles = BAD[case]
    content = tree(tmp_path / "out", base, random_teacher)
    content.update(json.loads(json.dumps(change).replace("{tmp}", str(tmp_path)).replace("{base}", str(base))))
    path = sweep_file(tmp_path / "sweep.yaml", content)
    code, err = _cli([str(path)], capsys)
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in [str(path), *needles]:
        assert needle in err, err
    assert not (tmp_path / "out").exists()


def test_only_selects_runs_and_their_teacher(base: Path, random_teacher: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = sweep_file(tmp_path / "sweep.yaml", tree(tmp_path / "out", base, random_teacher))
    assert run_cli(lambda: sweep_main([str(path), "--dry-run", "--only", "pair=r14_r8", "method=rrd", "seed=1"])) == 0
    lines = [ln.split()[2] for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("new")]
    assert lines == ["resnet14_vanilla_seed0", "r14_r8_rrd_seed1"]
    code, err = _cli([str(path), "--only", "pair=nope"], capsys)
    assert code == 2 and "--only pair=nope" in err


def test_paper_sweep_file_covers_both_tables(tmp_path: Path) -> None:
    path = REPO / "configs" / "sweeps" / "cifar100_paper.yaml"
    content = yaml.safe_load(path.read_text())
    table = json.loads((REPO / "rrd_fast" / "sweep" / "published_cifar100.json").read_text())
    content["output_dir"] = str(tmp_path / "out")
    content["config_dir"] = str(REPO / "configs" / "cifar100")
    spec = parse_sweep(content, path)
    published_pairs = [p for t in table["tables"] for p in t["pairs"]]
    assert [p.name for p in spec.pairs] == published_pairs and len(published_pairs) == 13
    assert spec.methods == [m for m in list_methods() if m != "vanilla"]
    assert spec.seeds == [0, 1, 2] and spec.student_baseline and spec.teacher_min_top1 == "published - 1"
    for pair in spec.pairs:
        assert (pair.teacher, pair.student) == tuple(table["arches"][pair.name].values())
        assert Path(pair.config).is_file() and Path(pair.teacher_config).is_file() and Path(pair.student_config).is_file()
    no_fsp = {p for t in table["tables"] for p, v in zip(t["pairs"], t["rows"]["fsp"]) if v is None}
    assert {(e.pair, e.method) for e in spec.exclude} == {(p, "fsp") for p in no_fsp}
    spec.methods, spec.seeds = ["kd", "rrd_kd"], [0]  # a plan small enough to build in a test
    lines: list[str] = []
    assert run_sweep(spec, dry_run=True, log=lines.append) == 0
    runs = [ln for ln in lines if ln.strip().startswith("new") and ".transfer." not in ln]
    assert len(runs) == 6 + 9 + 26  # teachers, students alone, 13 pairs x 2
    assert "resnet32x4_vanilla_seed0" in "\n".join(lines)
    # The transfer section: wrn_40_2 -> wrn_16_2's teacher, student alone and (here) kd and rrd_kd runs, on both data sets.
    assert spec.transfer is not None and spec.transfer.pairs == ["wrn_40_2_wrn_16_2"] and spec.transfer.bn == "train"
    probes = sorted(ln.split()[2] for ln in lines if ".transfer." in ln)
    assert probes == sorted(f"{run}.transfer.{d}_bn-train" for d in ("stl10", "tiny_imagenet") for run in (
        "wrn_40_2_vanilla_seed0", "wrn_16_2_vanilla_seed0", "wrn_40_2_wrn_16_2_kd_seed0", "wrn_40_2_wrn_16_2_rrd_kd_seed0"))
    summary = next(ln for ln in lines if ln.startswith("41 runs"))
    assert "estimated GPU-hours left: unknown" in summary


def test_published_table_file() -> None:
    from rrd_fast.models import list_models
    from rrd_fast.sweep.published import load_published

    table = load_published("cifar100")
    assert len(table.pairs) == 13
    for pair in table.pairs:
        assert set(table.arches(pair)) <= set(list_models())
    raw = table.data
    for t in raw["tables"]:
        assert set(t["rows"]) <= set(list_methods()) | {"fitnet", "at", "sp", "nst"} | set(raw["not_in_rrd_fast"])
    for method, spec in raw["methods"].items():
        assert spec["source"] in raw["sources"], method
    # Spot checks against the tables as printed.
    assert table.method("resnet32x4_resnet8x4", "rrd_kd").top1 == 75.08
    assert table.method("resnet32x4_ShuffleV2", "rrd_kd").top1 == 76.83
    assert table.method("wrn_40_2_wrn_16_2", "crd").top1 == 75.48
    assert table.method("wrn_40_2_wrn_40_1", "fsp") is None and table.method("vgg13_MobileNetV2", "fsp") is None
    assert table.teacher("ResNet50_vgg8").top1 == 79.34 and table.student("resnet110_resnet20").top1 == 69.06
    assert table.method("resnet32x4_resnet8x4", "rrd").source == "rrd_readme"
    assert table.method("resnet32x4_resnet8x4", "kd").source == "repdistiller"
    dkd = table.method("resnet32x4_resnet8x4", "dkd")
    assert dkd.top1 == 76.32 and dkd.source == "dkd"
    # The transfer table: wrn_40_2 -> wrn_16_2 only, STL-10 and Tiny-ImageNet columns.
    assert table.transfer("wrn_40_2_wrn_16_2", "teacher", "stl10").top1 == 68.6
    assert table.transfer("wrn_40_2_wrn_16_2", "student", "tiny_imagenet").top1 == 33.7
    assert table.transfer("wrn_40_2_wrn_16_2", "rrd_kd", "tiny_imagenet").top1 == 34.5
    assert table.transfer("wrn_40_2_wrn_16_2", "crd_kd", "stl10").source == "rrd_readme"
    assert table.transfer("resnet32x4_resnet8x4", "kd", "stl10") is None


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason=f"real Fashion-MNIST not installed at {DEBIAN_FASHION_MNIST} (apt-get install dataset-fashion-mnist)")
def test_demo_quick_mode_runs_the_sweep_on_real_fashion_mnist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from rrd_fast.demo import main as demo_main

    out = tmp_path / "demo"
    assert demo_main(["--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    (pair,) = results["pairs"]
    assert [r["method"] for r in pair["rows"]] == ["vanilla", "kd", "rrd", "rrd_kd"]
    assert all(r["n"] == 2 and r["top1_last"]["std"] is not None for r in pair["rows"])
    assert "| method | n | top-1 last | top-1 best |" in printed
    assert printed.count("seed std") >= 6  # three methods x (last, best) in the table's notes
    assert "At the last epoch, against the student alone, " in printed and "At the best epoch" in printed
    for seed in (0, 1):
        manifest = json.loads((out / "teacher_cache" / "resnet20_vanilla_seed0" / f"seed{seed}" / "manifest.json").read_text())
        assert manifest["complete"]
    cfg = yaml.safe_load((out / "resnet20_resnet8_rrd_kd_seed1" / "config.yaml").read_text())
    assert cfg["teacher"]["cache"].endswith("teacher_cache/resnet20_vanilla_seed0/seed1")
    assert cfg["data"]["root"] == str(out / "data")  # the first images of the real files, copied
    from pipelines.formats import read_split

    copied, real = read_split("fashion_mnist", out / "data", "train"), read_split("fashion_mnist", DEBIAN_FASHION_MNIST, "train")
    assert np.array_equal(np.asarray(copied.images), np.asarray(real.images)[:len(copied.labels)])
    assert os.readlink(out / "rrd_kd") == "resnet20_resnet8_rrd_kd_seed0"
    alone = [records(out / f"resnet8_vanilla_seed{s}")[-1]["top1"] for s in (0, 1)]
    assert pair["rows"][0]["top1_last"]["values"] == alone
