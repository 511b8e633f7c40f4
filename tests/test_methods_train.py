"""Every method trains end to end through rrd_fast/train.py on a tiny synthetic CIFAR-100, and a
two-stage method's init stage resumes bit-identically."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipelines.synthetic import write_cifar100
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.cli import run_cli
from rrd_fast.config import load_config
from rrd_fast.methods import list_methods
from rrd_fast.models import create_model
from rrd_fast.train import main as train_main
from rrd_fast.trainer import Trainer

SIDECAR = {"arch": "resnet14", "num_classes": 100, "in_channels": 3, "image_size": 32,
           "normalization": {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}}
# Small memories and short init stages so that every method runs in about a second.
OPTIONS = {"rrd": "{rrd: {queue_size: 64}}", "rrd_kd": "{rrd: {queue_size: 64}}", "crd": "{crd: {nce_k: 32}}",
           "crd_kd": "{crd: {nce_k: 32}}", "ab": "{ab: {init_epochs: 2}}", "ft": "{ft: {init_epochs: 2}}",
           "fsp": "{fsp: {init_epochs: 2}}"}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("cifar"), n_train=256, n_test=64, seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("teacher")
    write_model_checkpoint(out, create_model("resnet14", num_classes=100), SIDECAR)
    return out


def args_for(method: str, data: Path, teacher: Path, out: Path, epochs: int = 3) -> list[str]:
    args = [f"output_dir={out}", "data.format=cifar100", f"data.root={data}", "data.batch_size=32",
            "data.eval_batch_size=64", "student.arch=resnet8", "train.progress=false", f"optim.epochs={epochs}",
            f"method.name={method}", "train.channels_last=false"]
    if method != "vanilla":
        args.append(f"teacher.checkpoint={teacher}")
    if method in OPTIONS:
        args.append(f"method.options={OPTIONS[method]}")
    return args


def records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", list_methods())
def test_method_trains_with_a_finite_decreasing_loss(method: str, cifar: Path, teacher: Path, tmp_path: Path) -> None:
    assert run_cli(lambda: train_main(args_for(method, cifar, teacher, tmp_path))) == 0
    run = next(p for p in tmp_path.iterdir() if p.is_dir())
    history = records(run)
    main = [r for r in history if r["stage"] == "main"]
    assert len(main) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    # CRD's banks hold their random initial rows until every sample has been seen once (epoch 1),
    # and its normaliser Z is fixed on the first batch, so its loss is compared from epoch 2 on.
    first = 1 if method.startswith("crd") else 0
    assert main[-1]["loss"] < main[first]["loss"], [r["loss"] for r in main]
    init = [r for r in history if r["stage"] == "init"]
    if method in ("ab", "fsp"):
        assert len(init) == 2 and init[-1]["loss_init"] < init[0]["loss_init"]
    elif method == "ft":  # the paraphraser's reconstruction at lr 0.01 barely moves in 16 steps; it must be finite
        assert len(init) == 2
    else:
        assert not init


def test_init_stage_resumes_bit_identically(cifar: Path, teacher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    full = Trainer(load_config(None, args_for("ab", cifar, teacher, tmp_path / "a", epochs=1)))
    full.fit()
    cfg = load_config(None, args_for("ab", cifar, teacher, tmp_path / "b", epochs=1))
    stopped = Trainer(cfg)
    original = Trainer._train_epoch

    def stop_in_the_init_stage(self: Trainer, epoch: int, init: bool) -> dict:
        if epoch == 1:
            raise KeyboardInterrupt  # as Ctrl-C after the first init epoch's checkpoint
        return original(self, epoch, init)

    monkeypatch.setattr(Trainer, "_train_epoch", stop_in_the_init_stage)
    with pytest.raises(KeyboardInterrupt):
        stopped.fit()
    monkeypatch.setattr(Trainer, "_train_epoch", original)
    assert [r["stage"] for r in records(cfg.run_dir)] == ["init"]
    resumed = Trainer(load_config(cfg.run_dir / "config.yaml"), resume=True)
    assert resumed.state.epoch == 1
    resumed.fit()
    a, b = load_file(str(full.run_dir / "model.safetensors")), load_file(str(cfg.run_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    conn_a = full.unwrapped.objective.terms["ab"].connector.state_dict()
    conn_b = resumed.unwrapped.objective.terms["ab"].connector.state_dict()
    assert all(torch.equal(conn_a[k], conn_b[k]) for k in conn_a)
    assert [r["stage"] for r in records(cfg.run_dir)] == ["init", "init", "main"]


def test_fsp_with_mismatched_channels_is_one_line(cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    wide = tmp_path / "wrn"
    write_model_checkpoint(wide, create_model("wrn_16_2", num_classes=100), {**SIDECAR, "arch": "wrn_16_2"})
    code = run_cli(lambda: train_main(args_for("fsp", cifar, wide, tmp_path)))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "fsp" in err and "stage1" in err, err
    assert not any(tmp_path.glob("*_fsp_*"))
