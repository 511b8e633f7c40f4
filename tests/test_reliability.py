"""Reliability under real faults: a launcher killed with SIGKILL, a folder the run cannot write,
a disk that fills up during a checkpoint, temporaries a killed write left, and a SIGTERM that
reaches only one of two ranks.

Every fault is produced for real: the launcher is killed, the folder is unwritable for the
process (mode 0555, and as root the child runs without CAP_DAC_OVERRIDE, which is what lets
root write anywhere), the disk is "full" through RLIMIT_FSIZE (writes fail with EFBIG, as they
fail with ENOSPC on a full disk), the signal goes to one worker's pid. Linux only (prctl, /proc).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import torch
from safetensors.torch import load_file

from pipelines.synthetic import write_fashion_mnist
from rrd_fast.atomic import DiskFullError, atomic_path, disk_full_errno
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.models import create_model
from rrd_fast.parent_watch import started_by_launcher
from rrd_fast.train import main as train_main
from rrd_fast.trainer import RESUME_FILE
from test_distributed_launch import _finish, _launch
from test_train import FMNIST_SIDECAR, _assert_one_line_error, _cli, base_args

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl and /proc are Linux's")

REPO = Path(__file__).resolve().parent.parent
TRAIN = str(REPO / "rrd_fast" / "train.py")
PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, PR_SET_CHILD_SUBREAPER = 24, 1, 36
LIMIT = ["data.train_limit=64"]
STEPS = 2  # 64 samples at batch 32


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "RRD_FAST_NO_MALLOC_TUNING": "1"}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_fashion_mnist(tmp_path_factory.mktemp("fmnist"), n_train=256, n_test=32, gz=True, seed=0)


@pytest.fixture(scope="module")
def finished_run(fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete one-epoch run; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("base")
    assert train_main(base_args(fmnist, out, "base") + LIMIT + ["optim.epochs=1"]) == 0
    return out / "base"


def _copy_run(run: Path, to: Path) -> Path:
    shutil.copytree(run, to)
    return to


# ------------------------------------------------------------------ the launcher dies
@contextmanager
def _reaping_orphans() -> Iterator[None]:
    """Make this process the reaper of its orphaned descendants, so that it can wait for a worker
    whose launcher died and read its exit status."""
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _wait_orphan(pid: int, timeout: float) -> int | None:
    """The exit code of `pid` (now our child) once it ends within `timeout` s, else None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    return None


def _kill_unreaped(pid: int) -> None:
    """SIGKILL a child of ours that has not been reaped yet (so its pid cannot have been reused)."""
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def test_only_launched_processes_are_watched() -> None:
    assert started_by_launcher({"LOCAL_RANK": "0"}) and started_by_launcher({"ACCELERATE_DYNAMO_MODE": "default"})
    assert not started_by_launcher({"ACCELERATE_USE_CPU": "true", "PATH": "/bin"})  # users export that one


WATCHED = """
import os, signal, sys, time
from rrd_fast.parent_watch import watch_parent
signal.signal(signal.SIGTERM, lambda *_: os._exit(143))
print(watch_parent(sys.argv[1]), flush=True)
time.sleep(60)
"""
MIDDLE = """
import subprocess, sys, time
child = subprocess.Popen([sys.executable, "-c", sys.argv[1], sys.argv[2]], stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("method,expected", [("auto", "pdeathsig"), ("poll", "poll")])
def test_a_watched_process_gets_sigterm_when_its_parent_is_killed(method: str, expected: str) -> None:
    """Both mechanisms: the kernel's parent-death signal, and the polling thread used off Linux."""
    with _reaping_orphans():
        middle = subprocess.Popen([sys.executable, "-c", MIDDLE, WATCHED, method], stdout=subprocess.PIPE, text=True,
                                  env=_env())
        assert middle.stdout is not None
        pid, how = middle.stdout.readline().split()
        child, code = int(pid), None
        try:
            assert how == expected
            middle.kill()
            middle.wait()
            code = _wait_orphan(child, timeout=10)
        finally:
            if code is None:
                middle.kill()
                middle.wait()
                _kill_unreaped(child)
    assert code == 143


def test_workers_exit_when_their_launcher_is_killed(fmnist: Path, tmp_path: Path) -> None:
    """SIGKILL on `accelerate launch`: its worker checkpoints mid-run, exits 143, releases the lock; resume finishes.
    Its output pipe dies with the launcher (accelerate >= 1.16 reads the worker's stderr through one)."""
    run = tmp_path / "orphan"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", TRAIN,
           *base_args(fmnist, tmp_path, "orphan"), *LIMIT, "optim.epochs=50",
           "train.progress=true"]  # as users run it: progress bars and lines on the launcher's pipe
    log = open(tmp_path / "launch.log", "w")
    with _reaping_orphans():
        env = {k: v for k, v in _env().items() if k != "RRD_FAST_NO_MALLOC_TUNING"}  # the watch comes after the re-exec
        launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
        worker = code = None
        try:
            deadline = time.monotonic() + 240
            while not (run / "metrics.jsonl").exists():  # training is under way
                assert launcher.poll() is None and time.monotonic() < deadline, (tmp_path / "launch.log").read_text()
                time.sleep(0.05)
            worker = json.loads((run / ".lock").read_text())["pid"]
            assert psutil.Process(worker).ppid() == launcher.pid
            launcher.kill()
            launcher.wait()
            killed = time.monotonic()
            code = _wait_orphan(worker, timeout=15)
            took = time.monotonic() - killed
        finally:
            if launcher.poll() is None:  # failed before the kill: end the launch and what it started
                for kid in psutil.Process(launcher.pid).children(recursive=True):
                    kid.kill()
                launcher.kill()
                launcher.wait()
            if worker is not None and code is None:
                _kill_unreaped(worker)
            log.close()
    assert code == 143, (tmp_path / "launch.log").read_text()[-3000:]
    print(f"worker gone {took:.2f} s after its launcher was killed")
    assert not (run / ".lock").exists()  # released, not left for a takeover
    state = torch.load(run / RESUME_FILE, weights_only=True)
    assert 1 <= state["epoch"] < 50
    end = state["epoch"] + 1
    assert train_main(["--resume", str(run), f"optim.epochs={end}"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == list(range(1, end + 1))
    assert json.loads((run / "summary.json").read_text())["epochs"] == end


SPEAKS_INTO_DEAD_PIPES = """
import sys
from tqdm import tqdm
from rrd_fast.cli import keep_going_without_readers
keep_going_without_readers()
for _ in tqdm(range(200), mininterval=0):  # a progress bar on stderr, refreshed at every step
    pass
print("stopped by SIGTERM", file=sys.stderr, flush=True)
print("left in stdout's buffer for the flush at exit")
raise SystemExit(143)
"""


def test_output_to_a_dead_launchers_pipe_is_dropped() -> None:
    """`accelerate launch` pipes its worker's stderr; once it is killed, writes hit EPIPE. The worker must
    go on (a progress bar must not end the step loop) and keep its exit code (not Python's 1 or 120)."""
    ends = [os.pipe() for _ in range(2)]
    for read, _ in ends:
        os.close(read)  # before the child starts: every write it makes finds no reader
    try:
        child = subprocess.run([sys.executable, "-c", SPEAKS_INTO_DEAD_PIPES], stdout=ends[0][1], stderr=ends[1][1],
                               env=_env(), timeout=60)
    finally:
        for _, write in ends:
            os.close(write)
    assert child.returncode == 143


# ------------------------------------------------------------------ folders that cannot be written
def _without_write_override() -> None:
    """preexec_fn: as root, drop CAP_DAC_OVERRIDE from the bounding set, so that after exec the
    child, like any other user, cannot write a folder without write permission."""
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


@contextmanager
def _read_only(folder: Path) -> Iterator[Path]:
    folder.chmod(0o555)
    try:
        probe = subprocess.run([sys.executable, "-c", f"open({str(folder / 'x')!r}, 'w')"],
                               preexec_fn=_without_write_override, capture_output=True, text=True)
        assert probe.returncode == 1 and "PermissionError" in probe.stderr, probe.stderr  # the condition is real
        yield folder
    finally:
        folder.chmod(0o755)


def _train_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, TRAIN, *args], env=_env(), capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_an_unwritable_output_dir_is_refused_before_training(fmnist: Path, tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    with _read_only(ro):
        proc = _train_cli(base_args(fmnist, ro, "run") + ["optim.epochs=1", "train.progress=true"],
                          preexec_fn=_without_write_override)
    _assert_one_line_error(proc.returncode, proc.stderr.strip(), f"{ro}: cannot write the run folder here",
                           "Permission denied")
    assert "data:" not in proc.stdout and not (ro / "run").exists()  # refused before the data was read


def test_resume_in_an_unwritable_run_folder_is_refused(finished_run: Path, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "run")
    before = _sha(run / RESUME_FILE)
    with _read_only(run):
        proc = _train_cli(["--resume", str(run), "optim.epochs=2"], preexec_fn=_without_write_override)
    _assert_one_line_error(proc.returncode, proc.stderr.strip(), f"{run}: cannot write the run folder here")
    assert _sha(run / RESUME_FILE) == before


def test_an_output_dir_that_is_a_file(fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a folder")
    code, err = _cli(base_args(fmnist, tmp_path / "file", "run") + ["optim.epochs=1"], capsys)
    _assert_one_line_error(code, err, f"{tmp_path / 'file'}: a file where a folder of", "output_dir=")
    code, err = _cli(["--resume", str(tmp_path / "file")], capsys)
    _assert_one_line_error(code, err, f"{tmp_path / 'file'}: the run folder is a file")


# ------------------------------------------------------------------ disk full
def test_a_full_device_is_told_from_other_write_failures(tmp_path: Path) -> None:
    """/dev/full fails every write with ENOSPC: the probe behind errno-less failures (torch.save's
    RuntimeError) recognises it, a writable file is not taken for a full disk, and an ENOSPC inside
    atomic_path becomes DiskFullError naming the final file, with the old file intact."""
    assert disk_full_errno(RuntimeError("file write failed"), Path("/dev/full")) == errno.ENOSPC
    assert disk_full_errno(RuntimeError("file write failed"), tmp_path / "partial") is None
    final = tmp_path / "state.bin"
    final.write_bytes(b"previous")
    with pytest.raises(DiskFullError) as full:
        with atomic_path(final) as tmp, open("/dev/full", "wb") as dev:
            tmp.write_bytes(b"half")
            dev.write(b"x" * 8192)
            dev.flush()
    assert full.value.path == final and full.value.errno == errno.ENOSPC and str(final) in str(full.value)
    assert final.read_bytes() == b"previous" and sorted(p.name for p in tmp_path.iterdir()) == ["partial", "state.bin"]


def test_disk_full_during_a_checkpoint_is_one_line_and_the_last_checkpoint_resumes(finished_run: Path,
                                                                                 tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "full")
    weights, state = (run / "model.safetensors").stat().st_size, (run / RESUME_FILE).stat().st_size
    limit = (weights + state) // 2  # the weights still fit, the resume state does not
    assert weights < limit < state
    before = _sha(run / RESUME_FILE)

    def file_size_limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG instead of killing

    proc = _train_cli(["--resume", str(run), "optim.epochs=2"], preexec_fn=file_size_limit)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip() == (
        f"error: {run / RESUME_FILE}: disk full while writing the checkpoint; the last complete checkpoint (epoch 1, "
        f"step {STEPS}) is intact; free space and resume with: python rrd_fast/train.py --resume {run}")
    assert _sha(run / RESUME_FILE) == before
    assert not list(run.rglob(".*.tmp")) and not (run / ".lock").exists()
    assert train_main(["--resume", str(run), "optim.epochs=2"]) == 0
    resumed = torch.load(run / RESUME_FILE, weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (2, 2 * STEPS)


# ------------------------------------------------------------------ temporaries of killed writes
def test_temporaries_of_killed_writes_are_removed_at_resume(finished_run: Path, tmp_path: Path) -> None:
    run = _copy_run(finished_run, tmp_path / "tmps")
    memory = run / "resume" / "memory"
    files = [run / "model.safetensors", run / "metrics.jsonl", run / "model.json", run / RESUME_FILE, *memory.iterdir()]
    real = {p: _sha(p) for p in files}
    assert any(p.parent == memory for p in real)  # the memory shard folder holds real files too
    temps = [run / ".model.safetensors.k3j2_a.tmp", run / ".metrics.jsonl.x81qq0.tmp",
             run / "resume" / ".state.pt.0zz9f1.tmp", memory / f".step{STEPS:010d}-rank00000.safetensors.a1.tmp"]
    for tmp in temps:
        tmp.write_bytes(os.urandom(4096))  # half-written files, as a kill during atomic_path leaves them
    keep = run / "notes.tmp"  # not a temporary of atomic_path (no leading dot)
    keep.write_text("mine")
    assert train_main(["--resume", str(run)]) == 0  # already complete: nothing trains, nothing is rewritten
    assert [t for t in temps if t.exists()] == []
    assert keep.read_text() == "mine"
    assert {p: _sha(p) for p in real} == real


# ------------------------------------------------------------------ a SIGTERM on one of two ranks
N_TWO, BATCH_TWO = 160, 8  # 20 steps an epoch on each of 2 ranks; the stop flag is all-reduced after step 10


def _rank_pids(launcher: subprocess.Popen, n: int) -> dict[int, int]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ranks = {}
        for kid in psutil.Process(launcher.pid).children():  # the workers, and any short-lived helper
            try:
                rank = kid.environ().get("RANK")
            except psutil.Error:
                continue
            if rank is not None:
                ranks[int(rank)] = kid.pid
        if len(ranks) == n:
            return ranks
        time.sleep(0.05)
    raise AssertionError("the launcher did not start its workers")


def _wait_for_output(launcher: subprocess.Popen, text: str) -> None:
    """Read the launch's stdout (unbuffered, so `_finish` gets the rest) until `text` appears."""
    assert launcher.stdout is not None
    seen = ""
    while text not in seen:
        chunk = os.read(launcher.stdout.fileno(), 65536).decode(errors="replace")
        assert chunk, f"launch ended before {text!r}: {seen[-3000:]}"
        seen += chunk


def test_a_sigterm_on_one_rank_stops_both_at_the_same_step(tmp_path: Path) -> None:
    """The signal reaches rank 1 while it waits in the all-reduce at the end of epoch 1 (rank 0 prints
    the epoch's line just before joining it): it must not be lost there, and both ranks must stop
    at the next check, after step 10 of epoch 2, exit 143 and resume to the uninterrupted weights."""
    data = write_fashion_mnist(tmp_path / "fmnist", n_train=N_TWO, n_test=32, gz=True, seed=0)
    torch.manual_seed(7)
    write_model_checkpoint(tmp_path / "teacher", create_model("resnet8", num_classes=10, in_channels=1), FMNIST_SIDECAR)
    runs = tmp_path / "runs"
    args = [f"output_dir={runs}", "data.format=fashion_mnist", f"data.root={data}", f"data.batch_size={BATCH_TWO}",
            "data.eval_batch_size=32", "student.arch=resnet8", f"teacher.checkpoint={tmp_path / 'teacher'}",
            "teacher.eval_top1=false", "method.name=rrd", "method.options={rrd: {queue_size: 64}}", "optim.epochs=2"]
    whole = _launch([TRAIN, *args, "name=whole", "train.progress=false"], tmp_path)  # the uninterrupted run, meanwhile
    stopped = _launch([TRAIN, *args, "name=stopped", "train.progress=true"], tmp_path)
    ranks = _rank_pids(stopped, 2)
    _wait_for_output(stopped, "epoch 1/2 |")
    os.kill(ranks[1], signal.SIGTERM)  # the non-main rank only
    code, output = _finish(stopped)
    exits = {int(pid): int(rc) for rc, pid in re.findall(r"exitcode\s*:\s*(-?\d+) \(pid: (\d+)\)", output)}
    assert code != 0 and exits == {ranks[0]: 143, ranks[1]: 143}, output[-3000:]
    assert "stopped by SIGTERM in epoch 2 after step 10;" in output
    run = runs / "stopped"
    state = torch.load(run / RESUME_FILE, weights_only=True)
    steps = N_TWO // BATCH_TWO
    assert (state["epoch"], state["step_in_epoch"], state["global_step"]) == (1, 10, steps + 10)
    tag = f"step{steps + 10:010d}"
    # each rank names its memory shard by its own step count: both stopped at the same one
    assert state["memory_tag"] == tag and sorted(p.name for p in (run / "resume" / "memory").iterdir()) == [
        f"{tag}-rank00000.safetensors", f"{tag}-rank00001.safetensors"]
    assert not (run / ".lock").exists()
    resumed = _finish(_launch([TRAIN, "--resume", str(run)], tmp_path))
    assert resumed[0] == 0, resumed[1][-3000:]
    assert _finish(whole)[0] == 0
    a, b = load_file(str(runs / "whole" / "model.safetensors")), load_file(str(run / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit-identical on CPU
    queue = "objective.terms.rrd.memory.queue"
    for rank in (0, 1):
        shards = {p.parents[2].name: p for p in runs.glob(f"*/resume/memory/*-rank0000{rank}.safetensors")}
        assert torch.equal(load_file(str(shards["whole"]))[queue], load_file(str(shards["stopped"]))[queue])
