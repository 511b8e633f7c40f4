"""Two-process training through the real `accelerate launch --multi_gpu` on CPU (gloo).

A 2-process run and a 1-process run of the same config must hold the same queue (its
content depends only on the frozen teacher and the data order, not on the student), and
each must resume on the other number of processes with its state re-split: the queue
after the resumed epoch is checked against one built directly from the teacher's keys.
The launcher trap (`--multi_gpu` without ACCELERATE_USE_CPU on a machine without GPUs
starts independent single-process trainings) is checked to stop with an explanation.
Launches run in the background while the in-process runs train, to keep the wall time down.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from spawned import free_port

from pipelines.synthetic import write_fashion_mnist
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.config import load_config
from rrd_fast.data import build_data
from rrd_fast.memory import unit_rows
from rrd_fast.models import create_model
from rrd_fast.memory.resume import MEMORY_DIR
from rrd_fast.checkpoint import load_teacher
from rrd_fast.trainer import RESUME_FILE, Trainer

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "rrd_fast" / "train.py")
K = 512  # > the 192 keys of an epoch, so the pointer and the first epoch's keys matter after resuming
N_TRAIN, BATCH = 192, 64
QUEUE_KEY = "objective.terms.rrd.memory.queue"
SIDECAR = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
           "normalization": {"mean": [0.2860], "std": [0.3530]}}
PROBE = """
from accelerate import Accelerator
from rrd_fast.cli import run_cli
from rrd_fast.trainer import check_launch

raise SystemExit(run_cli(lambda: check_launch(Accelerator()) or 0))
"""


def _launch(args: list[str], cwd: Path, use_cpu: bool = True) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    if use_cpu:
        env["ACCELERATE_USE_CPU"] = "true"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(free_port()), *args]
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"launch timed out: {err[-2000:]}")
    return proc.returncode, out + err


def _queue(run: Path) -> tuple[torch.Tensor, dict]:
    """The union of a run's queue shards, in rank order, and its main resume file."""
    state = torch.load(run / RESUME_FILE, weights_only=True)
    files = sorted((run / MEMORY_DIR).glob("*.safetensors"))
    assert [f.name for f in files] == [f"{state['memory_tag']}-rank{r:05d}.safetensors"
                                       for r in range(state["memory_world_size"])]  # stale shards removed
    shards = [load_file(str(f))[QUEUE_KEY] for f in files]
    return torch.cat(shards), state | {"shard_rows": [len(s) for s in shards]}


def _teacher_keys(run: Path, epochs: int) -> torch.Tensor:
    """The teacher's keys of every global batch in order, computed directly (no trainer, no memory)."""
    cfg = load_config(run / "config.yaml")
    state = torch.load(run / RESUME_FILE, weights_only=True)["module"]
    teacher, _ = load_teacher(cfg.teacher.checkpoint, "", 10, 1)
    data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    w, b = state["objective.terms.rrd.embed_t.weight"], state["objective.terms.rrd.embed_t.bias"]
    with torch.no_grad():
        return torch.cat([F.normalize(teacher(batch.images, features=True).pooled @ w.t() + b, dim=1)
                          for epoch in range(epochs) for batch in data.train.epoch(epoch)])


def _expected_queue(keys: torch.Tensor, seed: int, steps: int) -> tuple[torch.Tensor, int]:
    """The queue after `steps` global batches: their keys written in order over the initial rows."""
    queue = unit_rows(seed, 0, K, 128)
    queue[: steps * BATCH] = keys[: steps * BATCH]
    return queue, steps * BATCH % K


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("launch")
    data = write_fashion_mnist(root / "fmnist", n_train=N_TRAIN, n_test=64, gz=True, seed=0)
    torch.manual_seed(7)
    teacher = root / "teacher"
    write_model_checkpoint(teacher, create_model("resnet8", num_classes=10, in_channels=1), SIDECAR)
    args = [f"output_dir={root / 'runs'}", "data.format=fashion_mnist", f"data.root={data}", f"data.batch_size={BATCH}",
            "data.eval_batch_size=64", "student.arch=resnet8", "train.progress=false", f"teacher.checkpoint={teacher}",
            "method.name=rrd", "method.beta=1.0", f"method.options={{rrd: {{queue_size: {K}}}}}", "optim.epochs=1"]
    (root / "probe.py").write_text(PROBE)
    # Phase 1, in the background: 2-process training, and the launcher trap; meanwhile 1 process in here.
    two = _launch([TRAIN, *args, "name=two"], root)
    trap = _launch([str(root / "probe.py")], root, use_cpu=False)
    Trainer(load_config(None, [*args, "name=one"])).fit()
    results = {"root": root, "two": _finish(two), "trap": _finish(trap)}
    runs = root / "runs"
    assert results["two"][0] == 0, results["two"][1][-3000:]
    shutil.copytree(runs / "one", runs / "one_epoch1")
    shutil.copytree(runs / "two", runs / "two_epoch1")
    # Phase 2: the 1-process run continues on 2 processes (background), the 2-process run on 1 (here).
    grow = _launch([TRAIN, "--resume", str(runs / "one"), "optim.epochs=2"], root)
    shrunk = Trainer(load_config(runs / "two" / "config.yaml", ["optim.epochs=2"]), resume=True)
    results["resumed_state"] = {k: v.clone() for k, v in shrunk.unwrapped.state_dict().items()}
    results["resumed_epoch"] = (shrunk.state.epoch, shrunk.state.global_step)
    shrunk.fit()
    results["grow"] = _finish(grow)
    # Both runs share seed, data, teacher and the fixed random projection embed_t.
    results["keys"] = _teacher_keys(runs / "two", epochs=2)
    return results


def test_multi_gpu_launch_without_cpu_flag_on_a_cpu_machine_is_refused(setup: dict) -> None:
    code, output = setup["trap"]
    assert code != 0
    assert "launched 2 processes but each sees world size 1" in output and "ACCELERATE_USE_CPU=true" in output


def test_two_processes_hold_half_the_queue_each_and_the_same_queue_as_one(setup: dict) -> None:
    runs = setup["root"] / "runs"
    one, one_state = _queue(runs / "one_epoch1")
    two, two_state = _queue(runs / "two_epoch1")
    assert one_state["memory_world_size"] == 1 and two_state["memory_world_size"] == 2
    assert two_state["shard_rows"] == [K // 2, K // 2]  # no rank ever saved (or held) all K rows
    expected, ptr = _expected_queue(setup["keys"], 0, N_TRAIN // BATCH)
    assert ptr == N_TRAIN
    for queue, state in ((one, one_state), (two, two_state)):
        assert int(state["module"]["objective.terms.rrd.memory.ptr"]) == ptr
        torch.testing.assert_close(queue, expected, rtol=0, atol=1e-4)
    records = [json.loads(line) for line in (runs / "two_epoch1" / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["loss_rrd"] > 0 and 0 <= records[0]["top1"] <= 100
    # DDP keeps broadcast_buffers=False (per-rank memories) without its deprecation warning on every rank
    assert "broadcast_buffers" not in setup["two"][1], setup["two"][1][-2000:]


def test_two_process_state_resumes_identically_in_one_process(setup: dict) -> None:
    runs = setup["root"] / "runs"
    saved, saved_state = _queue(runs / "two_epoch1")
    loaded = setup["resumed_state"]
    assert setup["resumed_epoch"] == (1, N_TRAIN // BATCH)
    assert torch.equal(loaded[QUEUE_KEY], saved)  # the two shards, re-joined
    for key, value in saved_state["module"].items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("run", ["two", "one"])
def test_resumed_runs_continue_with_the_right_queue(setup: dict, run: str) -> None:
    """two: 2 processes then 1 (in process); one: 1 process then 2 (launched)."""
    if run == "one":
        assert setup["grow"][0] == 0, setup["grow"][1][-3000:]
    runs = setup["root"] / "runs"
    queue, state = _queue(runs / run)
    assert state["memory_world_size"] == (1 if run == "two" else 2)
    assert (state["epoch"], state["global_step"]) == (2, 2 * N_TRAIN // BATCH)
    expected, ptr = _expected_queue(setup["keys"], 0, 2 * N_TRAIN // BATCH)
    assert int(state["module"]["objective.terms.rrd.memory.ptr"]) == ptr == 2 * N_TRAIN
    torch.testing.assert_close(queue, expected, rtol=0, atol=1e-4)
    records = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
