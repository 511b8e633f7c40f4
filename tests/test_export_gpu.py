"""Export on an NVIDIA GPU: Torch-TensorRT engines, ONNX Runtime's CUDA provider, AOTInductor on CUDA.

Run by scripts/gpu_check.sh (section "# export"); skipped without CUDA. A small resnet8
keeps engine builds short; tolerances are stated per precision in each test.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from export import BackendUnavailable, ExportError, export_checkpoint, get_backend, load_artifact
from export.bench import main as bench_main
from export.cli import run_cli
from pipelines.synthetic import write_cifar100
from rrd_fast.checkpoint import read_model_checkpoint, write_model_checkpoint
from rrd_fast.models import create_model

pytestmark = pytest.mark.gpu

MEAN, STD = [0.5071, 0.4867, 0.4408], [0.2675, 0.2565, 0.2761]


@pytest.fixture(scope="module")
def student(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export_gpu")
    data = write_cifar100(root / "cifar", n_train=200, n_test=64)
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=100, in_channels=3).eval()
    write_model_checkpoint(root / "student", model, {
        "arch": "resnet8", "num_classes": 100, "in_channels": 3, "image_size": 32,
        "normalization": {"mean": MEAN, "std": STD}, "dataset": {"format": "cifar100", "root": str(data)},
        "method": {"name": "ce", "gamma": 1.0, "alpha": 0.0, "beta": 0.0, "options": {}},
    })
    return root / "student"


def _images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).cuda()


def _reference(student: Path, x: torch.Tensor) -> torch.Tensor:
    model, _ = read_model_checkpoint(student)
    model = model.cuda().eval()
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # a full-fp32 reference
    try:
        with torch.no_grad():
            return model(x).float()
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _close(got: torch.Tensor, expected: torch.Tensor, rel: float, agree: float) -> None:
    scale = expected.abs().max().item()
    assert (got - expected).abs().max().item() <= rel * scale
    assert (got.argmax(1) == expected.argmax(1)).double().mean().item() >= agree


def _need_tensorrt() -> None:
    problem = get_backend("tensorrt").missing()
    if problem is not None:
        pytest.skip(problem)


def test_tensorrt_fp32_static_engines(student: Path, tmp_path: Path) -> None:
    """fp32 engines (TensorRT may use TF32): |Δlogit| <= 1% of the largest logit, same top-1 on >= 98%."""
    _need_tensorrt()
    sidecar = export_checkpoint(student, "tensorrt", tmp_path / "trt", precision="fp32", device="cuda", batch_sizes=(1, 4))
    assert not sidecar["dynamic_batch"] and sorted(f["batch_size"] for f in sidecar["files"]) == [1, 4]
    assert "torch_tensorrt" in sidecar["versions"]
    artifact = load_artifact(tmp_path / "trt")
    x = _images(17)
    expected = _reference(student, x)
    for n in (1, 4):
        _close(artifact(x[:n]), expected[:n], rel=0.01, agree=0.98 if n > 1 else 1.0)
    _close(artifact.predict(x), expected, rel=0.01, agree=0.98)  # chunks of 4, tail padded
    with pytest.raises(ExportError, match=r"built for batch sizes \[1, 4\] only, got a batch of 3"):
        artifact(x[:3])
    with pytest.raises(ExportError, match="does not fit this artifact"):
        artifact(torch.zeros(1, 3, 28, 28, device="cuda"))


def test_tensorrt_fp16(student: Path, tmp_path: Path) -> None:
    """fp16 engine: |Δlogit| <= 5% of the largest logit, same top-1 on >= 95%."""
    _need_tensorrt()
    export_checkpoint(student, "tensorrt", tmp_path / "trt16", precision="fp16", device="cuda", batch_sizes=(8,))
    artifact = load_artifact(tmp_path / "trt16")
    assert artifact.dtype == torch.float16
    x = _images(8, seed=1)
    _close(artifact(x), _reference(student, x), rel=0.05, agree=0.95)


def test_tensorrt_int8_or_clear_refusal(student: Path, tmp_path: Path) -> None:
    """int8 via ModelOpt PTQ on training images: same top-1 on >= 80% of random inputs; else a clear message."""
    _need_tensorrt()
    backend = get_backend("tensorrt")
    try:
        backend.check("int8", "cuda")
    except BackendUnavailable as exc:
        assert "nvidia-modelopt" in str(exc) or "not supported by torch_tensorrt" in str(exc)
        return
    export_checkpoint(student, "tensorrt", tmp_path / "trt8", precision="int8", device="cuda", batch_sizes=(8,),
                      calib_samples=128)
    artifact = load_artifact(tmp_path / "trt8")
    x = _images(8, seed=2)
    got, expected = artifact(x), _reference(student, x)
    assert (got.argmax(1) == expected.argmax(1)).double().mean().item() >= 0.8


def test_onnxruntime_cuda_provider(student: Path, tmp_path: Path) -> None:
    """CUDA provider, IOBinding on torch tensors: |Δlogit| <= 1% of the largest logit (cuDNN may use TF32)."""
    import onnxruntime

    export_checkpoint(student, "onnxruntime", tmp_path / "ort", precision="fp32", device="cpu", batch_sizes=(4,))
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(BackendUnavailable, match="onnxruntime-gpu"):
            load_artifact(tmp_path / "ort", device="cuda")
        pytest.skip("onnxruntime has no CUDA provider here (onnxruntime-gpu not installed)")
    artifact = load_artifact(tmp_path / "ort", device="cuda")
    x = _images(5, seed=3)
    got = artifact(x)
    assert got.device.type == "cuda"
    _close(got, _reference(student, x), rel=0.01, agree=1.0)


def test_aotinductor_cuda_and_eager_fp16(student: Path, tmp_path: Path) -> None:
    """AOTInductor on CUDA (fp32, convolutions may use TF32): |Δlogit| <= 1% of the largest logit; eager fp16: <= 5%."""
    export_checkpoint(student, "aotinductor", tmp_path / "aoti", precision="fp32", device="cuda", batch_sizes=(1, 8))
    x = _images(6, seed=4)
    expected = _reference(student, x)
    aoti = load_artifact(tmp_path / "aoti")
    _close(aoti(x), expected, rel=0.01, agree=1.0)
    with pytest.raises(ExportError, match="compiled for cuda and cannot run on cpu"):
        load_artifact(tmp_path / "aoti", device="cpu")
    export_checkpoint(student, "eager", tmp_path / "eager16", precision="fp16", device="cuda", batch_sizes=(8,))
    _close(load_artifact(tmp_path / "eager16")(x), expected, rel=0.05, agree=0.95)


def test_bench_on_cuda_uses_cuda_events(student: Path, tmp_path: Path) -> None:
    code = run_cli(lambda: bench_main([
        str(student), "--device", "cuda", "--backends", "eager", "--precisions", "fp32,fp16",
        "--batch-sizes", "1,16", "--warmup", "2", "--iters", "5", "--out", str(tmp_path / "b"),
    ]))
    assert code == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    assert report["device"]["type"] == "cuda" and len(report["results"]) == 4
    for row in report["results"]:
        assert row["latency"]["timer"] == "cuda_event" and row["latency"]["iterations"] == 5
        assert row["n_eval"] == 64 and row["top1_agreement"] >= (100.0 if row["precision"] == "fp32" else 90.0)
