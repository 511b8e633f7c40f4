"""Exact RRD across processes: 2 gloo ranks under real DDP against 1 process, step after step.

One process computes the single-process reference trajectories (plain FifoQueue and
MomentumMemory, the whole global batch); two processes spawned with torch.multiprocessing
run the same steps with sharded (and replicated) memories, each on its half of every
global batch, and record losses, DDP-averaged gradients and their memory rows. Resume
state is written per rank and re-split: 2 ranks -> 1 process and 1 process -> 2 ranks.

The student is a real resnet8 with BatchNorm in eval mode, so that per-sample outputs do
not depend on how the batch is split (train-mode BN statistics would differ by design).
Every run applies the reference's gradient in its optimizer step after recording its own:
the states then stay equal, and each step compares the loss and gradient computed from the
same state. Free-running, float32 rounding (batch splits, thread counts) can flip a ReLU
somewhere after a few steps and move a gradient by more than 1e-5 for reasons that have
nothing to do with the memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
from spawned import run_ranks
from torch import nn

from pipelines.batch import Batch
from pipelines.sampler import EpochSampler
from rrd_fast.memory.collectives import row_range
from rrd_fast.memory import unit_rows
from rrd_fast.memory.momentum import NegativeSampler
from rrd_fast.methods import NetInfo, TermContext
from rrd_fast.methods.rrd import RRD, RRDOptions
from rrd_fast.models import ModelOutput, create_model
from rrd_fast.memory.resume import load_rank_shards, memory_shards, write_rank_shards

WORLD = 2
STEPS = 20
SAVE_AT = 10
BATCH = 16  # global
N_SAMPLES = 64
N_CLASSES = 4
TOL = 1e-5


@dataclass(frozen=True)
class Job:
    name: str
    preset: str
    memory: str
    size: int  # fifo: queue rows (255 does not split evenly over 2 ranks); momentum: negatives per sample
    sharding: str = "sharded"
    steps: int = STEPS
    static: bool = False  # sharded banks: the fixed-shape path compiled steps take


JOBS = [
    Job("fifo_paper", "paper", "fifo", 255),
    Job("fifo_2025", "2025", "fifo", 256),
    Job("momentum", "paper", "momentum", 24),
    Job("momentum_static", "paper", "momentum", 24, static=True),
    Job("fifo_replicated", "paper", "fifo", 255, sharding="replicated", steps=5),
]
RESHARD_JOBS = ["fifo_paper", "momentum"]
LABELS = np.arange(N_SAMPLES) % N_CLASSES


class Net(nn.Module):
    """A real student plus the real RRD term; the teacher's pooled features come in as tensors."""

    def __init__(self, job: Job, world_size: int, sharding: str) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = create_model("resnet8", num_classes=10, in_channels=3).eval()
        self.student.fc.requires_grad_(False)  # only the RRD loss trains here; DDP wants every trained parameter used
        opts = RRDOptions(preset=job.preset, queue_size=job.size, feat_dim=32, memory=job.memory)  # type: ignore[arg-type]
        context = TermContext(N_SAMPLES, seed=5, world_size=world_size, memory_sharding=sharding, train_labels=LABELS)
        self.rrd = RRD(opts, NetInfo("resnet8", 10, 64, (16, 32, 64)), NetInfo("t", 10, 48, (8,)), context)

    def forward(self, images: torch.Tensor, teacher_pooled: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = self.student(images, features=True)
        teacher = ModelOutput(logits=torch.zeros(len(images), 10), pooled=teacher_pooled)
        return self.rrd(out, teacher, batch)


def global_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Images, teacher features and sample indices of global step `step` (epochs are permutations)."""
    g = torch.Generator().manual_seed(1000 + step)
    epoch, pos = divmod(step * BATCH, N_SAMPLES)
    order = torch.randperm(N_SAMPLES, generator=torch.Generator().manual_seed(epoch))
    return torch.randn(BATCH, 3, 16, 16, generator=g), torch.randn(BATCH, 48, generator=g), order[pos : pos + BATCH]


def run_steps(net: nn.Module, opt: torch.optim.Optimizer, first: int, last: int, rank: int, world_size: int,
              forced: list[torch.Tensor] | None = None) -> dict[str, list]:
    """Steps first..last-1 on this rank's contiguous slice of each global batch (as EpochSampler slices).

    `forced`: the reference's gradient per step, applied instead of the recorded one.
    """
    per = BATCH // world_size
    record: dict[str, list] = {"loss": [], "grad": []}
    params = [p for p in net.parameters() if p.requires_grad]
    for step in range(first, last):
        images, feats, index = (t[rank * per : (rank + 1) * per] for t in global_batch(step))
        batch = Batch(images=images, labels=torch.as_tensor(LABELS)[index], index=index, aug=torch.zeros(per, 3), epoch=0)
        opt.zero_grad(set_to_none=True)
        loss = net(images, feats, batch)
        loss.backward()
        record["loss"].append(loss.detach().clone())
        record["grad"].append(torch.cat([p.grad.reshape(-1) for p in params]).clone())
        if forced is not None:
            for p, g in zip(params, forced[step].split([p.numel() for p in params])):
                p.grad.copy_(g.view_as(p))
        opt.step()
    return record


def make(job: Job, world_size: int, sharding: str) -> tuple[Net, torch.optim.Optimizer]:
    net = Net(job, world_size, sharding)
    if job.static:
        net.rrd.memory.static_exchange = True
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.05, momentum=0.9, weight_decay=5e-4)
    return net, opt


def save_state(folder: Path, net: Net, opt: torch.optim.Optimizer, rank: int, world_size: int) -> None:
    """As the trainer does: each rank writes its memory rows, rank 0 the rest."""
    write_rank_shards(folder, "s", net, rank, world_size)
    if rank == 0:
        rows = set(memory_shards(net))
        torch.save({"module": {k: v for k, v in net.state_dict().items() if k not in rows}, "opt": opt.state_dict()},
                   folder / "state.pt")


def load_state(folder: Path, saved_world: int, net: Net, opt: torch.optim.Optimizer, rank: int, world_size: int) -> None:
    payload = torch.load(folder / "state.pt", weights_only=True)
    missing, unexpected = net.load_state_dict(payload["module"], strict=False)
    assert not unexpected and all(k.startswith("rrd.memory.") for k in missing), (missing, unexpected)
    opt.load_state_dict(payload["opt"])
    load_rank_shards(folder, "s", saved_world, net, rank, world_size)


def memory_rows(net: nn.Module) -> dict[str, torch.Tensor]:
    mem = net.rrd.memory
    return {name: getattr(mem, name).detach().clone() for name in mem.row_shards()} | \
           {name: buf.detach().clone() for name, buf in mem.named_buffers() if name in ("ptr", "draws")}


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        out_dir = Path(out)
        forced = torch.load(out_dir / "reference_grads.pt", weights_only=True)
        results: dict[str, Any] = {}
        for job in JOBS:
            net, opt = make(job, WORLD, job.sharding)
            ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
            if job.name in RESHARD_JOBS:
                rec = run_steps(ddp, opt, 0, SAVE_AT, rank, WORLD, forced[job.name])
                save_state(out_dir / f"{job.name}-w2", net, opt, rank, WORLD)
                more = run_steps(ddp, opt, SAVE_AT, job.steps, rank, WORLD, forced[job.name])
                rec = {k: rec[k] + more[k] for k in rec}
            else:
                rec = run_steps(ddp, opt, 0, job.steps, rank, WORLD, forced[job.name])
            results[job.name] = {**rec, "rows": memory_rows(net)}
        for name in RESHARD_JOBS:  # 1 -> 2: continue the single-process state on two ranks
            job = next(j for j in JOBS if j.name == name)
            net, opt = make(job, WORLD, "sharded")
            load_state(out_dir / f"{name}-w1", 1, net, opt, rank, WORLD)
            ddp = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False)
            rec = run_steps(ddp, opt, SAVE_AT, job.steps, rank, WORLD, forced[name])
            results[f"{name}_from_w1"] = {**rec, "rows": memory_rows(net)}
        torch.save(results, out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dist")
    reference: dict[str, Any] = {}
    for job in JOBS:  # single process: plain memories, the whole global batch
        net, opt = make(job, 1, "local")
        if job.name in RESHARD_JOBS:
            rec = run_steps(net, opt, 0, SAVE_AT, 0, 1)
            save_state(out / f"{job.name}-w1", net, opt, 0, 1)
            more = run_steps(net, opt, SAVE_AT, job.steps, 0, 1)
            rec = {k: rec[k] + more[k] for k in rec}
        else:
            rec = run_steps(net, opt, 0, job.steps, 0, 1)
        reference[job.name] = {**rec, "rows": memory_rows(net)}
    torch.save({name: ref["grad"] for name, ref in reference.items()}, out / "reference_grads.pt")
    run_ranks(_worker, str(out), nprocs=WORLD)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    resumed: dict[str, Any] = {}
    for name in RESHARD_JOBS:  # 2 -> 1: continue the two ranks' state in one process
        job = next(j for j in JOBS if j.name == name)
        net, opt = make(job, 1, "local")
        load_state(out / f"{name}-w2", WORLD, net, opt, 0, 1)
        resumed[name] = {**run_steps(net, opt, SAVE_AT, job.steps, 0, 1, reference[name]["grad"]), "rows": memory_rows(net)}
    return {"reference": reference, "ranks": ranks, "resumed": resumed}


def _assert_trajectory(ref: dict, ranks: list[dict], first: int, label: str) -> None:
    """Global loss and DDP-averaged gradients within TOL of the reference at every step."""
    steps = len(ranks[0]["loss"])
    assert steps == len(ref["loss"]) - first and steps > 0
    worst_loss = worst_grad = 0.0
    for i in range(steps):
        global_loss = sum(float(r["loss"][i]) for r in ranks) / len(ranks)  # what the trainer logs
        worst_loss = max(worst_loss, abs(global_loss - float(ref["loss"][first + i])))
        assert worst_loss <= TOL, f"{label} step {first + i}: loss differs by {worst_loss:.2e}"
        for r in ranks:  # DDP leaves the same averaged gradient on every rank
            diff = float((r["grad"][i] - ref["grad"][first + i]).abs().max())
            worst_grad = max(worst_grad, diff)
            assert diff <= TOL, f"{label} step {first + i}: student gradient differs by {diff:.2e}"
    print(f"{label}: {steps} steps, max |loss diff| {worst_loss:.1e}, max |grad diff| {worst_grad:.1e}")


def _union(ranks: list[dict], name: str) -> torch.Tensor:
    return torch.cat([r["rows"][name] for r in ranks])


@pytest.mark.parametrize("name", ["fifo_paper", "fifo_2025"])
def test_sharded_queue_matches_one_process_loss_and_gradients(runs: dict, name: str) -> None:
    ref, ranks = runs["reference"][name], [r[name] for r in runs["ranks"]]
    assert len(ref["loss"]) >= 20
    _assert_trajectory(ref, ranks, 0, name)
    # The gradients are not trivially zero or equal across steps: the test can fail.
    assert float(ref["grad"][-1].abs().max()) > 1e-3 and not torch.equal(ref["grad"][0], ref["grad"][1])


@pytest.mark.parametrize("name", ["fifo_paper", "fifo_2025"])
def test_union_of_shards_is_the_single_process_queue(runs: dict, name: str) -> None:
    ref, ranks = runs["reference"][name], [r[name] for r in runs["ranks"]]
    size = ref["rows"]["queue"].shape[0]
    shapes = [r["rows"]["queue"].shape[0] for r in ranks]
    assert shapes == [b - a for a, b in (row_range(size, WORLD, r) for r in range(WORLD))]  # K/W rows each, never K
    torch.testing.assert_close(_union(ranks, "queue"), ref["rows"]["queue"], rtol=0, atol=1e-6)
    assert all(int(r["rows"]["ptr"]) == int(ref["rows"]["ptr"]) == (STEPS * BATCH) % size for r in ranks)
    # After 20 steps of 16 keys the queue has wrapped; its rows are keys, not the initial rows.
    assert not torch.allclose(ref["rows"]["queue"], unit_rows(5, 0, size, 32))


def test_replicated_queue_matches_one_process(runs: dict) -> None:
    ref, ranks = runs["reference"]["fifo_replicated"], [r["fifo_replicated"] for r in runs["ranks"]]
    _assert_trajectory(ref, ranks, 0, "replicated")
    for r in ranks:
        torch.testing.assert_close(r["rows"]["queue"], ref["rows"]["queue"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["momentum", "momentum_static"])
def test_sharded_momentum_memory_matches_unsharded(runs: dict, name: str) -> None:
    ref, ranks = runs["reference"][name], [r[name] for r in runs["ranks"]]
    _assert_trajectory(ref, ranks, 0, name)
    assert [r["rows"]["bank_s"].shape[0] for r in ranks] == [N_SAMPLES // WORLD] * WORLD
    for bank in ("bank_s", "bank_t"):
        torch.testing.assert_close(_union(ranks, bank), ref["rows"][bank], rtol=0, atol=TOL)
        torch.testing.assert_close(ref["rows"][bank].norm(dim=1), torch.ones(N_SAMPLES))
    assert all(int(r["rows"]["draws"]) == STEPS for r in ranks)


@pytest.mark.parametrize("name", RESHARD_JOBS)
def test_resume_from_two_ranks_into_one_continues_identically(runs: dict, name: str) -> None:
    ref, resumed = runs["reference"][name], runs["resumed"][name]
    _assert_trajectory(ref, [resumed], SAVE_AT, f"{name} 2->1")
    for key, value in ref["rows"].items():
        torch.testing.assert_close(resumed["rows"][key], value, rtol=0, atol=TOL)


@pytest.mark.parametrize("name", RESHARD_JOBS)
def test_resume_from_one_process_into_two_ranks_continues_identically(runs: dict, name: str) -> None:
    ref, ranks = runs["reference"][name], [r[f"{name}_from_w1"] for r in runs["ranks"]]
    _assert_trajectory(ref, ranks, SAVE_AT, f"{name} 1->2")
    for key in ("queue", "bank_s", "bank_t"):
        if key in ref["rows"]:
            torch.testing.assert_close(_union(ranks, key), ref["rows"][key], rtol=0, atol=TOL)


def test_negatives_come_from_other_classes_and_depend_only_on_sample_and_step() -> None:
    labels = np.repeat(np.arange(5), [3, 10, 1, 7, 9])
    sampler = NegativeSampler(labels, negatives=400, seed=1)
    index = torch.arange(len(labels))
    drawn = sampler.draw(index, draw=3)
    assert torch.equal(drawn[:, 0], index)
    lab = torch.as_tensor(labels)
    assert bool((lab[drawn[:, 1:]] != lab[:, None]).all())
    # Every other-class sample is reachable (uniform over N - n_c), and the draw is per sample.
    assert set(drawn[0, 1:].tolist()) == set(np.flatnonzero(labels != labels[0]).tolist())
    assert torch.equal(sampler.draw(index[[7, 2]], draw=3), drawn[[7, 2]])
    assert not torch.equal(sampler.draw(index, draw=4), drawn)


def test_each_rank_gets_a_disjoint_contiguous_slice_of_every_global_batch() -> None:
    one = EpochSampler(200, 24, seed=3, rank=0, world_size=1)
    two = [EpochSampler(200, 12, seed=3, rank=r, world_size=2) for r in range(2)]
    for epoch in range(2):
        for whole, *parts in zip(one.batches(epoch), *(s.batches(epoch) for s in two)):
            assert np.array_equal(np.concatenate(parts), whole)


def test_row_ranges_tile_the_rows() -> None:
    for total, world in ((255, 2), (10, 3), (7, 7), (1_281_167, 8)):
        ranges = [row_range(total, world, r) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == total
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        assert max(b - a for a, b in ranges) - min(b - a for a, b in ranges) <= 1


def test_initial_rows_of_any_range_match_the_whole() -> None:
    whole = unit_rows(9, 0, 10_000, 8)
    assert torch.equal(torch.cat([unit_rows(9, a, b, 8) for a, b in ((0, 4095), (4095, 4097), (4097, 10_000))]), whole)



def test_trainer_runs_and_resumes_the_momentum_memory(tmp_path: Path) -> None:
    """The trainer hands the training labels to the memory and saves/restores both banks."""
    from pipelines.synthetic import write_fashion_mnist
    from rrd_fast.checkpoint import write_model_checkpoint
    from rrd_fast.config import load_config
    from rrd_fast.trainer import Trainer

    data = write_fashion_mnist(tmp_path / "fm", n_train=96, n_test=32, gz=False, seed=1)
    torch.manual_seed(3)
    write_model_checkpoint(tmp_path / "teacher", create_model("resnet8", num_classes=10, in_channels=1),
                           {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
                            "normalization": {"mean": [0.286], "std": [0.353]}})
    args = [f"output_dir={tmp_path}", "name=mom", "data.format=fashion_mnist", f"data.root={data}", "data.batch_size=32",
            "student.arch=resnet8", "train.progress=false", f"teacher.checkpoint={tmp_path / 'teacher'}", "method.name=rrd",
            "method.beta=1.0", "method.options={rrd: {memory: momentum, queue_size: 40}}", "optim.epochs=1"]
    first = Trainer(load_config(None, args))
    memory = first.unwrapped.objective.terms["rrd"].memory
    initial = memory.bank_t.clone()
    first.fit()
    assert int(memory.draws) == 3 and not torch.allclose(memory.bank_t, initial)  # every sample visited once
    resumed = Trainer(load_config(tmp_path / "mom" / "config.yaml", ["optim.epochs=2"]), resume=True)
    again = resumed.unwrapped.objective.terms["rrd"].memory
    for name in ("bank_s", "bank_t", "draws"):
        assert torch.equal(getattr(again, name), getattr(memory, name)), name


def test_resume_refuses_memory_of_another_size(tmp_path: Path) -> None:
    from rrd_fast.checkpoint import CheckpointError
    from rrd_fast.memory import FifoQueue

    write_rank_shards(tmp_path, "t", FifoQueue(8, 4), 0, 1)
    with pytest.raises(CheckpointError, match="queue has 8 rows in the resume state, this run has 10"):
        load_rank_shards(tmp_path, "t", 1, FifoQueue(10, 4), 0, 1)
    with pytest.raises(CheckpointError, match="memory shard of the resume state is missing"):
        load_rank_shards(tmp_path, "t", 2, FifoQueue(8, 4), 0, 1)


def test_paper_figures_follow_from_the_formulas(capsys: pytest.CaptureFixture[str]) -> None:
    from rrd_fast.bench.__main__ import main
    from rrd_fast.bench.memory import comm_bytes_per_step, state_bytes_per_rank

    assert state_bytes_per_rank("replicated", "momentum", 1_281_167, 8) == 2 * 1_281_167 * 128 * 4  # CRD's 1.3 GB
    assert state_bytes_per_rank("sharded", "momentum", 1_281_167, 64) == 2 * 1_281_167 * 128 * 4 / 64
    assert comm_bytes_per_step("sharded", "fifo", 512, 1) == 0 and comm_bytes_per_step("local", "fifo", 512, 8) == 0
    assert main(["memory", "--paper"]) == 0
    out = capsys.readouterr().out
    assert "| momentum banks 2xNxD | 8 | 156.4 MiB | 1.22 GiB |" in out and "K_max" in out
