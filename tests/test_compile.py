"""torch.compile in the trainer (`train.compile`): exactness against eager, bit-identical resume of a
compiled run, a resume that switches the setting, one padded eval shape, and no host reads inside a step.

Only the KD test generates code with Inductor (tens of seconds per graph on a CPU); the others
trace with aot_eager, which captures the same graphs (dynamo + AOTAutograd) without codegen.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

from pipelines.synthetic import write_fashion_mnist
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.compile import AUTO_MIN_STEPS, Compiler, resolve_compile
from rrd_fast.config import load_config
from rrd_fast.models import create_model
from rrd_fast.trainer import Trainer

SIDECAR = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
           "normalization": {"mean": [0.2860], "std": [0.3530]}}
STEPS_PER_EPOCH = 4  # 128 training images, batch 32


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=128, n_test=40, gz=True, seed=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(7)
    out = tmp_path_factory.mktemp("teacher")
    write_model_checkpoint(out, create_model("resnet8", num_classes=10, in_channels=1), SIDECAR)
    return out


def _cfg(fmnist: Path, teacher: Path, out: Path, name: str, *extra: str):
    return load_config(None, [f"name={name}", f"output_dir={out}", "data.format=fashion_mnist", f"data.root={fmnist}",
                              "data.batch_size=32", "data.eval_batch_size=16", "student.arch=resnet8",
                              f"teacher.checkpoint={teacher}", "teacher.eval_top1=false", "train.progress=false",
                              *extra])


def _train(cfg, resume: bool = False) -> Trainer:
    trainer = Trainer(cfg, resume=resume)
    trainer.fit()
    return trainer


def _losses(trainer: Trainer) -> torch.Tensor:
    return torch.tensor([r["loss"] for r in trainer.state.history], dtype=torch.float64)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model.safetensors")


def test_each_run_compiles_past_dynamos_recompile_limit() -> None:
    """Twice dynamo's recompile limit of models of one class, each with its own Compiler (as successive runs of
    one process, or a benchmark's variants, build them): every one reaches the backend, none falls back to eager."""
    compiled = []

    def counting_backend(graph: torch.fx.GraphModule, inputs: list) -> object:
        compiled.append(graph)
        return graph.forward

    class Scale(torch.nn.Module):  # a class of ours: dynamo skips top-level frames of torch.nn's own modules
        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = torch.nn.Parameter(torch.tensor(factor))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.factor

    limit = torch._dynamo.config.recompile_limit
    for i in range(2 * limit):
        model = Compiler(True, backend=counting_backend).module(Scale(float(i)))
        model(torch.ones(4, 3))
    assert len(compiled) == 2 * limit


def test_auto_compiles_long_cuda_runs_only() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile("auto", AUTO_MIN_STEPS - 1, cuda)[0] is False
    assert resolve_compile("auto", AUTO_MIN_STEPS, cuda)[0] is True
    compiled, why = resolve_compile("auto", 10**9, cpu)  # no faster on CPUs: auto stays eager there
    assert compiled is False and "off on cpu" in why
    assert resolve_compile("on", 1, cpu)[0] is True and resolve_compile("off", 10**9, cuda)[0] is False


def test_compiled_kd_matches_eager_and_resumes_bit_identically(fmnist: Path, teacher: Path, tmp_path: Path) -> None:
    """48 steps of KD: Inductor's per-epoch losses stay within 1e-3 (relative) of eager's; a compiled run stopped
    after 6 of 12 epochs and resumed compiled ends bit-identical to the uninterrupted compiled run; a
    resume that switches compile off finishes, close to both."""
    common = ("method.name=kd", "train.eval_every=12")
    eager = _train(_cfg(fmnist, teacher, tmp_path, "eager", *common, "optim.epochs=12"))
    whole = _train(_cfg(fmnist, teacher, tmp_path, "whole", *common, "optim.epochs=12", "train.compile=on"))
    assert whole.compiler.enabled and not eager.compiler.enabled
    assert len(whole.state.history) * STEPS_PER_EPOCH == 48
    torch.testing.assert_close(_losses(whole), _losses(eager), rtol=1e-3, atol=0)

    _train(_cfg(fmnist, teacher, tmp_path, "halves", *common, "optim.epochs=6", "train.compile=on"))
    shutil.copytree(tmp_path / "halves", tmp_path / "switch")
    _train(_cfg(fmnist, teacher, tmp_path, "halves", *common, "optim.epochs=12", "train.compile=on"), resume=True)
    resumed, uninterrupted = _weights(tmp_path / "halves"), _weights(tmp_path / "whole")
    assert resumed.keys() == uninterrupted.keys()
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key

    switched = _train(_cfg(fmnist, teacher, tmp_path, "switch", *common, "optim.epochs=12", "train.compile=off"),
                      resume=True)
    assert not switched.compiler.enabled
    torch.testing.assert_close(_losses(switched), _losses(eager), rtol=1e-3, atol=0)


def test_compiled_rrd_kd_step_matches_eager(fmnist: Path, teacher: Path, tmp_path: Path) -> None:
    """24 steps of RRD+KD through the trainer, traced by dynamo + AOTAutograd (aot_eager), against eager: the
    queue's in-graph updates included. (Every method's step alone: tests/test_compile_graphs.py; 50 steps with
    Inductor for KD, RRD+KD and FitNet: `python -m rrd_fast.bench compile`.)"""
    common = ("method.name=rrd", "method.alpha=1.0", "method.beta=1.0", "method.options={rrd: {queue_size: 100}}",
              "optim.epochs=6", "train.eval_every=6")
    eager = _train(_cfg(fmnist, teacher, tmp_path, "eager", *common))
    traced = _train(_cfg(fmnist, teacher, tmp_path, "traced", *common, "train.compile=on",
                         "train.compile_backend=aot_eager"))
    torch.testing.assert_close(_losses(traced), _losses(eager), rtol=1e-5, atol=0)
    a, b = _weights(tmp_path / "traced"), _weights(tmp_path / "eager")
    for key in b:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)


def test_padded_evaluation_equals_unpadded(fmnist: Path, teacher: Path, tmp_path: Path) -> None:
    """40 eval images in batches of 16: the last 8 are padded to 16 for a compiled model's one shape."""
    trainer = Trainer(_cfg(fmnist, teacher, tmp_path, "pad", "method.name=kd"))
    try:
        student = trainer.unwrapped.student.eval()
        assert [len(b) for b in trainer.data.eval.epoch(0)] == [16, 16, 8]
        assert trainer.evaluate_model(student, pad=True) == trainer.evaluate_model(student, pad=False)
    finally:
        trainer.close()


class HostReads(TorchDispatchMode):
    """Records where a tensor's value is read on the host (`.item()`, `float(t)`, `bool(t)` all dispatch
    `aten._local_scalar_dense`; on a GPU each such read waits for the device): inside a training step,
    or between steps at which global step."""

    def __init__(self, trainer: Trainer) -> None:
        super().__init__()
        self.trainer = trainer
        self.in_step = False
        self.inside: list[int] = []
        self.between: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            (self.inside if self.in_step else self.between).append(self.trainer.state.global_step)
        return func(*args, **(kwargs or {}))

    def mark_steps(self) -> None:
        step = self.trainer._main_step

        def marked(*args):
            self.in_step = True
            try:
                return step(*args)
            finally:
                self.in_step = False

        self.trainer._main_step = marked


@pytest.mark.parametrize("method", [
    ("method.name=kd",),
    ("method.name=rrd", "method.alpha=1.0", "method.beta=1.0", "method.options={rrd: {queue_size: 100}}"),
], ids=["kd", "rrd_kd"])
def test_no_host_reads_between_sync_points(fmnist: Path, teacher: Path, tmp_path: Path, method: tuple[str, ...]) -> None:
    """No host read inside a step (teacher, loss terms, memory updates, backward, optimizer); between
    steps, only every train.sync_every steps and at epoch ends (the pipeline hands batches over freely)."""
    cfg = _cfg(fmnist, teacher, tmp_path, "sync", *method, "optim.epochs=2", "train.sync_every=2")
    trainer = Trainer(cfg)
    reads = HostReads(trainer)
    reads.mark_steps()
    with reads:
        trainer.fit()
    assert reads.between, "no host read observed at all: the probe is not seeing the run"
    assert reads.inside == [], f"host reads inside steps {sorted(set(reads.inside))}"
    allowed = set(range(0, 2 * STEPS_PER_EPOCH + 1, 2))
    assert set(reads.between) <= allowed, sorted(set(reads.between) - allowed)


@pytest.mark.gpu
def test_no_device_sync_inside_a_cuda_step(fmnist: Path, teacher: Path, tmp_path: Path) -> None:
    """On CUDA every step of RRD+KD (compiled, bf16), and the pipeline's hand-over of every batch after an
    epoch's first, run with torch's sync debug mode set to error."""
    cfg = _cfg(fmnist, teacher, tmp_path, "cuda", "method.name=rrd", "method.alpha=1.0", "method.beta=1.0",
               "method.options={rrd: {queue_size: 100}}", "optim.epochs=2", "train.compile=on",
               "train.mixed_precision=bf16")
    trainer = Trainer(cfg)
    assert trainer.accelerator.device.type == "cuda"
    step = trainer._main_step

    def strict(*args):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return step(*args)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    trainer._main_step = strict
    pipe = trainer.data.train
    epoch = pipe.epoch

    def strict_epoch(*args, **kwargs):
        batches = epoch(*args, **kwargs)
        yield next(batches)  # an epoch's set-up (its order, say) may read the device once
        while True:
            torch.cuda.set_sync_debug_mode("error")
            try:
                batch = next(batches)
            except StopIteration:
                return
            finally:
                torch.cuda.set_sync_debug_mode("default")
            yield batch

    pipe.epoch = strict_epoch
    trainer.fit()
