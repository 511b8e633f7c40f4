"""End-to-end training: the run directory, exact resume, bad input, and the accelerate launcher."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipelines.synthetic import write_fashion_mnist
from rrd_fast.checkpoint import read_model_checkpoint, sha256_file, write_model_checkpoint
from rrd_fast.cli import run_cli
from rrd_fast.config import load_config
from rrd_fast.models import create_model
from rrd_fast.train import main as train_main
from rrd_fast.teacher import OnlineTeacher
from rrd_fast.trainer import Trainer

REPO = Path(__file__).resolve().parent.parent
FMNIST_SIDECAR = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
                  "normalization": {"mean": [0.2860], "std": [0.3530]}}


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=64, gz=True, seed=0)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("teacher")
    write_model_checkpoint(out, create_model("resnet8", num_classes=10, in_channels=1), FMNIST_SIDECAR)
    return out


def base_args(data: Path, out: Path, name: str) -> list[str]:
    return [f"name={name}", f"output_dir={out}", "data.format=fashion_mnist", f"data.root={data}",
            "data.batch_size=32", "data.eval_batch_size=64", "student.arch=resnet8", "train.progress=false"]


def rrd_kd_args(teacher: Path) -> list[str]:
    return [f"teacher.checkpoint={teacher}", "method.name=rrd", "method.alpha=1.0", "method.beta=1.0",
            "method.options={rrd: {queue_size: 100}}"]


def test_accelerate_launch_trains_and_writes_the_run_directory(fmnist: Path, teacher_dir: Path, tmp_path: Path) -> None:
    args = base_args(fmnist, tmp_path, "rrdkd") + rrd_kd_args(teacher_dir) + ["optim.epochs=2"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--cpu",
           str(REPO / "rrd_fast" / "train.py"), *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "last-epoch top-1" in proc.stdout and "best top-1" in proc.stdout
    run = tmp_path / "rrdkd"
    resolved = yaml.safe_load((run / "config.yaml").read_text())
    assert resolved["method"]["name"] == "rrd" and resolved["method"]["alpha"] == 1.0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("loss_ce", "loss_kd", "loss_rrd", "top1", "top5", "lr", "images_per_s", "epoch_time_s", "train_top1"):
        assert key in records[-1], key
    meta = json.loads((run / "model.json").read_text())
    assert meta["arch"] == "resnet8" and meta["num_classes"] == 10 and meta["method"]["name"] == "rrd"
    assert meta["normalization"] == {"mean": [0.2860], "std": [0.3530]}
    assert meta["teacher"]["sha256"] == json.loads((teacher_dir / "model.json").read_text())["sha256"]
    assert meta["sha256"] == sha256_file(run / "model.safetensors")
    assert meta["top1_final"] == records[-1]["top1"]
    assert meta["top1_best"] == max(r["top1"] for r in records)
    assert (run / "resume" / "state.pt").is_file()
    model, _ = read_model_checkpoint(run)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "model.safetensors"))


def test_resume_continues_bit_identically(fmnist: Path, teacher_dir: Path, tmp_path: Path) -> None:
    common = rrd_kd_args(teacher_dir) + ["optim.milestones=[1]"]  # the LR decay falls in the resumed epoch
    full = Trainer(load_config(None, base_args(fmnist, tmp_path, "full") + common + ["optim.epochs=2"]))
    full.fit()
    first = Trainer(load_config(None, base_args(fmnist, tmp_path, "split") + common + ["optim.epochs=1"]))
    first.fit()
    resumed = Trainer(load_config(tmp_path / "split" / "config.yaml", ["optim.epochs=2"]), resume=True)
    assert resumed.state.epoch == 1
    resumed.fit()
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "split")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    queue_full = full.unwrapped.objective.terms["rrd"].queue
    queue_resumed = resumed.unwrapped.objective.terms["rrd"].queue
    assert torch.equal(queue_full, queue_resumed)
    history = [json.loads(line) for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in history] == [1, 2]


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = run_cli(lambda: train_main(argv))
    err = capsys.readouterr().err.strip()
    return code, err


def _assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    for needle in needles:
        assert needle in err, err


def test_missing_dataset_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(base_args(tmp_path / "nowhere", tmp_path, "r"), capsys)
    _assert_one_line_error(code, err, str(tmp_path / "nowhere"))
    assert not (tmp_path / "r").exists()


def test_corrupt_dataset_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = write_fashion_mnist(tmp_path / "data", n_train=64, n_test=16, gz=False)
    images = next(root.rglob("train-images-idx3-ubyte"))
    images.write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)  # valid magic, counts that do not fit the size
    code, err = _cli(base_args(root, tmp_path, "r"), capsys)
    _assert_one_line_error(code, err, "train-images-idx3-ubyte")
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_unknown_config_key_suggests_closest(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, err = _cli(base_args(fmnist, tmp_path, "r") + ["optim.learning_rate=0.1"], capsys)
    _assert_one_line_error(code, err, "optim.learning_rate")
    code, err = _cli(base_args(fmnist, tmp_path, "r") + ["optim.epoch=3"], capsys)
    _assert_one_line_error(code, err, "did you mean 'optim.epochs'")


def test_teacher_checkpoint_for_another_architecture(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pth = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": create_model("resnet20", num_classes=10, in_channels=1).state_dict()}, pth)
    args = base_args(fmnist, tmp_path, "r") + ["method.name=kd", "method.gamma=0.1", "method.alpha=0.9",
                                               f"teacher.checkpoint={pth}", "teacher.arch=resnet8"]
    code, err = _cli(args, capsys)
    _assert_one_line_error(code, err, str(pth), "resnet8")
    assert not (tmp_path / "r").exists()


def test_teacher_with_another_class_count(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wrong = tmp_path / "t100"
    write_model_checkpoint(wrong, create_model("resnet8", num_classes=100, in_channels=1), {**FMNIST_SIDECAR, "num_classes": 100})
    args = base_args(fmnist, tmp_path, "r") + ["method.name=kd", "method.gamma=0.1", "method.alpha=0.9",
                                               f"teacher.checkpoint={wrong}"]
    code, err = _cli(args, capsys)
    _assert_one_line_error(code, err, "100 classes")


def test_teacher_for_other_input_channels(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rgb = tmp_path / "rgb"
    write_model_checkpoint(rgb, create_model("resnet8", num_classes=10, in_channels=3), {**FMNIST_SIDECAR, "in_channels": 3})
    args = base_args(fmnist, tmp_path, "r") + rrd_kd_args(rgb)
    code, err = _cli(args, capsys)
    _assert_one_line_error(code, err, "conv1.weight")


def test_non_finite_loss_names_step_and_term(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = create_model("resnet8", num_classes=10, in_channels=1)
    with torch.no_grad():
        model.fc.weight.fill_(float("nan"))
    bad = tmp_path / "nan_teacher"
    write_model_checkpoint(bad, model, FMNIST_SIDECAR)
    args = base_args(fmnist, tmp_path, "r") + ["method.name=kd", "method.gamma=0.1", "method.alpha=0.9",
                                               f"teacher.checkpoint={bad}"]
    code, err = _cli(args, capsys)
    _assert_one_line_error(code, err, "non-finite loss at step 1", "'kd'")
    assert not (tmp_path / "r" / "model.safetensors").exists()


def test_method_name_alone_gives_the_authors_weights_and_saves_them(fmnist: Path, teacher_dir: Path, tmp_path: Path) -> None:
    args = base_args(fmnist, tmp_path, "rrd_default") + [f"teacher.checkpoint={teacher_dir}", "method.name=rrd",
                                                          "method.options={rrd: {queue_size: 64}}", "data.train_limit=64"]
    trainer = Trainer(load_config(None, args))
    assert trainer.unwrapped.objective.weights == {"ce": 1.0, "rrd": 1.0}
    saved = yaml.safe_load((tmp_path / "rrd_default" / "config.yaml").read_text())["method"]
    assert (saved["gamma"], saved["alpha"], saved["beta"]) == (1.0, 0.0, 1.0)
    kd = Trainer(load_config(None, base_args(fmnist, tmp_path, "kd_default") + [f"teacher.checkpoint={teacher_dir}",
                                                                               "method.name=kd"]))
    assert kd.unwrapped.objective.weights == {"ce": 0.1, "kd": 0.9}
    assert isinstance(kd.teacher, OnlineTeacher)


def test_an_objective_that_reads_no_teacher_output_does_not_run_the_teacher(fmnist: Path, teacher_dir: Path,
                                                                             tmp_path: Path) -> None:
    args = base_args(fmnist, tmp_path, "kd_ce_only") + [f"teacher.checkpoint={teacher_dir}", "method.name=kd",
                                                         "method.gamma=1", "method.alpha=0", "optim.epochs=1",
                                                         "data.train_limit=64"]
    trainer = Trainer(load_config(None, args))
    assert trainer.teacher is None and list(trainer.unwrapped.objective.weights) == ["ce"]
    trainer.fit()
    assert json.loads((tmp_path / "kd_ce_only" / "model.json").read_text())["teacher"]["sha256"]


def test_a_fresh_run_never_overwrites_a_run_folder(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = base_args(fmnist, tmp_path, "mine") + ["optim.epochs=1", "data.train_limit=64"]
    assert _cli(args, capsys)[0] == 0
    before = (tmp_path / "mine" / "model.safetensors").read_bytes()
    code, err = _cli(args + ["seed=5"], capsys)
    _assert_one_line_error(code, err, str(tmp_path / "mine"), "--resume", "name=", "--overwrite")
    assert (tmp_path / "mine" / "model.safetensors").read_bytes() == before
    assert _cli(["--overwrite", *args, "seed=5"], capsys)[0] == 0
    assert yaml.safe_load((tmp_path / "mine" / "config.yaml").read_text())["seed"] == 5
    assert not (tmp_path / "mine" / ".lock").exists()


def test_a_run_folder_locked_by_a_live_process_is_refused(fmnist: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import socket

    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "busy").mkdir()
        (tmp_path / "busy" / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        code, err = _cli(base_args(fmnist, tmp_path, "busy") + ["optim.epochs=1", "data.train_limit=64"], capsys)
        _assert_one_line_error(code, err, f"pid {holder.pid}", socket.gethostname())
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and taken over
    assert _cli(base_args(fmnist, tmp_path, "busy") + ["optim.epochs=1", "data.train_limit=64"], capsys)[0] == 0


def test_each_epoch_prints_a_line_and_the_best_weights_are_kept(fmnist: Path, teacher_dir: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    from rrd_fast.data import build_data

    args = base_args(fmnist, tmp_path, "lines") + [f"teacher.checkpoint={teacher_dir}", "method.name=kd",
                                                    "optim.epochs=2", "data.train_limit=64", "train.progress=true"]
    assert train_main(args) == 0
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(" |")[0] for line in lines] == ["epoch 1/2", "epoch 2/2"]
    records = [json.loads(line) for line in (tmp_path / "lines" / "metrics.jsonl").read_text().splitlines()]
    for line, record in zip(lines, records):
        assert f"top-1 {record['top1']:.2f}" in line and "img/s" in line and "eta 0:00:00" in lines[-1]
        assert f"kd {record['loss_kd']:.4f}" in line
    run = tmp_path / "lines"
    summary = json.loads((run / "summary.json").read_text())
    best = load_file(str(run / "model_best.safetensors"))
    last = _weights(run)
    same = all(torch.equal(best[k], last[k]) for k in last)
    assert same == (summary["best_epoch"] == 2)
    # the teacher's own top-1 on the eval split is measured and recorded
    cfg = load_config(run / "config.yaml")
    teacher, _ = read_model_checkpoint(teacher_dir)
    data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    correct = total = 0
    with torch.no_grad():
        for batch in data.eval.epoch(0):
            correct += int((teacher.eval()(batch.images).argmax(1) == batch.labels).sum())
            total += len(batch)
    meta = json.loads((run / "model.json").read_text())
    assert meta["teacher"]["top1"] == pytest.approx(100.0 * correct / total)
    assert f"top-1 {100.0 * correct / total:.2f} on the eval split" in out


def test_resume_refuses_a_changed_run_and_changed_inputs(fmnist: Path, teacher_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(teacher_dir, teacher)
    args = base_args(fmnist, tmp_path, "first") + [f"teacher.checkpoint={teacher}", "method.name=kd", "optim.epochs=1",
                                                    "data.train_limit=64"]
    assert _cli(args, capsys)[0] == 0
    run = tmp_path / "first"
    code, err = _cli(["--resume", str(run), "seed=5", "data.batch_size=16", "optim.epochs=2"], capsys)
    _assert_one_line_error(code, err, "seed 0 -> 5", "data.batch_size 32 -> 16")
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0
    # the teacher is replaced by another one: refused, naming the teacher
    torch.manual_seed(99)
    write_model_checkpoint(teacher, create_model("resnet8", num_classes=10, in_channels=1), FMNIST_SIDECAR)
    code, err = _cli(["--resume", str(run), "optim.epochs=2"], capsys)
    _assert_one_line_error(code, err, "the teacher", "changed since this run started")
    shutil.rmtree(teacher)
    shutil.copytree(teacher_dir, teacher)
    assert _cli(["--resume", str(run), "optim.epochs=2"], capsys)[0] == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["optim"]["epochs"] == 2


@pytest.mark.parametrize("stop_after", [1, 3, 4])
def test_a_stop_mid_epoch_resumes_bit_identically(fmnist: Path, teacher_dir: Path, tmp_path: Path, stop_after: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """128 samples at batch 32: 4 steps an epoch; stops after steps 1, 3 and 4 (the last one at the epoch's end)."""
    import signal

    from rrd_fast.trainer import TrainingStopped

    common = rrd_kd_args(teacher_dir) + ["optim.epochs=2", "optim.milestones=[1]", "data.train_limit=128"]
    full = Trainer(load_config(None, base_args(fmnist, tmp_path, "whole") + common))
    full.fit()
    cfg = load_config(None, base_args(fmnist, tmp_path, "stopped") + common)
    stopped = Trainer(cfg)
    original = Trainer._main_step

    def signal_after(self: Trainer, batch, images):  # as SIGTERM arriving during the step
        out = original(self, batch, images)
        if self.state.global_step + 1 == stop_after:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(Trainer, "_main_step", signal_after)
    with pytest.raises(TrainingStopped) as stop:
        stopped.fit()
    monkeypatch.setattr(Trainer, "_main_step", original)
    assert stop.value.exit_code == 128 + signal.SIGTERM and "--resume" in str(stop.value)
    assert signal.getsignal(signal.SIGTERM) is not stopped.request_stop  # handlers restored
    resumed = Trainer(load_config(cfg.run_dir / "config.yaml"), resume=True)
    assert (resumed.state.epoch, resumed.state.step_in_epoch) == divmod(stop_after, 4)
    resumed.fit()
    a, b = _weights(tmp_path / "whole"), _weights(tmp_path / "stopped")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(full.unwrapped.objective.terms["rrd"].queue, resumed.unwrapped.objective.terms["rrd"].queue)
    whole = [json.loads(x) for x in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    split = [json.loads(x) for x in (tmp_path / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in whole] == [r["loss"] for r in split]


def test_sigterm_from_outside_checkpoints_and_exits_143(fmnist: Path, tmp_path: Path) -> None:
    import signal

    args = base_args(fmnist, tmp_path, "term") + ["optim.epochs=50", "train.progress=true"]
    proc = subprocess.Popen([sys.executable, str(REPO / "rrd_fast" / "train.py"), *args], cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "RRD_FAST_NO_MALLOC_TUNING": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("epoch 1/50"):
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "SIGTERM" in err and f"--resume {tmp_path / 'term'}" in err
    payload = torch.load(tmp_path / "term" / "resume" / "state.pt", weights_only=True)
    assert payload["epoch"] >= 1 and payload["epoch"] < 50


def test_an_empty_resume_state_is_one_line_and_leaves_no_lock(fmnist: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """torch's EOFError for an empty file has no message: the error still names the file, and the refused
    resume releases the run folder's lock."""
    args = base_args(fmnist, tmp_path, "empty") + ["optim.epochs=1", "data.train_limit=64"]
    assert _cli(args, capsys)[0] == 0
    run = tmp_path / "empty"
    (run / "resume" / "state.pt").write_bytes(b"")
    code, err = _cli(["--resume", str(run), "optim.epochs=2"], capsys)
    assert code == 2 and err.startswith("error:") and "state.pt: resume state unreadable (EOFError)" in err, err
    assert not (run / ".lock").exists()
