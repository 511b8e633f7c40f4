"""`python -m rrd_fast.bench compile`: the projection of a full run adds up from the measured rates, a
variant that failed is named in the report, bad arguments are one line, and on CUDA every mode runs.

No speed is asserted (the benchmark prints it); the CPU measurement itself is not run here because
every compiled variant costs tens of seconds of Inductor compilation.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rrd_fast.bench.__main__ import main
from rrd_fast.bench.compiled import format_report, project
from rrd_fast.cli import run_cli


def _row(kind: str, variant: str, images_per_s: float, batch: int = 64, pass_batch: int | None = None,
         first: float = 0.0) -> dict:
    size = pass_batch or batch
    return {"pair": "resnet32x4:resnet8x4", "batch": batch, "pass_batch": size, "precision": "bf16", "kind": kind,
            "variant": variant, "compiled": variant != "eager", "first_step_s": first,
            "images_per_s": images_per_s, "steps_per_s": images_per_s / size}


ROWS = [
    _row("student", "eager", 200.0), _row("online", "eager", 50.0), _row("cached", "eager", 160.0),
    _row("teacher", "eager", 100.0, pass_batch=256), _row("eval", "eager", 400.0, pass_batch=256),
    _row("student", "default", 250.0, first=30.0), _row("online", "default", 60.0, first=40.0),
    _row("cached", "default", 200.0, first=1.0), _row("teacher", "default", 120.0, pass_batch=256, first=20.0),
    _row("eval", "default", 500.0, pass_batch=256, first=10.0),
]


def test_projection_adds_build_training_evaluation_and_compile() -> None:
    eager, compiled = project(ROWS, epochs=240, train_samples=50000, test_samples=10000, views=32)
    assert (eager["variant"], compiled["variant"]) == ("eager", "default")
    steps = 240 * (50000 // 64)
    assert eager["train_steps"] == compiled["train_steps"] == steps == 187440
    # eager: 32 x 50k teacher passes at 100 img/s, 187440 steps of 64 at 160 img/s, 2.4M eval images at 400 img/s.
    assert eager["cache_build_s"] == pytest.approx(16000.0)
    assert eager["train_cached_s"] == pytest.approx(steps * 64 / 160.0)
    assert eager["eval_s"] == pytest.approx(6000.0)
    assert eager["compile_s"] == 0.0
    assert eager["cached_total_s"] == pytest.approx(16000.0 + 74976.0 + 6000.0)
    assert eager["online_total_s"] == pytest.approx(steps * 64 / 50.0 + 6000.0)
    # compiled: the step graph (compiled by the online variant), the build pass and evaluation each compile once.
    assert compiled["compile_s"] == pytest.approx(40.0 + 20.0 + 10.0)
    assert compiled["cached_total_s"] == pytest.approx(32 * 50000 / 120.0 + steps * 64 / 200.0 + 2.4e6 / 500.0 + 70.0)
    assert compiled["online_total_s"] == pytest.approx(steps * 64 / 60.0 + 2.4e6 / 500.0 + 40.0 + 10.0)


def test_a_variant_missing_a_pass_is_not_projected() -> None:
    rows = [r for r in ROWS if not (r["variant"] == "default" and r["kind"] == "teacher")]
    assert [p["variant"] for p in project(rows, 240, 50000, 10000, 32)] == ["eager"]


def test_report_shows_ratios_and_names_a_failed_variant() -> None:
    failed = {**_row("online", "reduce-overhead", 0.0), "error": "RuntimeError: cudagraphs cannot"}
    for key in ("images_per_s", "steps_per_s", "first_step_s"):
        failed.pop(key)
    rows = ROWS + [failed]
    result = {"machine_name": "x86_64 2 cores", "device": "cpu", "modes": ["default", "reduce-overhead"], "threads": 1,
              "load_before": None, "load_after": None, "speed": rows, "train_samples": 50000, "test_samples": 10000,
              "views": 32, "projection": project(rows, 240, 50000, 10000, 32)}
    report = format_report(result)
    online = next(line for line in report.splitlines() if "| online |" in line)
    assert "| 50.0 | 60.0 | 1.20 | 40.0 | failed |" in online and online.endswith("| 0.25 |")
    assert "failed: resnet32x4:resnet8x4 b64 bf16 online reduce-overhead: RuntimeError: cudagraphs cannot" in report
    assert "| 256 (teacher pass) | bf16 | teacher | 100.0 | 120.0 | 1.20 | 20.0 |" in report
    assert "total, cached teacher" in report


@pytest.mark.parametrize("args,needle", [
    (["--modes", "reduce-overhead"], "need --device cuda"),
    (["--rounds", "0"], "--rounds"),
    (["--batch-sizes", "0"], "--batch-sizes"),
    (["--models", "resnet8"], "--models"),
])
def test_bad_arguments_are_one_line_errors(args: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(lambda: main(["compile", *args])) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_without_a_gpu_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(lambda: main(["compile", "--device", "cuda"])) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA device" in err and len(err.splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bench_runs_every_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "compile.json"
    assert main(["compile", "--device", "cuda", "--models", "resnet8:resnet8", "--batch-sizes", "16", "--precisions",
                 "bf16", "--modes", "default", "reduce-overhead", "--rounds", "1", "--steps", "2", "--project",
                 "--epochs", "2", "--train-samples", "256", "--test-samples", "64", "--views", "2",
                 "--trajectory-steps", "2", "--no-start-up", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert not [r for r in result["speed"] if "error" in r]
    assert {(r["kind"], r["variant"]) for r in result["speed"]} == {
        (k, v) for k in ("student", "online", "cached", "teacher", "eval") for v in ("eager", "default", "reduce-overhead")}
    assert all(r["steps_per_s"] > 0 for r in result["speed"])
    assert [p["variant"] for p in result["projection"]] == ["eager", "default", "reduce-overhead"]
    assert "steps/s" in capsys.readouterr().out
