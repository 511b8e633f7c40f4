"""The glibc malloc re-exec: it really restarts with the tunables, glibc honours them, and
argv, PID and launcher/torch.distributed variables survive (plain, `-m`, accelerate launch)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rrd_fast.malloc_tuning import DONE_VAR, OPT_OUT_VAR, TUNABLES, TUNABLES_VAR, glibc_version, should_reexec

REPO = Path(__file__).resolve().parent.parent
LINUX_GLIBC = sys.platform.startswith("linux") and glibc_version() is not None
needs_glibc = pytest.mark.skipif(not LINUX_GLIBC, reason="needs Linux with glibc")

# Prints one line per process start (PID and argv) on stderr, and appends the PID to
# starts.log in the working folder, then, after the re-exec, a
# JSON report including the size of the brk heap after a 64 MiB allocation: with the
# tunables glibc serves it from the heap, without them from a separate mmap.
PROBE = """
import json, os, sys
sys.path.insert(0, {repo!r})
print("start", os.getpid(), json.dumps(sys.argv), file=sys.stderr, flush=True)
with open("starts.log", "a") as log:  # appends of one short line are atomic even from several processes
    log.write(f"start {{os.getpid()}}\\n")
from rrd_fast.malloc_tuning import reexec_with_malloc_tuning
reexec_with_malloc_tuning()
block = bytearray(64 << 20)
heap = 0
for line in open("/proc/self/maps"):
    if line.rstrip().endswith("[heap]"):
        lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
        heap += hi - lo
print(json.dumps({{"pid": os.getpid(), "argv": sys.argv, "tunables": os.environ.get("GLIBC_TUNABLES"),
                  "heap": heap, "rank": os.environ.get("RANK"), "world": os.environ.get("WORLD_SIZE")}}))
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (TUNABLES_VAR, OPT_OUT_VAR, DONE_VAR)}
    env.update(extra)
    return env


def run_probe(tmp_path: Path, env: dict[str, str], *args: str) -> tuple[dict, list[str]]:
    script = tmp_path / "probe.py"
    script.write_text(PROBE.format(repo=str(REPO)))
    proc = subprocess.run([sys.executable, "-X", "utf8", str(script), *args], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    starts = [line for line in proc.stderr.splitlines() if line.startswith("start ")]
    return json.loads(proc.stdout.strip().splitlines()[-1]), starts


def test_should_reexec_rules() -> None:
    assert should_reexec({}, "linux", "glibc 2.36")
    assert not should_reexec({TUNABLES_VAR: "glibc.malloc.arena_max=2"}, "linux", "glibc 2.36")
    assert not should_reexec({OPT_OUT_VAR: "1"}, "linux", "glibc 2.36")
    assert not should_reexec({DONE_VAR: "1"}, "linux", "glibc 2.36")  # tunables stripped by the runtime: no loop
    assert not should_reexec({}, "darwin", None)
    assert not should_reexec({}, "linux", None)  # musl
    assert should_reexec({OPT_OUT_VAR: "0"}, "linux", "glibc 2.36")


@needs_glibc
def test_reexec_applies_tunables_keeps_pid_and_argv(tmp_path: Path) -> None:
    report, starts = run_probe(tmp_path, clean_env(), "--flag", "a b", "key=value")
    assert len(starts) == 2, starts  # the process started twice ...
    assert len({line.split()[1] for line in starts}) == 1  # ... as the same PID (exec, not a child)
    assert report["tunables"] == TUNABLES
    assert report["argv"][1:] == ["--flag", "a b", "key=value"]
    assert report["heap"] >= 64 << 20  # glibc honoured mmap_threshold: the block came from the heap


@needs_glibc
def test_opt_out_and_existing_tunables_are_respected(tmp_path: Path) -> None:
    report, starts = run_probe(tmp_path, clean_env(**{OPT_OUT_VAR: "1"}))
    assert len(starts) == 1 and report["tunables"] is None
    assert report["heap"] < 64 << 20  # default malloc: a 64 MiB block is a separate mmap
    own = "glibc.malloc.arena_max=2"
    report, starts = run_probe(tmp_path, clean_env(**{TUNABLES_VAR: own}))
    assert len(starts) == 1 and report["tunables"] == own


@needs_glibc
def test_train_entry_point_reexecs_once() -> None:
    """`-X importtime` reports every start of the interpreter: the tuning module loads twice."""
    script, module = [str(REPO / "rrd_fast" / "train.py")], ["-m", "rrd_fast.train"]
    for target, env, loads in ((script, clean_env(), 2), (module, clean_env(), 2), (script, clean_env(**{OPT_OUT_VAR: "1"}), 1)):
        proc = subprocess.run([sys.executable, "-X", "importtime", *target, "--help"], env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "usage:" in proc.stdout and "--resume" in proc.stdout
        assert sum(line.rstrip().endswith("rrd_fast.malloc_tuning") for line in proc.stderr.splitlines()) == loads, target


@needs_glibc
def test_bench_reexecs_before_torch_loads() -> None:
    """`python -m rrd_fast.bench train` restarts once, and torch is first imported by the restarted process."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "rrd_fast.bench", "train", "--help"], env=clean_env(),
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--quick" in proc.stdout
    names = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")]
    tuning = [i for i, name in enumerate(names) if name == "rrd_fast.malloc_tuning"]
    assert len(tuning) == 2
    assert names.index("torch") > tuning[1]


@needs_glibc
def test_each_accelerate_process_reexecs_and_keeps_distributed_env(tmp_path: Path) -> None:
    """Two processes from the real launcher re-exec themselves, then still form one process group."""
    script = tmp_path / "dist_probe.py"
    script.write_text(PROBE.format(repo=str(REPO)) + """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
total = torch.tensor([dist.get_rank() + 1.0])
dist.all_reduce(total)
# One file per rank: two processes printing to one pipe can interleave their lines.
with open(f"report{dist.get_rank()}.json", "w") as fh:
    json.dump({"rank": dist.get_rank(), "world": dist.get_world_size(), "sum": total.item(),
               "tunables": os.environ.get("GLIBC_TUNABLES")}, fh)
dist.destroy_process_group()
""")
    env = clean_env(ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script), "x=1"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    reports = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("report*.json"))]
    assert sorted(r["rank"] for r in reports) == [0, 1]
    assert all(r["world"] == 2 and r["sum"] == 3.0 and r["tunables"] == TUNABLES for r in reports)
    # Read from a file: the launcher's shared stderr pipe can split a line between processes.
    starts = [line.split()[1] for line in (tmp_path / "starts.log").read_text().splitlines()]
    assert len(starts) == 4 and len(set(starts)) == 2, proc.stderr[-3000:]  # each of the two PIDs started twice
