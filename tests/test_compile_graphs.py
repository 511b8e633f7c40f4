"""The training step compiles whole: no graph breaks, no per-step recompiles, compiled == eager.

The compiled unit is `DistillModule.forward` (student forward + every loss term + the memories;
AOTAutograd traces the backward through the same graph), and a two-stage term's `init_loss`.
For every registered method and memory variant (FIFO local, sharded and replicated in a
1-process gloo group, momentum banks, CRD's contrast banks), in float64 at batch 8 with the
features of a resnet8 student and a resnet14 teacher at 16x16:
- `torch._dynamo.explain` finds one graph and no break in the objective (the part that differs
  between methods; reasons in the failure message), in the whole step of RRD+KD, and in the
  init losses;
- three optimizer steps and a `start_epoch` change under `torch.compile(backend="aot_eager")`
  compile once and never recompile (dynamo's `error_on_recompile` after the first step);
- each step's losses, gradients and buffers (memory rows, pointer, Z, BN statistics) equal
  eager's within TOL, and every buffer is updated in place (same storage throughout, which
  CUDA graphs need).
With two gloo ranks, every sharded memory again compiles to one graph (the banks switch to their
fixed-shape entries there) and its compiled steps equal the eager ones, which exchange indices.
No inductor here: it would take minutes to compile.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import torch._dynamo as dynamo
import torch.distributed as dist
from spawned import run_ranks
from torch._dynamo.testing import CompileCounterWithBackend

from pipelines.batch import Batch
from rrd_fast.config import MethodConfig
from rrd_fast.methods import Objective, TermContext, list_methods
from rrd_fast.models import ModelOutput, create_model
from rrd_fast.trainer import DistillModule, net_info

N_SAMPLES, BATCH, SIZE, CLASSES = 64, 8, 16, 10
TOL = dict(rtol=1e-9, atol=1e-12)  # float64: compiled and eager differ only by rounding
SMALL = {"rrd": {"queue_size": 48, "feat_dim": 16}, "crd": {"nce_k": 24, "feat_dim": 16}}
TERM_OF = {"rrd_kd": "rrd", "crd_kd": "crd"}


@dataclass(frozen=True)
class Case:
    method: str
    options: dict[str, Any]
    sharding: str = "local"

    @property
    def id(self) -> str:
        extra = [f"{k}={v}" for opts in self.options.values() for k, v in opts.items() if k in ("memory", "preset")]
        return "-".join([self.method, *extra, *([self.sharding] if self.sharding != "local" else [])])


def _cases() -> list[Case]:
    cases = []
    for method in list_methods():
        term = TERM_OF.get(method, method)
        cases.append(Case(method, {term: SMALL[term]} if term in SMALL else {}))
    rrd = SMALL["rrd"]
    cases += [Case("rrd", {"rrd": {**rrd, "preset": "2025"}}),  # enqueue before the loss
              Case("rrd", {"rrd": rrd}, "sharded"), Case("rrd", {"rrd": {**rrd, "preset": "2025"}}, "sharded"),
              Case("rrd", {"rrd": rrd}, "replicated"),
              Case("rrd", {"rrd": {**rrd, "memory": "momentum"}}),
              Case("rrd", {"rrd": {**rrd, "memory": "momentum"}}, "sharded"),
              Case("crd", {"crd": SMALL["crd"]}, "sharded"), Case("crd", {"crd": SMALL["crd"]}, "replicated")]
    return cases


CASES = _cases()
# Compiled against eager: the whole step (student forward and backward included) for the paper's
# headline method, the objective alone for every other case. In one process the banks' sharded and
# replicated modes and the replicated FIFO run the local code (their groups are None), so only
# explain sees them; the sharded FIFO has its own loss and write, so it is compiled too.
WHOLE_STEP = [c for c in CASES if c.id == "rrd_kd"]
COMPILED = [c for c in CASES if c not in WHOLE_STEP and (c.sharding == "local" or (
    "rrd" in c.options and c.sharding == "sharded" and c.options["rrd"].get("memory", "fifo") == "fifo"))]


@pytest.fixture(scope="module", autouse=True)
def one_process_group():
    """Sharded and replicated memories build their groups in a 1-process gloo group; torn down after."""
    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", world_size=1, rank=0, store=dist.HashStore())
    try:
        yield
    finally:
        dist.destroy_process_group()


@dataclass
class Step:
    images: torch.Tensor
    student_out: ModelOutput  # the student's outputs for `images`, detached (the objective's inputs)
    teacher_out: ModelOutput
    batch: Batch


@dataclass
class Setup:
    student: torch.nn.Module
    s_info: Any
    t_info: Any
    labels: np.ndarray
    steps: list[Step]


def _make_setup(rank: int = 0, world_size: int = 1) -> Setup:
    """Three steps of the same global batches; rank r of `world_size` gets the r-th slice of each."""
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=CLASSES).double()
    teacher = create_model("resnet14", num_classes=CLASSES).double().eval()
    labels = np.arange(N_SAMPLES) % CLASSES
    g = torch.Generator().manual_seed(1)
    steps, part = [], slice(rank * BATCH // world_size, (rank + 1) * BATCH // world_size)
    for step in range(3):
        index = ((torch.arange(BATCH) + step * BATCH) % N_SAMPLES)[part]
        images = torch.randn(BATCH, 3, SIZE, SIZE, generator=g, dtype=torch.float64)[part]
        with torch.no_grad():
            student_out, teacher_out = student(images, features=True), teacher(images, features=True)
        batch = Batch(images, torch.as_tensor(labels[index.numpy()]), index, torch.zeros(len(index), 3, dtype=torch.int32), 0)
        steps.append(Step(images, student_out, teacher_out, batch))
    return Setup(student, net_info(student, "resnet8", CLASSES, 3, SIZE), net_info(teacher, "resnet14", CLASSES, 3, SIZE),
                 labels, steps)


@pytest.fixture(scope="module")
def setup() -> Setup:
    return _make_setup()


def _module(setup: Setup, case: Case, seed: int = 0) -> DistillModule:
    torch.manual_seed(seed)
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    context = TermContext(num_train_samples=N_SAMPLES, seed=seed, world_size=world_size, memory_sharding=case.sharding,
                          train_labels=setup.labels)
    objective = Objective(MethodConfig(name=case.method, options=case.options), setup.s_info, setup.t_info, context)
    module = DistillModule(copy.deepcopy(setup.student), objective).double().train()
    module.objective.start_epoch(0)
    return module


def _teacher(module: DistillModule | Objective, step: Step) -> ModelOutput | None:
    """The teacher's outputs, or None where the main stage reads none (the trainer then skips the teacher)."""
    objective = module.objective if isinstance(module, DistillModule) else module
    return step.teacher_out if objective.teacher_fields else None


def _leaves(out: ModelOutput) -> ModelOutput:
    """Fresh leaf copies of the student's outputs, so that each run gets its own input gradients."""
    leaf = lambda t: t.detach().clone().requires_grad_(True)  # noqa: E731
    return ModelOutput(leaf(out.logits), leaf(out.pooled), [leaf(t) for t in out.stages],
                       [leaf(t) for t in out.pre_relu], leaf(out.stem))


def _breaks(explained: Any) -> str:
    lines = []
    for reason in explained.break_reasons:
        where = " <- ".join(f"{f.filename.rsplit('/', 2)[-1]}:{f.lineno} {f.name}" for f in reversed(reason.user_stack[-3:]))
        lines.append(f"{str(reason.reason).splitlines()[0]} at {where}")
    return "\n".join(lines)


def _assert_one_graph(what: str, fn: Callable, *args: Any) -> None:
    dynamo.reset()
    try:
        explained = dynamo.explain(fn)(*args)
    finally:
        dynamo.reset()
    assert explained.graph_break_count == 0 and explained.graph_count == 1, (
        f"{what}: {explained.graph_count} graphs, {explained.graph_break_count} breaks:\n{_breaks(explained)}")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_objective_has_one_graph_and_no_breaks(setup: Setup, case: Case) -> None:
    step, objective = setup.steps[0], _module(setup, case).objective
    _assert_one_graph(case.id, objective, _leaves(step.student_out), _teacher(objective, step), step.batch)


@pytest.mark.parametrize("case", WHOLE_STEP, ids=lambda c: c.id)
def test_whole_step_has_one_graph_and_no_breaks(setup: Setup, case: Case) -> None:
    step, module = setup.steps[0], _module(setup, case)
    _assert_one_graph(case.id, module, step.images, _teacher(module, step), step.batch)


@pytest.mark.parametrize("method", ["ab", "fsp", "ft"])
def test_init_loss_has_one_graph_and_no_breaks(setup: Setup, method: str) -> None:
    module = _module(setup, Case(method, {}))
    term = module.objective.terms[method]
    stage = term.init_stage()
    assert stage is not None

    def init_step(images: torch.Tensor, teacher_out: ModelOutput, batch: Batch) -> torch.Tensor:
        student_out = module.student(images, features=True) if stage.student_features else None
        return term.init_loss(student_out, teacher_out, batch)

    step = setup.steps[0]
    _assert_one_graph(f"{method} init", init_step, step.images, step.teacher_out, step.batch)


def _optimizer(module: torch.nn.Module) -> torch.optim.Optimizer | None:
    params = [p for p in module.parameters() if p.requires_grad]
    return torch.optim.SGD(params, lr=0.1, momentum=0.9) if params else None


def _train_step(module: torch.nn.Module, fn: Callable, optimizer: torch.optim.Optimizer | None, step: Step,
                whole: bool) -> dict[str, torch.Tensor]:
    """One training step of the whole module or of the objective alone; what it produced and left behind."""
    student_out, teacher_out = None if whole else _leaves(step.student_out), _teacher(module, step)
    out = fn(step.images, teacher_out, step.batch) if whole else fn(student_out, teacher_out, step.batch)
    losses = out[1] if whole else out
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    grads = {f"grad.{n}": p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    if student_out is not None:
        inputs = {"logits": student_out.logits, "pooled": student_out.pooled, "stem": student_out.stem,
                  **{f"stage{i}": t for i, t in enumerate(student_out.stages)},
                  **{f"pre_relu{i}": t for i, t in enumerate(student_out.pre_relu)}}
        grads |= {f"grad.student.{n}": t.grad for n, t in inputs.items() if t.grad is not None}
    if optimizer is not None:
        optimizer.step()
    result = {f"loss.{k}": v.detach().clone() for k, v in losses.items()} | grads
    return result | {f"buffer.{n}": b.clone() for n, b in module.named_buffers()}


def _compiled_matches_eager(setup: Setup, case: Case, whole: bool) -> None:
    """Three steps eager and compiled side by side, a new epoch before the third; one compile, no recompile."""
    full, twin = _module(setup, case), _module(setup, case)  # built twice: deepcopy cannot copy a process group
    eager, compiled = (full, twin) if whole else (full.objective, twin.objective)
    counter = CompileCounterWithBackend("aot_eager")
    dynamo.reset()
    try:
        runs = {"eager": (eager, eager), "compiled": (compiled, torch.compile(compiled, backend=counter))}
        optimizers = {name: _optimizer(module) for name, (module, _) in runs.items()}
        storage = {(name, n): b.untyped_storage().data_ptr() for name, (module, _) in runs.items()
                   for n, b in module.named_buffers()}
        for index, step in enumerate(setup.steps):
            results = {}
            for name, (module, fn) in runs.items():
                if index == 2:  # a new epoch: epoch-dependent factors (DKD's warm-up) change in place
                    (module.objective if whole else module).start_epoch(5)
                with dynamo.config.patch(error_on_recompile=index > 0):
                    results[name] = _train_step(module, fn, optimizers[name], step, whole)
            ours, ref = results["compiled"], results["eager"]
            assert ours.keys() == ref.keys(), f"{case.id} step {index}"
            for key, value in ref.items():
                torch.testing.assert_close(ours[key], value, **TOL, msg=lambda m: f"{case.id} step {index} {key}: {m}")
        assert counter.frame_count == 1, f"{case.id}: {counter.frame_count} compiled frames, expected one"
        moved = [f"{name}:{n}" for name, (module, _) in runs.items() for n, b in module.named_buffers()
                 if b.untyped_storage().data_ptr() != storage[name, n]]
        assert not moved, f"{case.id}: buffers replaced instead of updated in place: {moved}"
    finally:
        dynamo.reset()


@pytest.mark.parametrize("case", COMPILED, ids=lambda c: c.id)
def test_compiled_objective_matches_eager_without_recompiling(setup: Setup, case: Case) -> None:
    _compiled_matches_eager(setup, case, whole=False)


@pytest.mark.parametrize("case", WHOLE_STEP, ids=lambda c: c.id)
def test_compiled_whole_step_matches_eager_without_recompiling(setup: Setup, case: Case) -> None:
    _compiled_matches_eager(setup, case, whole=True)


def test_cases_cover_every_method_and_memory() -> None:
    assert {c.method for c in CASES} == set(list_methods())
    kinds = {(c.options.get("rrd", {}).get("memory", "fifo") if "rrd" in c.options else "contrast", c.sharding)
             for c in CASES if {"rrd", "crd"} & set(c.options)}
    assert kinds >= {("fifo", "local"), ("fifo", "sharded"), ("fifo", "replicated"), ("momentum", "local"),
                     ("contrast", "local"), ("contrast", "sharded")}


# ----------------------------------------------------------------------------- 2 processes
# With two ranks the sharded memories talk to each other inside the step: the FIFO's shard writes and
# all-gathers, the banks' fixed-shape entries (the index exchange of eager steps cannot compile) and
# all-reduced statistics. Each rank checks one graph, then compiled (static entries) against eager (the
# exchange) for three steps of its half of the global batches.
SHARDED = [c for c in CASES if c.sharding == "sharded"]


def _two_rank_worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    failures = []
    try:
        setup = _make_setup(rank, 2)
        for case in SHARDED:
            step, objective = setup.steps[0], _module(setup, case).objective
            for check in (lambda: _assert_one_graph(f"{case.id}, 2 ranks", objective, _leaves(step.student_out),
                                                    _teacher(objective, step), step.batch),
                          lambda: _compiled_matches_eager(setup, case, whole=False)):
                try:
                    check()
                except AssertionError as exc:
                    failures.append(f"rank {rank}: {exc}")
    finally:
        dist.destroy_process_group()
    (Path(out) / f"rank{rank}.txt").write_text("\n".join(failures))


def test_sharded_memories_compile_whole_across_two_ranks(tmp_path: Path) -> None:
    run_ranks(_two_rank_worker, str(tmp_path))
    assert len(SHARDED) >= 4  # FIFO (both presets), momentum banks, CRD's banks
    failures = [f for r in range(2) for f in (tmp_path / f"rank{r}.txt").read_text().splitlines() if f]
    assert not failures, "\n".join(failures)
