"""`python -m rrd_fast.bench train` runs end to end on a tiny configuration and reports consistent figures.

No speed is asserted here (that is what the benchmark prints); only that every variant ran,
the ratios are computed from the medians they claim, and bad input is refused by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rrd_fast.bench.__main__ import main
from rrd_fast.bench.train import format_report
from rrd_fast.cli import run_cli


@pytest.fixture
def keep_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_train_bench_tiny_run_writes_consistent_json(tmp_path: Path, capsys: pytest.CaptureFixture[str], keep_threads) -> None:
    out = tmp_path / "bench.json"
    # One thread: bf16 is emulated on CPUs without AVX-512 BF16, and slow enough already.
    rc = main(["train", "--quick", "--models", "resnet8:resnet8", "--batch-sizes", "4", "8", "--precisions", "fp32", "bf16",
               "--images", "64", "--loader-workers", "0", "--threads", "1", "--no-levers", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "(a) student" in printed and "(d) per-sample" in printed
    assert "targets" not in printed  # developers' notes: only with --targets
    result = json.loads(out.read_text())
    assert set(result["targets"]) >= {"pipeline_img_s_met", "c_over_d_met", "share_met"}
    assert "targets: (c) >= 150,000 img/s" in format_report(result, show_targets=True)
    assert len(result["train"]) == 4 and len(result["pipeline"]) == 2
    rounds = result["config"]["effort"]["rounds"]
    for row in result["train"]:
        assert len(row["a_samples"]) == len(row["b_samples"]) == rounds
        assert all(math.isfinite(x) and x > 0 for x in row["a_samples"] + row["b_samples"])
        assert row["b_over_a"] == pytest.approx(row["b_img_s"] / row["a_img_s"])
        c = next(p for p in result["pipeline"] if p["batch_size"] == row["batch_size"])
        assert row["pipeline_share"] == pytest.approx(row["b_img_s"] / c["c_img_s"])
    for p in result["pipeline"]:
        assert p["c_over_d"] == pytest.approx(p["c_img_s"] / p["d_img_s"])
        assert len(p["d_samples"]) == rounds
    assert {(r["batch_size"], r["precision"]) for r in result["train"]} == {(4, "fp32"), (4, "bf16"), (8, "fp32"), (8, "bf16")}
    assert result["machine"]["torch_threads"] == 1


def test_probe_reports_one_figure(capsys: pytest.CaptureFixture[str], keep_threads) -> None:
    assert main(["probe", "--student", "resnet8", "--batch-size", "8", "--rounds", "2", "--steps", "1", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(report["samples"]) == 2 and report["images_per_s"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--models", "resnet8"], "--models"),
    (["--models", "resnet8:resnet9000"], "resnet9000"),
    (["--precisions", "fp16"], "--precisions"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--images", "10", "--batch-sizes", "64"], "--images"),
])
def test_bad_arguments_are_one_line_errors(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(lambda: main(["train", "--no-levers", *args])) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
