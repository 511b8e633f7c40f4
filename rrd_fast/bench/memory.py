"""Benchmark of the RRD memory across processes: memory per rank, loss and step time.

    python -m rrd_fast.bench memory            # CPU, 1 and 2 processes, K in {16384, 65536, 262144}
    python -m rrd_fast.bench memory --paper    # ImageNet-scale figures from the formulas only

Measured: the per-rank bytes of the memory's state, the median time of the RRD loss alone
(forward and backward of the memory's loss on given embeddings) and of a whole training
step (student forward/backward under DDP, RRD term, SGD step; teacher features come in
precomputed, as from the teacher cache, since the teacher's cost does not depend on the
memory). Two processes run on gloo, spawned here; the CPU's cores are split between them.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipelines.batch import Batch
from rrd_fast.bench.common import CHANNELS, IMAGE_SIZE, NUM_CLASSES, write_json
from rrd_fast.memory import MemorySpec, build_memory
from rrd_fast.methods import NetInfo, TermContext
from rrd_fast.methods.rrd import RRD, RRDOptions
from rrd_fast.models import ModelOutput, create_model

HELP = "RRD memory across processes: bytes per rank, loss and step time, traffic"
FLOAT = 4  # bytes; memories are float32


# ----------------------------------------------------------------------------- formulas
def comm_bytes_per_step(mode: str, kind: str, global_batch: int, world_size: int, dim: int = 128,
                        negatives: int = 16384) -> float:
    """Bytes each rank receives per step for the memory (ring collectives, float32 embeddings).

    sharded: all-gather z_s and z_t, all-reduce 2 maxima and 3 sums per sample, all-gather the
    per-sample gradient, reduce-scatter dL/dz_s; momentum adds the all-gathered sample indices
    (int64) and the routed row indices of the K+1 drawn entries per sample (int32) with their
    per-sample counts. replicated: all-gather what updates the memory (z_t; momentum: z_s, z_t,
    indices). local: nothing.
    """
    if world_size == 1 or mode == "local":
        return 0.0
    f = (world_size - 1) / world_size
    b = global_batch
    if mode == "sharded":
        total = f * b * (3 * dim * FLOAT + 2 * 5 * FLOAT + FLOAT)
        if kind == "momentum":
            total += f * b * (8 + (negatives + 1) / world_size * 4 + 4)
        return total
    return f * b * (dim * FLOAT if kind == "fifo" else 2 * dim * FLOAT + 8)


def state_bytes_per_rank(mode: str, kind: str, rows: int, world_size: int, dim: int = 128) -> float:
    """Bytes of memory state on one rank: K (fifo) or 2N (momentum: two banks) rows of D floats."""
    total = rows * dim * FLOAT * (2 if kind == "momentum" else 1)
    return total / world_size if mode == "sharded" else total


def loss_transient_bytes(mode: str, kind: str, per_rank_batch: int, k: int, dim: int = 128) -> float:
    """Approximate peak temporaries of the loss on one rank (the sharded B_global×K/W logits equal b×K).

    fifo: replicated/local keep ~4 b×K float matrices (logits, target, log-softmax, gradient), sharded
    2 (logits of both sides, one kept as the gradient kernel); momentum: unsharded gathers both banks'
    b×(K+1)×D rows, sharded scores its b(K+1) entries in chunks of 65536 and keeps 20 bytes per entry.
    """
    b = per_rank_batch
    if kind == "fifo":
        return (2 if mode == "sharded" else 4) * b * k * FLOAT
    if mode == "sharded":
        return b * (k + 1) * 20 + 2 * 65536 * dim * FLOAT
    return 2 * b * (k + 1) * dim * FLOAT + 2 * b * (k + 1) * FLOAT


def paper_report(per_gpu_batch: int = 256, n: int = 1_281_167, dim: int = 128, gpu_gb: float = 80.0) -> str:
    """ImageNet-scale memory and traffic from the formulas above, and where a replicated queue stops fitting."""
    lines = [f"ImageNet, N = {n:,}, D = {dim}, float32, {per_gpu_batch} images per GPU (global batch = {per_gpu_batch} x W)", ""]
    lines.append("| memory | W | state/rank sharded | state/rank replicated | traffic/step sharded | traffic/step replicated |")
    lines.append("|---|---|---|---|---|---|")
    for kind, rows, label in (("momentum", n, "momentum banks 2xNxD"), ("fifo", 65536, "FIFO K=65536"), ("fifo", n, "FIFO K=N")):
        for w in (8, 64, 256):
            bg = per_gpu_batch * w
            cells = [_mb(state_bytes_per_rank(m, kind, rows, w, dim)) for m in ("sharded", "replicated")]
            cells += [_mb(comm_bytes_per_step(m, kind, bg, w, dim)) for m in ("sharded", "replicated")]
            lines.append(f"| {label} | {w} | " + " | ".join(cells) + " |")
    grads = 2 * 25_557_032 * FLOAT
    lines.append(f"\nFor scale: DDP's gradient all-reduce of a ResNet-50 moves about {_mb(grads)} per rank per step.")
    k = 16384
    lines.append(f"Loss temporaries per rank at K = {k}, {per_gpu_batch}/GPU (independent of W): FIFO sharded "
                 f"{_mb(loss_transient_bytes('sharded', 'fifo', per_gpu_batch, k))}, replicated "
                 f"{_mb(loss_transient_bytes('replicated', 'fifo', per_gpu_batch, k))}; momentum sharded "
                 f"{_mb(loss_transient_bytes('sharded', 'momentum', per_gpu_batch, k))}, unsharded "
                 f"{_mb(loss_transient_bytes('replicated', 'momentum', per_gpu_batch, k))} (gathered rows of both banks)")
    # Fit of a replicated FIFO queue beside a ResNet-50 student on one GPU.
    b = per_gpu_batch
    act_per_img = 28e6 * 2  # ~11.3M conv-output values per 224² image, each kept ~2.5x (BN input, ReLU output), bf16
    student = 3 * 25_557_032 * FLOAT + 1.2 * act_per_img * b + 0.5e9  # weights+grads+momentum, activations +20%, context
    teacher = 2e9  # frozen teacher in inference (or a teacher cache): transient activations only
    free = gpu_gb * 1e9 - student - teacher
    per_row_replicated = 2 * dim * FLOAT + 4 * b * FLOAT  # queue row + out-of-place enqueue copy + ~4 b×K float temporaries
    lines.append(f"\nReplicated FIFO queue beside a ResNet-50 student on an {gpu_gb:.0f} GB GPU, batch {b}/GPU, bf16 activations:")
    lines.append(f"  assumed: student {student / 1e9:.1f} GB (fp32 weights, grads and SGD momentum {3 * 25.56e6 * 4 / 1e9:.2f} GB; "
                 f"~{act_per_img / 1e6:.0f} MB of saved bf16 activations per image +20% allocator slack; 0.5 GB context), "
                 f"teacher {teacher / 1e9:.0f} GB -> {free / 1e9:.1f} GB left for the queue and its loss")
    storage_only = free / (2 * dim * FLOAT) / 1e6
    lines.append(f"  per queue row: {2 * dim * FLOAT} B (row + enqueue copy) + {4 * b * FLOAT} B of b×K loss temporaries "
                 f"-> K_max ≈ {free / per_row_replicated / 1e6:.1f}M rows ({storage_only:.0f}M if the loss were chunked over rows)")
    for w in (8, 64, 256):
        per_row_sharded = 2 * dim * FLOAT / w + 2 * b * FLOAT
        lines.append(f"  sharded over {w}: {2 * dim * FLOAT / w:.0f} B + {2 * b * FLOAT} B per row "
                     f"-> K_max ≈ {free / per_row_sharded / 1e6:.1f}M rows")
    return "\n".join(lines)


def _mb(x: float) -> str:
    """Bytes in the largest binary unit that keeps the number at or above 1."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if x >= scale:
            return f"{x / scale:,.{2 if unit == 'GiB' else 1}f} {unit}"
    return f"{x:.0f} B"


# ----------------------------------------------------------------------------- measurement
class _Step(nn.Module):
    def __init__(self, k: int, world_size: int, mode: str, t_dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.student = create_model("resnet8x4", num_classes=NUM_CLASSES, in_channels=CHANNELS)
        context = TermContext(50_000, seed=0, world_size=world_size, memory_sharding=mode)
        info = NetInfo("resnet8x4", NUM_CLASSES, self.student.pooled_dim, tuple(self.student.stage_channels))
        self.rrd = RRD(RRDOptions(queue_size=k), info, NetInfo("t", NUM_CLASSES, t_dim, (1,)), context)

    def forward(self, images: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, batch: Batch) -> torch.Tensor:
        out = self.student(images, features=True)
        teacher = ModelOutput(logits=torch.zeros_like(out.logits), pooled=feats)
        return F.cross_entropy(out.logits, labels) + self.rrd(out, teacher, batch)


def _measure(rank: int, world_size: int, k: int, mode: str, batch: int, steps: int) -> dict[str, Any]:
    per = batch // world_size
    g = torch.Generator().manual_seed(rank)
    spec = MemorySpec(size=k, dim=128, seed=0, world_size=world_size)
    memory = build_memory("fifo", mode, spec)
    state = sum(getattr(memory, name).numel() * getattr(memory, name).element_size() for name in memory.row_shards())
    dummy = Batch(torch.zeros(per, 1), torch.zeros(per, dtype=torch.long), torch.arange(per), torch.zeros(per, 3), 0)
    loss_times = []
    for i in range(steps + 2):
        z_s = F.normalize(torch.randn(per, 128, generator=g), dim=1).requires_grad_()
        z_t = F.normalize(torch.randn(per, 128, generator=g), dim=1)
        _barrier(world_size)
        t0 = time.perf_counter()
        memory.loss(z_s, z_t, dummy, 0.04, 0.1, "after").mean().backward()
        _barrier(world_size)
        if i >= 2:
            loss_times.append(time.perf_counter() - t0)
    net = _Step(k, world_size, mode, t_dim=256)
    model = nn.parallel.DistributedDataParallel(net, broadcast_buffers=False) if world_size > 1 else net
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    step_times = []
    for i in range(steps + 2):
        images = torch.randn(per, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
        feats, labels = torch.randn(per, 256, generator=g), torch.randint(0, NUM_CLASSES, (per,), generator=g)
        _barrier(world_size)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        model(images, feats, labels, dummy).backward()
        opt.step()
        _barrier(world_size)
        if i >= 2:
            step_times.append(time.perf_counter() - t0)
    return {"world_size": world_size, "mode": mode, "K": k, "state_bytes_per_rank": state,
            "loss_ms": 1e3 * statistics.median(loss_times), "step_ms": 1e3 * statistics.median(step_times),
            "comm_bytes_per_step": comm_bytes_per_step(mode, "fifo", batch, world_size)}


def _barrier(world_size: int) -> None:
    if world_size > 1:
        dist.barrier()


def _threads(world_size: int, threads: int) -> int:
    return threads or max(1, (os.cpu_count() or 1) // world_size)


def _worker(rank: int, world_size: int, port: int, jobs: list[tuple[int, str]], batch: int, steps: int, threads: int,
            out: str) -> None:
    torch.set_num_threads(_threads(world_size, threads))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        results = [_measure(rank, world_size, k, mode, batch, steps) for k, mode in jobs]
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def run(sizes: list[int], procs: list[int], modes: list[str], batch: int, steps: int, scratch: Path,
        threads: int = 0) -> list[dict[str, Any]]:
    """Measure every (processes, mode, K); `threads` per process (0: the cores split evenly)."""
    rows: list[dict[str, Any]] = []
    for w in procs:
        if w == 1:
            torch.set_num_threads(_threads(1, threads))
            rows += [_measure(0, 1, k, "local", batch, steps) for k in sizes]
            continue
        jobs = [(k, mode) for mode in modes for k in sizes]
        out = scratch / f"bench_w{w}.json"
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_worker, args=(w, port, jobs, batch, steps, threads, str(out)), nprocs=w, start_method="spawn")
        rows += json.loads(out.read_text())
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| processes | memory | K | state/rank | loss fwd+bwd (median) | whole step (median) | memory traffic/step/rank |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['world_size']} | {r['mode']} | {r['K']} | {_mb(r['state_bytes_per_rank'])} | "
                     f"{r['loss_ms']:.1f} ms | {r['step_ms']:.1f} ms | {_mb(r['comm_bytes_per_step'])} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", default="16384,65536,262144", help="queue sizes K, comma-separated")
    parser.add_argument("--procs", default="1,2", help="process counts, comma-separated")
    parser.add_argument("--modes", default="sharded,replicated", help="sharding modes measured with more than one process")
    parser.add_argument("--batch", type=int, default=64, help="global batch size")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per configuration (after 2 warm-up steps)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per process (default: the cores split evenly)")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    parser.add_argument("--paper", action="store_true", help="only print the ImageNet-scale figures from the formulas")


def command(args: argparse.Namespace) -> int:
    """`python -m rrd_fast.bench memory`: the table (or, with --paper, the formulas at ImageNet scale)."""
    if args.paper:
        print(paper_report())
        return 0
    sizes = [int(s) for s in args.sizes.split(",")]
    procs = [int(p) for p in args.procs.split(",")]
    scratch = Path(os.environ.get("TMPDIR", "/tmp"))
    rows = run(sizes, procs, args.modes.split(","), args.batch, args.steps, scratch, args.threads)
    print(f"CPU, {os.cpu_count()} cores, global batch {args.batch}, resnet8x4 student, D=128, float32, "
          f"threads per process: {args.threads or 'cores / processes'}")
    print(format_table(rows))
    if args.json:
        write_json(args.json, rows)
    return 0
