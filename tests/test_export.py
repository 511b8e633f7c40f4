"""Export and deployment benchmark, for real: ONNX Runtime sessions, AOTInductor packages, eager.

One tiny student (resnet8, 1×28×28, 10 classes, briefly trained on a synthetic
Fashion-MNIST written in the real IDX layout) is benchmarked once per module; that run
exports every CPU artifact, and the other tests load those artifacts back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from export import ExportError, export_checkpoint, get_backend, list_backends, load_artifact
from export.bench import main as bench_main
from export.cli import run_cli
from export.data import DataSource, ImageSet, data_source
from export.report import COLUMNS, cell, pareto_front, render_png, write_reports
from export.timing import measure
from pipelines.formats import get_format, read_split
from pipelines.synthetic import write_fashion_mnist, write_tiny_imagenet
from rrd_fast.checkpoint import read_model_checkpoint, write_model_checkpoint
from rrd_fast.models import create_model

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = 0.2860, 0.3530
BATCH_SIZES = "1,4"


def _train_briefly(data: Path) -> torch.nn.Module:
    """A few optimiser steps plus exact BatchNorm statistics: predictions that differ per image."""
    split = read_split("fashion_mnist", data, "train")
    x = (torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255 - MEAN) / STD
    y = torch.from_numpy(split.labels)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=10, in_channels=1)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        g = torch.Generator().manual_seed(0)
        for _ in range(15):
            i = torch.randperm(len(y), generator=g)[:32]
            loss = torch.nn.functional.cross_entropy(model(x[i]), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        with torch.no_grad():
            model(x)
    finally:
        torch.set_num_threads(threads)
    return model.eval()


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = write_fashion_mnist(root / "fmnist", n_train=96, n_test=40)
    model = _train_briefly(data)
    write_model_checkpoint(root / "student", model, {
        "arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
        "normalization": {"mean": [MEAN], "std": [STD]},
        "dataset": {"format": "fashion_mnist", "root": str(data)},
        "method": {"name": "kd", "gamma": 0.1, "alpha": 0.9, "beta": 0.0, "options": {}},
        "teacher": None, "top1_final": None, "top1_best": None,
    })
    return root / "student"


@pytest.fixture(scope="module")
def bench(student: Path) -> Path:
    """The real benchmark CLI over eager, ONNX Runtime and AOTInductor (it exports all three)."""
    out = student.parent / "bench"
    code = run_cli(lambda: bench_main([
        str(student), "--backends", "eager,onnxruntime,aotinductor", "--batch-sizes", BATCH_SIZES,
        "--warmup", "1", "--iters", "3", "--eval-batch-size", "16", "--out", str(out),
    ]))
    assert code == 0
    return out


def _artifact_dir(bench: Path, backend: str, precision: str = "fp32") -> Path:
    found = [p.parent for p in (bench / "artifacts").glob(f"*/{backend}-{precision}-cpu/artifact.json")]
    assert len(found) == 1, found
    return found[0]


def _eval_images(student: Path) -> tuple[np.ndarray, np.ndarray]:
    """The evaluation split decoded and normalised independently of export's data module."""
    meta = json.loads((student / "model.json").read_text())
    split = read_split("fashion_mnist", meta["dataset"]["root"], "test")
    x = (split.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0 - MEAN) / STD
    return np.ascontiguousarray(x, dtype=np.float32), split.labels


# -- registry -------------------------------------------------------------------------------

def test_registry_has_every_backend_and_aliases() -> None:
    assert list_backends() == ["aotinductor", "eager", "onnxruntime", "tensorrt"]
    assert get_backend("onnx").name == "onnxruntime" and get_backend("trt").name == "tensorrt"
    with pytest.raises(ExportError, match="unknown backend 'onnxrt'.*did you mean 'onnxruntime'"):
        get_backend("onnxrt")


# -- artifacts reproduce the torch model ---------------------------------------------------

@pytest.mark.parametrize("backend", ["onnxruntime", "aotinductor", "eager"])
def test_fp32_artifact_reproduces_torch_logits(bench: Path, student: Path, backend: str) -> None:
    model, meta = read_model_checkpoint(student)
    artifact = load_artifact(_artifact_dir(bench, backend), expect_source_sha=meta["sha256"])
    x, _ = _eval_images(student)
    for n in (1, 3, 17):  # any batch size: the batch axis is dynamic
        images = torch.from_numpy(x[:n])
        with torch.no_grad():
            expected = model(images)
        got = artifact(images)
        assert got.dtype == torch.float32 and got.shape == expected.shape
        assert (got - expected).abs().max().item() <= 1e-4


def test_eager_bf16_within_stated_tolerance(student: Path, tmp_path: Path) -> None:
    """bf16 autocast: max |logit difference| at most 2% of the largest logit, same top-1 on >= 95%."""
    model, _ = read_model_checkpoint(student)
    export_checkpoint(student, "eager", tmp_path / "bf16", precision="bf16", batch_sizes=(4,))
    artifact = load_artifact(tmp_path / "bf16")
    x = torch.from_numpy(_eval_images(student)[0])
    with torch.no_grad():
        expected = model(x)
    got = artifact(x)
    assert (got - expected).abs().max().item() <= 0.02 * expected.abs().max().item()
    assert (got.argmax(1) == expected.argmax(1)).double().mean().item() >= 0.95


def test_onnxruntime_int8_within_stated_tolerance(student: Path, tmp_path: Path) -> None:
    """Static int8 (QDQ, calibrated on the training split).

    Stated tolerance: mean |Δlogit| at most 10% of the mean |logit|, same top-1 on >= 90% of images
    (single outlier logits can move further, so the maximum is not bounded).
    """
    model, meta = read_model_checkpoint(student)
    sidecar = export_checkpoint(student, "onnxruntime", tmp_path / "int8", precision="int8", batch_sizes=(4,),
                                calib_samples=64)
    assert sidecar["calibration"]["split"] == "train" and sidecar["calibration"]["samples"] == 64
    artifact = load_artifact(tmp_path / "int8")
    x = torch.from_numpy(_eval_images(student)[0])
    with torch.no_grad():
        expected = model(x)
    got = artifact(x)
    assert (got - expected).abs().mean().item() <= 0.10 * expected.abs().mean().item()
    assert (got.argmax(1) == expected.argmax(1)).double().mean().item() >= 0.90
    import onnx

    ops = {node.op_type for node in onnx.load(str(tmp_path / "int8" / "model.onnx")).graph.node}
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops


# -- the benchmark's numbers ---------------------------------------------------------------

def test_bench_accuracy_equals_independent_top1(bench: Path, student: Path) -> None:
    """Top-1 recomputed without export's code: raw ORT session, raw AOTI package, the torch model."""
    import onnxruntime as ort

    report = json.loads((bench / "bench.json").read_text())
    x, labels = _eval_images(student)
    model, _ = read_model_checkpoint(student)
    with torch.no_grad():
        torch_pred = model(torch.from_numpy(x)).argmax(1).numpy()
    session = ort.InferenceSession(str(_artifact_dir(bench, "onnxruntime") / "model.onnx"), providers=["CPUExecutionProvider"])
    ort_pred = session.run(None, {session.get_inputs()[0].name: x})[0].argmax(1)
    package = torch._inductor.aoti_load_package(str(_artifact_dir(bench, "aotinductor") / "model.pt2"))
    aoti_pred = package(torch.from_numpy(x)).argmax(1).numpy()
    expected = {name: 100.0 * float((pred == labels).mean())
                for name, pred in (("eager", torch_pred), ("onnxruntime", ort_pred), ("aotinductor", aoti_pred))}
    assert 15.0 < expected["eager"] < 100.0  # a student whose predictions differ per image
    rows = report["results"]
    assert {(r["backend"], r["batch_size"]) for r in rows} == {(b, s) for b in expected for s in (1, 4)}
    for row in rows:
        assert row["top1"] == pytest.approx(expected[row["backend"]], abs=1e-9)
        assert row["torch_top1"] == pytest.approx(expected["eager"], abs=1e-9)
        assert row["n_eval"] == len(labels)
        assert row["max_abs_logit_diff"] <= 1e-4 and row["top1_agreement"] == 100.0
        lat = row["latency"]
        assert lat["iterations"] == 3 and lat["warmup"] == 1 and lat["p50_ms"] <= lat["p90_ms"] <= lat["p99_ms"]


def _md_rows(md: str) -> list[list[str]]:
    lines = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| run ")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines]


def test_table_and_png_numbers_come_from_json(bench: Path, tmp_path: Path) -> None:
    report = json.loads((bench / "bench.json").read_text())
    assert (bench / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _md_rows((bench / "bench.md").read_text())
    assert len(rows) == len(report["results"])
    for md_row, row in zip(rows, report["results"]):
        assert md_row == [cell(row, key) for _, key in COLUMNS]
        assert md_row[5] == f"{row['latency']['p50_ms']:.3f}" and md_row[11] == f"{row['top1']:.2f}"
    # Edit the JSON: the re-rendered table and plot follow it.
    report["results"][0]["top1"] = 12.345
    report["results"][0]["latency"]["p50_ms"] = 9.8765
    edited = tmp_path / "bench.json"
    edited.write_text(json.dumps(report))
    md_path, png_path = write_reports(edited)
    first = _md_rows(md_path.read_text())[0]
    assert first[5] == "9.877" and first[11] == "12.35"
    assert png_path.stat().st_size > 10_000
    fig = render_png(report, tmp_path / "again.png")
    plotted = set()
    for ax in fig.axes:
        for coll in ax.collections:
            plotted |= {(round(float(a), 6), round(float(b), 6)) for a, b in coll.get_offsets()}
        labels = {t.get_text() for t in ax.texts}
        assert labels and all(re.fullmatch(r"student \(kd\) (eager|onnxruntime|aotinductor)( \[noisy, p90/p50 [0-9.]+\])?", t)
                              for t in labels)
    expected = {(round(r["latency"]["p50_ms"], 6), round(r["top1"], 6)) for r in report["results"]}
    assert plotted == expected


def test_method_labels_name_the_kd_term_when_weighted_in() -> None:
    from export.bench import method_label

    assert method_label({"name": "rrd", "alpha": 1.0, "beta": 1.0}) == "rrd+kd"
    assert method_label({"name": "rrd", "alpha": 0.0, "beta": 1.0}) == "rrd"
    assert method_label({"name": "kd", "alpha": 0.9}) == "kd"
    assert method_label({"name": "vanilla", "alpha": 0.0}) == "vanilla"
    assert method_label(None) == method_label({"alpha": 1}) == "unknown"


def test_pareto_front() -> None:
    # (latency, accuracy): 1 is slower and worse than 0; 3 ties 2 on accuracy but is slower.
    points = [(1.0, 70.0), (2.0, 60.0), (3.0, 80.0), (4.0, 80.0), (0.5, 50.0)]
    assert pareto_front(points) == [4, 0, 2]


def test_bench_reuses_matching_artifacts(bench: Path, student: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(bench / "artifacts", tmp_path / "artifacts")
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*.onnx")}
    code = run_cli(lambda: bench_main([str(student), "--backends", "onnxruntime", "--batch-sizes", "1",
                                       "--warmup", "0", "--iters", "1", "--eval-limit", "8", "--out", str(tmp_path)]))
    assert code == 0 and "exported" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "artifacts").rglob("*.onnx")} == before
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [r["n_eval"] for r in report["results"]] == [8]


def test_timing_excludes_warmup() -> None:
    calls: list[int] = []
    lat = measure(lambda x: calls.append(1), torch.zeros(3, 1), warmup=4, iters=6)
    assert len(calls) == 10 and lat.iterations == 6 and lat.warmup == 4 and lat.batch_size == 3
    assert lat.timer == "perf_counter" and lat.throughput_ips > 0


# -- refusing bad artifacts and bad input ---------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_corrupted_onnx_file_is_refused(bench: Path, tmp_path: Path) -> None:
    folder = _copy(_artifact_dir(bench, "onnxruntime"), tmp_path / "ort")
    data = bytearray((folder / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (folder / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.onnx: sha256 .* does not match artifact\.json"):
        load_artifact(folder)


def test_truncated_aoti_package_is_refused(bench: Path, tmp_path: Path) -> None:
    folder = _copy(_artifact_dir(bench, "aotinductor"), tmp_path / "aoti")
    pkg = folder / "model.pt2"
    pkg.write_bytes(pkg.read_bytes()[:1000])
    with pytest.raises(ExportError, match=r"model\.pt2: sha256"):
        load_artifact(folder)


def test_unreadable_file_with_matching_sidecar_gives_one_line(bench: Path, tmp_path: Path) -> None:
    """Someone rewrote the sidecar's sha for a broken file: the runtime's own error becomes one line."""
    from rrd_fast.checkpoint import sha256_file

    folder = _copy(_artifact_dir(bench, "onnxruntime"), tmp_path / "ort")
    (folder / "model.onnx").write_bytes(b"not an onnx model")
    meta = json.loads((folder / "artifact.json").read_text())
    meta["files"][0]["sha256"] = sha256_file(folder / "model.onnx")
    (folder / "artifact.json").write_text(json.dumps(meta))
    with pytest.raises(ExportError, match="onnxruntime cannot load this artifact") as info:
        load_artifact(folder)
    assert "\n" not in str(info.value)


def test_source_checkpoint_mismatch_is_refused(bench: Path) -> None:
    with pytest.raises(ExportError, match=r"exported from checkpoint sha256 .*\(re-export it\)"):
        load_artifact(_artifact_dir(bench, "onnxruntime"), expect_source_sha="0" * 64)


def test_sidecar_problems_are_one_line(bench: Path, tmp_path: Path) -> None:
    folder = _copy(_artifact_dir(bench, "eager"), tmp_path / "eager")
    (folder / "artifact.json").write_text("{not json")
    with pytest.raises(ExportError, match=r"artifact\.json: not valid JSON"):
        load_artifact(folder)
    (folder / "artifact.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match=r"artifact\.json: expected a JSON object, found list"):
        load_artifact(folder)
    (folder / "artifact.json").unlink()
    with pytest.raises(ExportError, match="artifact sidecar not found"):
        load_artifact(folder)


@pytest.mark.parametrize("backend", ["onnxruntime", "aotinductor"])
def test_wrong_input_size_is_refused(bench: Path, backend: str) -> None:
    artifact = load_artifact(_artifact_dir(bench, backend))
    for shape in [(2, 1, 32, 32), (2, 3, 28, 28), (1, 28, 28)]:
        with pytest.raises(ExportError, match=r"does not fit this artifact, which takes N×1×28×28"):
            artifact(torch.zeros(shape))


def test_bench_evaluates_a_file_layout_dataset(tmp_path: Path) -> None:
    """Tiny-ImageNet's JPEG folders: export's images equal a plain Pillow decode, and the bench's top-1 is recomputed."""
    from PIL import Image

    fmt = get_format("tiny_imagenet")
    root = write_tiny_imagenet(tmp_path / "tiny", n_classes=2, per_class_train=2, per_class_val=3)
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=2, in_channels=3).eval()  # the data's 2 wnids, not the format's 200
    write_model_checkpoint(tmp_path / "student", model, {
        "arch": "resnet8", "num_classes": 2, "in_channels": 3, "image_size": 64,
        "normalization": {"mean": list(fmt.mean), "std": list(fmt.std)},
        "dataset": {"format": "tiny_imagenet", "root": str(root)},
        "method": {"name": "vanilla", "gamma": 1.0, "alpha": 0.0, "beta": 0.0, "options": {}},
        "teacher": None, "top1_final": None, "top1_best": None,
    })
    split = read_split("tiny_imagenet", root, fmt.eval_split)
    pixels = np.stack([np.asarray(Image.open(path).convert("RGB")) for path in split.paths])  # 64×64: the eval view
    mean, std = torch.tensor(fmt.mean).view(1, 3, 1, 1), torch.tensor(fmt.std).view(1, 3, 1, 1)
    x = (torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255 - mean) / std
    meta = json.loads((tmp_path / "student" / "model.json").read_text())
    images = ImageSet(data_source(meta), meta)
    assert len(images) == 6
    torch.testing.assert_close(torch.cat(list(images.batches(4))), x, rtol=0, atol=1e-5)

    out = tmp_path / "bench"
    assert run_cli(lambda: bench_main([str(tmp_path / "student"), "--backends", "eager", "--batch-sizes", "2",
                                       "--warmup", "0", "--iters", "1", "--eval-batch-size", "4", "--out", str(out)])) == 0
    with torch.no_grad():
        expected = 100.0 * float((model(x).argmax(1).numpy() == split.labels).mean())
    (row,) = json.loads((out / "bench.json").read_text())["results"]
    assert row["n_eval"] == 6 and row["top1"] == pytest.approx(expected, abs=1e-9)


def test_data_config_is_read_as_a_training_config(tmp_path: Path) -> None:
    """`--data CFG` takes a training config as the trainer reads it: defaults filled, typos refused by name."""
    from rrd_fast.config import ConfigError

    cfg = tmp_path / "run.yaml"
    cfg.write_text("student: {arch: resnet8}\ndata: {format: tiny_imagenet, root: /d/tiny, eval_limit: 5}\n")
    assert data_source({}, cfg) == DataSource("tiny_imagenet", "/d/tiny", 5)
    assert data_source({}, cfg, eval_limit=0) == DataSource("tiny_imagenet", "/d/tiny", 0)
    cfg.write_text("data: {root: /d/c100}\n")
    assert data_source({}, cfg) == DataSource("cifar100", "/d/c100", 0)
    cfg.write_text("data: {fromat: cifar10}\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.fromat'; did you mean 'data.format'"):
        data_source({}, cfg)


# -- command lines ---------------------------------------------------------------------------

def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=300)


def test_export_cli_writes_artifact_and_sidecar(student: Path, tmp_path: Path) -> None:
    from export.__main__ import main

    assert run_cli(lambda: main([str(student), "--backend", "eager", "--batch-sizes", "1,8", "--out", str(tmp_path / "a")])) == 0
    meta = json.loads((tmp_path / "a" / "artifact.json").read_text())
    source = json.loads((student / "model.json").read_text())
    assert meta["source"]["sha256"] == source["sha256"] and meta["source"]["method"]["name"] == "kd"
    assert meta["backend"] == "eager" and meta["precision"] == "fp32" and meta["batch_sizes"] == [1, 8]
    assert meta["input"]["shape"] == ["batch", 1, 28, 28] and meta["input"]["normalization"] == source["normalization"]
    assert meta["versions"]["torch"] == torch.__version__
    assert {f["name"] for f in meta["files"]} == {"model.safetensors", "model.json"}


@pytest.mark.parametrize("args, message", [
    (["--backend", "onnxrt"], "unknown backend 'onnxrt'"),
    (["--backend", "onnxruntime", "--batch-sizes", "1,x"], "--batch-sizes: 'x' is not a positive integer"),
    (["--backend", "onnxruntime", "--precision", "bf16"], "cannot run bf16 on cpu"),
    (["--backend", "aotinductor", "--precision", "fp16", "--device", "cpu"], "use bf16 on CPU"),
    (["--backend", "eager", "--precision", "int8"], "cannot run int8"),
    (["--backend", "eager", "--precision", "fp64"], "argument --precision: invalid choice"),
])
def test_export_cli_bad_input_is_one_line_exit_2(student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  args: list[str], message: str) -> None:
    from export.__main__ import main

    def call() -> int:
        try:
            return main([str(student), *args, "--out", str(tmp_path / "x")])
        except SystemExit as exc:
            return int(exc.code)

    assert run_cli(call) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("error: ")
    assert not (tmp_path / "x" / "artifact.json").exists()


def test_every_user_error_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    """`run_cli` catches the one root type, so each CLI reports every kind of bad input the same way."""
    from export.errors import BackendUnavailable
    from pipelines.errors import DataError, UserError
    from rrd_fast.cache.builder import CacheTooLarge
    from rrd_fast.cache.manifest import CacheError
    from rrd_fast.checkpoint import CheckpointError
    from rrd_fast.cli import RunError
    from rrd_fast.config import ConfigError
    from rrd_fast.methods.base import MethodError
    from rrd_fast.models import UnknownModelError

    for kind in (DataError, ConfigError, MethodError, CheckpointError, CacheError, CacheTooLarge, RunError,
                 UnknownModelError, ExportError, BackendUnavailable):
        assert issubclass(kind, UserError)

        def fail(kind: type[Exception] = kind) -> int:
            raise kind(f"{kind.__name__}: bad\n  input")

        assert run_cli(fail) == 2
        assert capsys.readouterr().err == f"error: {kind.__name__}: bad input\n"
    with pytest.raises(KeyError):
        run_cli(lambda: {}["bug"])  # not a user error: the traceback stays


def test_export_cli_imports_no_training_code() -> None:
    code = ("import sys, export.cli; print(sorted(m for m in sys.modules if m.startswith("
            "('rrd_fast.methods', 'rrd_fast.memory', 'rrd_fast.cache', 'rrd_fast.trainer'))))")
    proc = _run("-c", code)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_cli_missing_checkpoint_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main

    assert run_cli(lambda: main([str(tmp_path / "nope"), "--backend", "onnxruntime", "--out", str(tmp_path / "o")])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope/model.json: model sidecar not found" in err


@pytest.mark.parametrize("args, message", [
    (["--precisions", "fp32,int4"], "unknown precision 'int4'"),
    (["--backends", "eager,tensorrt"], "backend 'tensorrt' is not available"),
    (["--iters", "0"], "--iters must be >= 1"),
    (["--data", "missing.yaml"], "missing.yaml: --data config not found"),
    (["--device", "cuda"], "--device cuda: no CUDA device is available"),
])
def test_bench_cli_bad_input_exit_2(student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                    args: list[str], message: str) -> None:
    if "tensorrt" in message and get_backend("tensorrt").missing() is None:
        pytest.skip("torch_tensorrt is installed here")
    if "cuda" in message and torch.cuda.is_available():
        pytest.skip("a CUDA device is available here")
    assert run_cli(lambda: bench_main([str(student), "--backends", "eager", *args, "--out", str(tmp_path / "b")])) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "b" / "bench.json").exists()


def test_tensorrt_without_torch_tensorrt_says_what_is_missing(student: Path, tmp_path: Path) -> None:
    """A real `python -m export` process: exit code 2 and one line saying what to install."""
    if get_backend("tensorrt").missing() is None:
        pytest.skip("torch_tensorrt is installed here")
    proc = _run("-m", "export", str(student), "--backend", "tensorrt", "--precision", "fp16", "--out", str(tmp_path / "t"))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
    assert "cannot import torch_tensorrt" in proc.stderr
    assert "pip install 'rrd-fast[tensorrt]'" in proc.stderr and "pypi.nvidia.com" in proc.stderr


# -- artifact.json schema, provenance and trust ----------------------------------------------

def test_artifact_card_round_trip_records_who_built_it(bench: Path) -> None:
    import datetime as dt
    import getpass
    import os
    import socket

    from export.artifact import ArtifactCard

    for backend in ("eager", "onnxruntime", "aotinductor"):
        raw = json.loads((_artifact_dir(bench, backend) / "artifact.json").read_text())
        card = ArtifactCard.from_dict(raw)
        assert card.to_dict() == raw and card.backend == backend
        built = raw["built_by"]
        assert built["host"] == socket.gethostname() and built["user"] == getpass.getuser()
        assert built["uid"] == os.getuid()
        when = dt.datetime.fromisoformat(built["time"])
        assert abs((dt.datetime.now(dt.timezone.utc) - when).total_seconds()) < 3600


def _edit_sidecar(folder: Path, change) -> None:
    meta = json.loads((folder / "artifact.json").read_text())
    change(meta)
    (folder / "artifact.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(batch_sizes="x"), "'batch_sizes' is 'x' (str)"),
    (lambda m: m.update(batch_sizes=[0]), "'batch_sizes' is [0] (list)"),
    (lambda m: m.update(dynamic_batch="yes"), "'dynamic_batch' is 'yes' (str), expected true or false"),
    (lambda m: m.update(precision="fp64"), "'precision' is 'fp64' (str)"),
    (lambda m: m.update(device="tpu"), "'device' is 'tpu' (str), expected cpu or cuda"),
    (lambda m: m.update(files="model.onnx"), "'files' is 'model.onnx' (str)"),
    (lambda m: m["files"][0].update(name="../model.onnx"), "'files[0].name' is '../model.onnx' (str)"),
    (lambda m: m["files"][0].update(sha256=1), "'files[0].sha256' is 1 (int)"),
    (lambda m: m["files"][0].update(batch_size="1"), "'files[0].batch_size' is '1' (str)"),
    (lambda m: m["input"].update(dtype="float64"), "'input.dtype' is 'float64' (str)"),
    (lambda m: m["input"].update(shape=["batch", 1, 28]), "'input.shape' is ['batch', 1, 28] (list)"),
    (lambda m: m["input"].update(shape=["batch", 1, 10**6, 28]), "'input.shape' is ['batch', 1, 1000000, 28]"),
    (lambda m: m["output"].update(shape=["batch", 10**9]), "'output.shape' is ['batch', 1000000000] (list)"),
    (lambda m: m.update(source=None), "'source' is None"),
    (lambda m: m["built_by"].update(user=5), "'built_by.user' is 5 (int)"),
    (lambda m: m.pop("backend"), "'backend' is missing"),
])
def test_bad_artifact_sidecar_field_is_one_line(bench: Path, tmp_path: Path, change, field: str) -> None:
    folder = _copy(_artifact_dir(bench, "onnxruntime"), tmp_path / "ort")
    _edit_sidecar(folder, change)
    with pytest.raises(ExportError) as info:
        load_artifact(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{folder / 'artifact.json'}: field ") and field in message, message


def test_out_that_is_a_file_is_one_line(student: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from export.__main__ import main as export_main

    target = tmp_path / "taken"
    target.write_text("not a folder")
    for out, needle in ((target, f"--out {target}: is a file"),
                        (target / "sub", f"--out {target / 'sub'}: cannot be created inside {target}, which is a file")):
        assert run_cli(lambda: export_main([str(student), "--backend", "eager", "--out", str(out)])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
        assert run_cli(lambda: bench_main([str(student), "--backends", "eager", "--out", str(out)])) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and needle in err, err
    assert target.read_text() == "not a folder"


def test_export_leaves_the_folder_writable_by_its_owner_only(student: Path, tmp_path: Path) -> None:
    import os

    old = os.umask(0o002)  # group-writable by default, as on many desktops
    try:
        export_checkpoint(student, "eager", tmp_path / "e", batch_sizes=(1,))
    finally:
        os.umask(old)
    for path in (tmp_path / "e", *(tmp_path / "e").iterdir()):
        assert path.stat().st_mode & 0o022 == 0, (path, oct(path.stat().st_mode))


def _writable_by_others(path: Path, bits: int) -> None:
    path.chmod(path.stat().st_mode | bits)


def test_native_code_artifact_writable_by_others_is_refused_unless_trusted(bench: Path, student: Path,
                                                                            tmp_path: Path) -> None:
    folder = _copy(_artifact_dir(bench, "aotinductor"), tmp_path / "aoti")
    _writable_by_others(folder, 0o020)
    with pytest.raises(ExportError) as info:
        load_artifact(folder)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"{folder}: refusing to load this aotinductor artifact")
    assert "is group-writable (mode 0o775)" in message and "--trust-artifact" in message
    folder.chmod(0o755)
    _writable_by_others(folder / "model.pt2", 0o002)
    with pytest.raises(ExportError, match=r"model\.pt2: refusing to load .* is world-writable \(mode 0o646\)"):
        load_artifact(folder)
    x = torch.from_numpy(_eval_images(student)[0][:2])
    model, _ = read_model_checkpoint(student)
    with torch.no_grad():
        assert (load_artifact(folder, trust=True)(x) - model(x)).abs().max().item() <= 1e-4
    # ONNX files and eager checkpoints run no code from the folder: loaded whoever can write it.
    for backend in ("onnxruntime", "eager"):
        other = _copy(_artifact_dir(bench, backend), tmp_path / backend)
        _writable_by_others(other, 0o022)
        assert load_artifact(other)(x).shape == (2, 10)


@pytest.mark.skipif(not hasattr(__import__("os"), "geteuid") or __import__("os").geteuid() != 0,
                    reason="giving a file to another user needs root")
def test_native_code_artifact_owned_by_another_user_is_refused(bench: Path, tmp_path: Path) -> None:
    import os

    folder = _copy(_artifact_dir(bench, "aotinductor"), tmp_path / "aoti")
    os.chown(folder / "model.pt2", 12345, -1)
    with pytest.raises(ExportError, match=r"model\.pt2: refusing to load .* is owned by uid 12345, not by you"):
        load_artifact(folder)


def test_bench_refuses_an_artifact_others_can_write_unless_trusted(bench: Path, student: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(bench / "artifacts", tmp_path / "artifacts")
    (folder,) = [p.parent for p in (tmp_path / "artifacts").glob("*/aotinductor-fp32-cpu/artifact.json")]
    _writable_by_others(folder, 0o002)
    args = [str(student), "--backends", "aotinductor", "--batch-sizes", "1", "--warmup", "0", "--iters", "1",
            "--eval-limit", "8", "--out", str(tmp_path)]
    assert run_cli(lambda: bench_main(args)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{folder}: refusing to load this aotinductor artifact" in err
    assert "world-writable" in err and not (tmp_path / "bench.json").exists()
    assert run_cli(lambda: bench_main([*args, "--trust-artifact"])) == 0
    assert "exported" not in capsys.readouterr().out  # the trusted artifact itself ran, not a fresh export
    assert json.loads((tmp_path / "bench.json").read_text())["results"][0]["backend"] == "aotinductor"


def test_export_help_says_what_to_trust() -> None:
    from export.__main__ import build_parser

    text = " ".join(build_parser().format_help().split())
    assert "Trusting exported artifacts" in text and "shared library" in text and "--trust-artifact" in text
    assert "ONNX files and eager checkpoints hold no code" in text


# -- latency and throughput agree; noisy points are flagged; labels name run and method ------

def test_throughput_is_batch_over_median_latency() -> None:
    from export.timing import NOISY_RATIO, summarize

    # One stalled call among ten: the median ignores it, so img/s follows p50 (a mean would not).
    lat = summarize([2.0] * 9 + [200.0], batch_size=8, warmup=0, timer="perf_counter")
    assert lat.p50_ms == 2.0 and lat.throughput_ips == pytest.approx(8 * 1000.0 / 2.0)
    assert lat.p90_over_p50 == pytest.approx(lat.p90_ms / 2.0) and lat.p90_over_p50 > NOISY_RATIO and lat.noisy
    steady = summarize([2.0, 2.1, 2.0, 1.9, 2.2], batch_size=1, warmup=0, timer="perf_counter")
    assert not steady.noisy and steady.p90_over_p50 < NOISY_RATIO
    real = measure(lambda x: x.sum(), torch.zeros(4, 1000), warmup=1, iters=5)
    assert real.throughput_ips == pytest.approx(4 * 1000.0 / real.p50_ms)


def test_bench_rows_state_consistent_throughput(bench: Path) -> None:
    report = json.loads((bench / "bench.json").read_text())
    md = (bench / "bench.md").read_text()
    assert "batch / p50" in md and "p90 / p50" in md  # the header says how each figure is measured
    for row in report["results"]:
        lat = row["latency"]
        assert lat["throughput_ips"] == pytest.approx(row["batch_size"] * 1000.0 / lat["p50_ms"])
        assert lat["noisy"] == (lat["p90_over_p50"] > 1.5)


def _report_with(bench: Path, run_name: str, noisy_index: int) -> dict:
    """The fixture's report with one long run name and one point made noisy (p90 = 3 × p50)."""
    report = json.loads((bench / "bench.json").read_text())
    for i, row in enumerate(report["results"]):
        row["student"] = run_name
        row["label"] = f"{run_name} ({row['method']}) {row['backend']}"
        lat = row["latency"]
        lat["p90_ms"] = lat["p50_ms"] * (3.0 if i == noisy_index else 1.1)
        lat["p90_over_p50"], lat["noisy"] = lat["p90_ms"] / lat["p50_ms"], i == noisy_index
    return report


def test_noisy_points_are_flagged_in_table_and_plot(bench: Path, tmp_path: Path) -> None:
    report = _report_with(bench, "resnet8_rrd_seed0", noisy_index=1)
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(report))
    md_path, png_path = write_reports(path)
    rows = _md_rows(md_path.read_text())
    spreads = [r[8] for r in rows]
    assert spreads[1] == "3.00 noisy" and all(not s.endswith("noisy") for i, s in enumerate(spreads) if i != 1)
    fig = render_png(report, tmp_path / "again.png")
    texts = [t for ax in fig.axes for t in ax.texts]
    flagged = [t.get_text() for t in texts if "[noisy" in t.get_text()]
    assert flagged == [report["results"][1]["label"] + " [noisy, p90/p50 3.0]"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "noisy: p90/p50 > 1.5" in legend and "whisker: p50 to p90" in legend


def test_png_labels_name_run_and_method_and_are_not_clipped(bench: Path, tmp_path: Path) -> None:
    import matplotlib.image

    # One panel and a very long run name: more than tight_layout can make room for.
    long_name = "resnet32x4_resnet8x4_rrd_kd_seed0_" + "_".join(["a_very_long_run_folder_name"] * 3)
    report = _report_with(bench, long_name, noisy_index=0)
    report["results"] = [r for r in report["results"] if r["batch_size"] == 4]
    png = tmp_path / "long.png"
    fig = render_png(report, png)
    labels = {t.get_text() for ax in fig.axes for t in ax.texts}
    assert all(t.startswith(f"{long_name} (kd) ") for t in labels)
    img = matplotlib.image.imread(png)[..., :3]
    border = np.concatenate([img[:4].reshape(-1, 3), img[-4:].reshape(-1, 3),
                             img[:, :4].reshape(-1, 3), img[:, -4:].reshape(-1, 3)])
    assert border.min() > 0.98, "something is drawn up to the image edge: a label or legend was cut off"


def test_runs_are_labelled_by_run_folder(student: Path, tmp_path: Path) -> None:
    """Two students whose folders share a name are told apart by their parents, not by #0/#1."""
    a, b = tmp_path / "seed0" / "rrd_kd", tmp_path / "seed1" / "rrd_kd"
    shutil.copytree(student, a)
    shutil.copytree(student, b)
    out = tmp_path / "out"
    code = run_cli(lambda: bench_main([str(a), str(b), "--backends", "eager", "--batch-sizes", "1", "--warmup", "0",
                                       "--iters", "2", "--eval-limit", "8", "--out", str(out)]))
    assert code == 0
    report = json.loads((out / "bench.json").read_text())
    assert [r["label"] for r in report["results"]] == ["seed0/rrd_kd (kd) eager", "seed1/rrd_kd (kd) eager"]
    assert [s["student"] for s in report["students"]] == ["seed0/rrd_kd", "seed1/rrd_kd"]


def test_onnx_export_is_quiet_about_torchvision(student: Path, tmp_path: Path) -> None:
    """torch.onnx warns once per torchvision op when torchvision is absent; none of those reach the user."""
    import logging
    import warnings

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    keep = Keep()
    loggers = [logging.getLogger("torch.onnx._internal.exporter._registration"), logging.getLogger()]
    for logger in loggers:
        logger.addHandler(keep)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_checkpoint(student, "onnxruntime", tmp_path / "ort", batch_sizes=(1,), dynamic=False)
    finally:
        for logger in loggers:
            logger.removeHandler(keep)
    assert not [r.getMessage() for r in records if "torchvision" in r.getMessage()]
    assert not [str(w.message) for w in caught if "torchvision" in str(w.message) or "LeafSpec" in str(w.message)]
