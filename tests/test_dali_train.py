"""Training through DALI matches training through the torch pipeline, and the benchmark
command runs and writes the `auto` table (its lookup: tests/test_auto_backend.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import pytest
import torch
from safetensors.torch import load_file

from pipelines.auto import empty_table, machine_description, machine_key, merge_entries
from pipelines.synthetic import write_cifar100
from rrd_fast.bench.__main__ import main as bench_main
from rrd_fast.config import load_config
from rrd_fast.data import IMAGE_DTYPES
from rrd_fast.trainer import Trainer


def _train(data: Path, out: Path, pipeline: str, *overrides: str,
           name: str = "") -> tuple[list[dict], dict[str, torch.Tensor]]:
    name = name or pipeline
    cfg = load_config(None, [
        f"name={name}", f"output_dir={out}", "seed=3", "data.format=cifar100", f"data.root={data}",
        f"data.pipeline={pipeline}", "data.batch_size=32", "data.eval_batch_size=50", "data.train_limit=32",
        "data.eval_limit=50", "student.arch=resnet8", "method.name=vanilla",  # train.mixed_precision defaults to "no" (fp32)
        "train.progress=false", "train.channels_last=false", "train.eval_every=4", "train.save_every=4",
        "optim.epochs=4", *overrides,
    ])
    trainer = Trainer(cfg)
    assert trainer.data.backend == pipeline
    trainer.fit()
    history = [json.loads(ln) for ln in (out / name / "metrics.jsonl").read_text().splitlines()]
    return history, load_file(str(out / name / "model.safetensors"))


def test_dali_training_matches_torch_loss_trajectory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """resnet8 on CIFAR-100 files, fp32, same seed, one step per epoch (so metrics.jsonl is the
    per-step loss trajectory): same losses, accuracies and final weights with either pipeline."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")  # deterministic kernels, also on GPU machines
    data = write_cifar100(tmp_path / "data", n_train=40, n_test=50, seed=0)
    torch_hist, torch_w = _train(data, tmp_path / "runs", "torch")
    dali_hist, dali_w = _train(data, tmp_path / "runs", "dali")
    assert len(torch_hist) == len(dali_hist) == 4
    for a, b in zip(torch_hist, dali_hist):
        assert abs(a["loss"] - b["loss"]) <= 1e-5, (a["loss"], b["loss"])
        assert a["train_top1"] == b["train_top1"] and a.get("top1") == b.get("top1")
    assert "top1" in dali_hist[-1]
    assert torch_hist[0]["loss"] != torch_hist[-1]["loss"]  # it did train
    assert torch_w.keys() == dali_w.keys()
    for name in torch_w:
        assert (torch_w[name].float() - dali_w[name].float()).abs().max().item() <= 1e-4, name


@pytest.fixture
def fresh_accelerator_state() -> Iterator[None]:
    """Accelerate fixes one mixed-precision setting per process (the CLI builds one Trainer per
    process); tests that change it start and end with that process-wide state cleared."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


@pytest.mark.parametrize("pipeline", ["torch", "dali"])
def test_bf16_runs_get_bf16_batches_and_the_same_result(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        fresh_accelerator_state: None, pipeline: str) -> None:
    """train.mixed_precision=bf16 makes the pipelines hand over bf16 batches; autocast would round
    fp32 batches to bf16 at the first convolution, so losses and weights are bit for bit those of
    the same run fed fp32 batches."""
    monkeypatch.setenv("ACCELERATE_USE_CPU", "true")
    data = write_cifar100(tmp_path / "data", n_train=40, n_test=50, seed=0)
    cfg = load_config(None, [f"data.root={data}", "data.format=cifar100", f"data.pipeline={pipeline}",
                             "data.batch_size=32", "train.mixed_precision=bf16", "train.progress=false",
                             f"output_dir={tmp_path / 'probe'}"])
    trainer = Trainer(cfg)
    assert trainer.data.train.dtype == trainer.data.eval.dtype == torch.bfloat16
    assert next(iter(trainer.data.train.epoch(0))).images.dtype == torch.bfloat16
    bf16_hist, bf16_w = _train(data, tmp_path / "runs", pipeline, "train.mixed_precision=bf16", name="bf16")
    monkeypatch.setitem(IMAGE_DTYPES, "bf16", torch.float32)  # the same run, fed fp32 batches
    fp32_hist, fp32_w = _train(data, tmp_path / "runs", pipeline, "train.mixed_precision=bf16", name="fp32")
    assert [r["loss"] for r in bf16_hist] == [r["loss"] for r in fp32_hist]
    assert [r.get("top1") for r in bf16_hist] == [r.get("top1") for r in fp32_hist]
    assert all(torch.equal(bf16_w[k], fp32_w[k]) for k in bf16_w)


# ---------------------------------------------------------------------------------------
# auto
# ---------------------------------------------------------------------------------------

def _table(path: Path, entries: dict) -> Path:
    """A table with `entries` in this machine's row (tests/test_auto_backend.py tests the lookup itself)."""
    path.write_text(json.dumps(merge_entries(empty_table(), machine_description("cpu"), entries)))
    return path


def test_bench_runs_and_writes_the_auto_table(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A miniature run of `python -m rrd_fast.bench pipelines` (figures printed, not asserted)."""
    table = tmp_path / "auto.json"
    _table(table, {"files/cuda": {"backend": "dali", "img_s": {"dali": 1, "torch": 0}}})
    rc = bench_main(["pipelines", "--repeats", "1", "--batches", "1", "--batch", "32", "--array-images", "192",
                     "--jpeg-images", "100", "--workers", "1", "--data-dir", str(tmp_path / "data"),
                     "--dali-lanes", "5", "--dali-sequence", "--half", "bf16", "--json", str(tmp_path / "medians.json"),
                     "--write-auto-table", str(table)])
    assert rc == 0
    out = capsys.readouterr().out
    for label in ("torch ArrayPipeline", "per-sample DataLoader", "per-sample Pillow DataLoader", "ratio dali / torch",
                  "), default", "DALI (5 lanes x "):
        assert label in out
    assert "target arrays/dali" not in out  # developers' notes: only with --targets
    machines = json.loads(table.read_text())["machines"]
    assert list(machines) == [machine_key(machine_description("cpu"))]  # the CPU rows are this machine's
    entries = machines[machine_key(machine_description("cpu"))]["entries"]
    assert set(entries) == {"array/cpu", "files/cpu", "files/cuda"}  # other device types kept
    for key in ("array/cpu", "files/cpu"):
        assert set(entries[key]["img_s"]) == {"torch", "dali"}
    # DALI's entry is its best lane count.
    medians = json.loads((tmp_path / "medians.json").read_text())
    arrays = medians["medians"]["arrays"]
    assert set(arrays) == {"torch", "dali", "dali_5", "dali_seq", "torch_bf16", "dali_bf16", "dataloader"}
    assert set(medians["medians"]["jpeg"]) == {"torch", "dali", "torch_bf16", "dali_bf16", "dataloader"}
    # CPU cost per image for the contenders whose work runs in this process (not the DataLoader's workers).
    cpu = medians["cpu_us_per_img"]["arrays"]
    assert set(cpu) == {"torch", "dali", "dali_5", "dali_seq", "torch_bf16", "dali_bf16"}
    assert all(v > 0 for v in cpu.values())
    # The table compares the backends as fp32 runs use them; half-precision contenders are for reading only.
    assert entries["array/cpu"]["img_s"]["dali"] == round(max(arrays["dali"], arrays["dali_5"]))
    with pytest.raises(SystemExit):
        bench_main(["pipelines", "--half", "fp8"])
    assert "unknown half precision 'fp8'" in capsys.readouterr().err


def test_bench_prints_targets_only_when_asked(capsys: pytest.CaptureFixture) -> None:
    from rrd_fast.bench.pipelines import Contender, Timing, report

    contenders = [Contender("arrays", "dali", "DALI", lambda epoch: iter(()))]
    results = {"arrays": {"dali": [Timing(1000.0, 1.0), Timing(3000.0, 1.0), Timing(2000.0, 1.0)]}}
    medians, _ = report(results, contenders, torch.device("cpu"))
    assert medians == {"arrays": {"dali": 2000.0}} and "target" not in capsys.readouterr().out
    report(results, contenders, torch.device("cpu"), show_targets=True)
    assert "target arrays/dali on cpu: 2,000 img/s vs 80,000: MISSED" in capsys.readouterr().out


@pytest.mark.gpu
def test_gpu_training_through_dali(tmp_path: Path) -> None:
    """On a GPU the DALI pipeline's batches are born on the device and training runs end to end."""
    data = write_cifar100(tmp_path / "data", n_train=40, n_test=50, seed=0)
    history, weights = _train(data, tmp_path / "runs", "dali")
    assert len(history) == 4 and all(torch.isfinite(torch.tensor(r["loss"])) for r in history)
    assert "top1" in history[-1] and weights
