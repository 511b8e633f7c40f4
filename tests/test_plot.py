"""Training curves (rrd_fast.plot) and TensorBoard logging (rrd_fast.tracking) on real tiny runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from PIL import Image

from pipelines.synthetic import write_fashion_mnist
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.cli import run_cli
from rrd_fast.config import ConfigError, load_config
from rrd_fast.models import create_model
from rrd_fast.plot import build_figure, main as plot_main, read_run, write_curves
from rrd_fast.trainer import Trainer
from rrd_fast.tracking import config_text, end_tracking, epoch_scalars, log_epoch, make_tracker_kwargs, start_tracking

REPO = Path(__file__).resolve().parent.parent
SIDECAR = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
           "normalization": {"mean": [0.2860], "std": [0.3530]}}


def _args(data: Path, out: Path, name: str) -> list[str]:
    return [f"name={name}", f"output_dir={out}", "data.format=fashion_mnist", f"data.root={data}",
            "data.batch_size=32", "data.eval_batch_size=32", "student.arch=resnet8", "train.progress=false"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two finished tiny runs: a student alone (2 epochs) and FT (1 init-stage epoch, then 2)."""
    root = tmp_path_factory.mktemp("plot")
    data = write_fashion_mnist(root / "fmnist", n_train=64, n_test=32, gz=True, seed=0)
    torch.manual_seed(7)
    write_model_checkpoint(root / "teacher", create_model("resnet8", num_classes=10, in_channels=1), SIDECAR)
    extra = {"student": ["method.name=vanilla", "optim.epochs=2"],
             "ft": [f"teacher.checkpoint={root / 'teacher'}", "method.name=ft",
                    "method.options={ft: {init_epochs: 1}}", "optim.epochs=2"]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batches this small run faster on one thread than on two shared cores
    try:
        for name, more in extra.items():
            Trainer(load_config(None, _args(data, root / "runs", name) + more)).fit()
    finally:
        torch.set_num_threads(threads)
    return {name: root / "runs" / name for name in extra}


def _records(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _lines(fig) -> dict[str, tuple[list[float], list[float], object]]:  # noqa: ANN001 - a matplotlib Figure
    out = {}
    for ax in fig.axes:
        for line in ax.get_lines():
            if line.get_gid():
                out[line.get_gid()] = (list(line.get_xdata()), list(line.get_ydata()), ax)
    return out


def test_write_curves_writes_a_png_for_a_finished_run(runs: dict[str, Path]) -> None:
    path = write_curves(runs["ft"])
    assert path == runs["ft"] / "curves.png"
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 800 and img.height > 400
        assert img.convert("L").getextrema()[0] < 128  # something dark is drawn: not a blank canvas


def test_plotted_lines_are_the_records_of_metrics_jsonl(runs: dict[str, Path]) -> None:
    fig = build_figure([read_run(runs["student"]), read_run(runs["ft"])])
    lines = _lines(fig)
    expected = set()
    for name, run in runs.items():
        records = _records(run)
        for stage in ("init", "main"):
            staged = [r for r in records if r["stage"] == stage]
            keys = {k for r in staged for k in r if k.startswith("loss_") or k in ("top1", "train_top1")}
            for key in keys:
                gid = f"{name}|{stage}|{key}"
                expected.add(gid)
                xs, ys, ax = lines[gid]
                assert xs == [r["epoch"] for r in staged if key in r], gid
                assert ys == [r[key] for r in staged if key in r], gid
                assert ax.get_xlabel() == ("init epoch" if stage == "init" else "epoch"), gid
        best = max(r["top1"] for r in records if "top1" in r)
        expected.add(f"{name}|main|best_top1")
        assert lines[f"{name}|main|best_top1"][1] == [best]
    assert set(lines) == expected
    assert "ft|init|loss_init" in expected and "ft|main|loss_ft" in expected and "student|main|loss_ce" in expected
    init_ax = lines["ft|init|loss_init"][2]
    main_ax = lines["ft|main|loss_ft"][2]
    assert init_ax.get_facecolor() != main_ax.get_facecolor() and "init stage" in init_ax.get_title()
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend == ["student (vanilla)", "ft"]  # folder and method; a folder named after its method once
    top1_lines = {gid for gid, (_, _, ax) in lines.items() if ax is lines["ft|main|top1"][2]}
    assert {g for g in expected if g.endswith(("|top1", "|train_top1", "|best_top1"))} == top1_lines


def test_log_scale_only_when_a_panel_spans_decades(tmp_path: Path) -> None:
    run = tmp_path / "crafted"
    run.mkdir()
    rows = [{"stage": "main", "epoch": e, "top1": 10.0 * e, "loss_ce": 10.0 ** (1 - e), "loss_kd": 1.0 + 0.1 * e}
            for e in (1, 2, 3)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    lines = _lines(build_figure([read_run(run)]))
    assert lines["crafted|main|loss_ce"][2].get_yscale() == "log"
    assert lines["crafted|main|loss_kd"][2].get_yscale() == "linear"
    assert lines["crafted|main|top1"][2].get_yscale() == "linear"


def test_cli_plots_several_runs_into_one_file(runs: dict[str, Path], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "both.png"
    assert run_cli(lambda: plot_main([str(runs["student"]), str(runs["ft"]), "--out", str(out)])) == 0
    assert capsys.readouterr().out.strip() == str(out)
    with Image.open(out) as img:
        assert img.format == "PNG"


def test_run_without_metrics_is_a_one_line_error(tmp_path: Path) -> None:
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    proc = subprocess.run([sys.executable, "-m", "rrd_fast.plot", str(empty)], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ")
    assert str(empty / "metrics.jsonl") in proc.stderr
    assert not (empty / "curves.png").exists()


def test_malformed_metrics_line_names_the_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"stage": "main", "epoch": 1, "top1": 5.0}\n{"epoch": 2, top1\n')
    assert run_cli(lambda: plot_main([str(tmp_path)])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{tmp_path / 'metrics.jsonl'}:2:" in err


# ---------------------------------------------------------------- TensorBoard


def _cfg(tmp_path: Path, log_with: str):  # noqa: ANN202 - a RunConfig
    cfg = load_config(None, [f"output_dir={tmp_path}", "name=tb"])
    cfg.train.log_with = log_with  # the field the trainer's config adds; set directly so this runs either way
    return cfg


def test_tensorboard_event_file_holds_the_logged_epochs(runs: dict[str, Path], tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = _cfg(tmp_path, "tensorboard")
    kwargs = make_tracker_kwargs(cfg)
    assert kwargs == {"log_with": "tensorboard", "project_dir": str(tmp_path / "tb")}
    accelerator = Accelerator(**kwargs)
    start_tracking(accelerator, cfg)
    records = _records(runs["ft"])
    for record in records:
        log_epoch(accelerator, record)
    end_tracking(accelerator)
    logdir = tmp_path / "tb" / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*"))
    events = EventAccumulator(str(logdir))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    expected: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        for tag, value in epoch_scalars(record).items():
            expected.setdefault(tag, []).append((record["epoch"], value))
    assert {"init/loss_init", "loss/ce", "loss/ft", "loss/total", "top1/eval", "top1/train", "train/lr"} <= tags
    (config,) = events.Tensors("config/text_summary")
    assert config.tensor_proto.string_val[0].decode() == config_text(cfg) and "    name: tb" in config_text(cfg)
    assert [p.name for p in logdir.iterdir() if p.is_dir()] == []  # no hparams side folders posing as runs
    assert tags == set(expected)
    for tag, points in expected.items():
        got = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in got] == [s for s, _ in points], tag
        for (_, v), (_, want) in zip(got, points):
            assert math.isclose(v, want, rel_tol=1e-6, abs_tol=1e-9), (tag, v, want)


def test_no_tracking_by_default_and_missing_package_names_the_extra(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    assert make_tracker_kwargs(_cfg(tmp_path, "none")) == {}
    with pytest.raises(ConfigError, match="train.log_with"):
        make_tracker_kwargs(_cfg(tmp_path, "wandb"))
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # what an environment without the package looks like
    with pytest.raises(ConfigError) as info:
        make_tracker_kwargs(_cfg(tmp_path, "tensorboard"))
    assert "rrd-fast[tensorboard]" in str(info.value) and "\n" not in str(info.value)
