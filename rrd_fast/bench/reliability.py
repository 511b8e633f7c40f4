"""Fault-injection harness: kill, corrupt, misconfigure and race the real command lines, and check each outcome.

    python -m rrd_fast.bench reliability [--trials N] [--classes kill_train,bad_config,...] [--seed S]
                                         [--out FILE.json] [--keep]

Every trial is a black-box run of what a user runs (`python rrd_fast/train.py`, `accelerate
launch`, `python -m rrd_fast.cache build|verify`, `python -m export`, `python -m export.bench`,
`python -m rrd_fast.sweep`) as subprocesses on tiny synthetic Fashion-MNIST
(pipelines/synthetic.py) in a temporary folder, one thread each (OMP_NUM_THREADS=1,
train.threads=1, CPU only). It checks what the user relies on afterwards: a killed run resumes to
weights tensor-for-tensor identical to an uninterrupted reference run of the same config (one
reference per config serves every trial); a killed cache build resumes to identical shards;
bad input ends with exit code 2, stderr's last non-empty line `error: ...` naming the culprit,
no traceback and nothing written; a second writer is refused; a surviving rank ends within a
bound. The table lists, per class, trials, handled, failed and what is checked, then the
failed trials' details. Variants of a class are taken in turn (trial i: variant i mod count).
Kill points, limits and choices are random, drawn from --seed, which is printed so that a run
can be replayed. A kill point is counted in saves, not seconds, so that it lands inside the
work however busy the machine: after the k-th replacement of the resume state (or of the cache
manifest), k uniform over the saves of the reference run, plus a random part of the interval to
the next one. A class's default trial count covers its variants; the default set is sized for
about ten minutes on an idle two-core machine, and the subprocesses' CPU time is reported
beside the wall time as the load-independent cost.

Mechanisms: kill -9 is SIGKILL to the process (its own process group, so leftovers are
cleaned up by group); a "disk full" is RLIMIT_FSIZE set in the child before exec with SIGXFSZ
ignored, so writes past the limit fail with EFBIG as on a full disk; a read-only folder is
`chattr +i` when run as root (root ignores permission bits), mode 0555 otherwise. While the
launcher-kill trials run, this process is a child subreaper (Linux prctl), so that orphaned
workers are reaped here whatever this machine's init does (some container inits never reap,
and a zombie still answers kill(pid, 0)).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import hashlib
import json
import os
import random
import resource
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import yaml

from rrd_fast.bench.common import load_average, machine_name, write_json
from rrd_fast.cli import RunError

HELP = "fault injection against the real command lines (kills, corrupt files, bad values, races), one table"

REPO = Path(__file__).resolve().parent.parent.parent
TRAIN = str(REPO / "rrd_fast" / "train.py")
PY = sys.executable
N_TRAIN, N_TEST, EPOCHS, SAVE_EVERY_STEPS = 384, 64, 4, 5
SURVIVOR_BOUND_S = 10.0  # a rank (or worker) must end this soon after its peer (or launcher) was killed
BOMB_LIMIT_S, BOMB_LIMIT_MB = 10.0, 1024.0  # CPU seconds (start-up included) and peak resident memory
TIMEOUT_S = 300.0
STATE = Path("resume") / "state.pt"
MAIN_CONFIG: dict[str, Any] = {
    "data": {"format": "fashion_mnist", "batch_size": 32, "eval_batch_size": 64},
    "student": {"arch": "resnet8"},
    "method": {"name": "rrd", "alpha": 1.0, "beta": 1.0, "options": {"rrd": {"queue_size": 100}}},
    "optim": {"epochs": EPOCHS, "milestones": [2]},  # the lr decays inside the run: a resume must get it right
    "train": {"progress": False, "threads": 1, "mixed_precision": "no", "save_every_steps": SAVE_EVERY_STEPS},
}
CACHE_SETTINGS = {"cache_views": 4, "cache_shard_samples": 64}


class HarnessError(RunError):
    """The harness itself could not set up a trial (a reference run failed, a bad option)."""


# ------------------------------------------------------------------ processes

@dataclass
class Outcome:
    """How a finished subprocess ended: exit code (negative: the signal that killed it), output, cost."""

    code: int
    out: str
    err: str
    seconds: float
    cpu_s: float  # user + system time of the process and the children it reaped: what a busy machine does not inflate
    peak_mb: float  # the highest resident set seen while it ran (VmHWM)
    timed_out: bool = False

    def last_line(self) -> str:
        lines = [line for line in self.err.splitlines() if line.strip()]
        return lines[-1].strip() if lines else ""

    def brief(self) -> str:
        return f"exit {self.code}{' (timed out)' if self.timed_out else ''}: {self.last_line()[:300] or 'no stderr'}"

    def error_problem(self, *needles: str, fold_case: bool = False) -> str | None:
        """None if this is a clean user error: exit 2, last stderr line `error: ...` holding every needle, no traceback."""
        line = self.last_line()
        if self.code != 2:
            return f"expected exit 2 with one error line, got {self.brief()}"
        if "Traceback" in self.err:
            return f"traceback on stderr (last line: {line[:300]})"
        if not line.startswith("error:"):
            return f"last stderr line does not start with 'error:': {line[:300]}"
        hay = line.lower() if fold_case else line
        missing = [n for n in needles if (n.lower() if fold_case else n) not in hay]
        if missing:
            return f"error line does not name {missing}: {line[:300]}"
        return None


class Proc:
    """A subprocess in its own session: exit status and CPU time from wait4, peak memory from /proc while it runs."""

    def __init__(self, cmd: list[str], cwd: Path, env: dict[str, str], log: Path,
                 preexec: Callable[[], None] | None = None) -> None:
        self.cmd, self.log = cmd, log
        with open(log.with_suffix(".out"), "wb") as out, open(log.with_suffix(".err"), "wb") as err:
            self.popen = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                          start_new_session=True, preexec_fn=preexec)
        self.pid = self.popen.pid
        self.started = time.monotonic()
        self.ended: float | None = None
        self.status: int | None = None
        self.cpu_s = 0.0
        self.peak_kb = 0

    def alive(self) -> bool:
        if self.status is None:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid:
                self._finished(status, usage)
            else:
                self._sample_memory()
        return self.status is None

    def _sample_memory(self) -> None:
        """VmHWM, the peak resident set of the running program (ru_maxrss would include this harness's
        own memory, which the child had before it exec'd)."""
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_kb = max(self.peak_kb, int(line.split()[1]))

    def _finished(self, status: int, usage: Any) -> None:
        self.status = os.waitstatus_to_exitcode(status)
        self.popen.returncode = self.status  # reaped here, so Popen must not try again
        self.ended, self.cpu_s = time.monotonic(), usage.ru_utime + usage.ru_stime

    def send(self, sig: int) -> None:
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def wait(self, timeout: float = TIMEOUT_S) -> Outcome:
        """Wait at most `timeout` more seconds; past it, the process group is killed and the outcome says so."""
        deadline = time.monotonic() + timeout
        timed_out = False
        while self.alive():
            if time.monotonic() > deadline:
                timed_out = True
                self.kill_group()
                _, status, usage = os.wait4(self.pid, 0)
                self._finished(status, usage)
                break
            time.sleep(0.01)
        assert self.status is not None and self.ended is not None
        return Outcome(self.status, self._read(".out"), self._read(".err"), self.ended - self.started, self.cpu_s,
                       self.peak_kb / 1024.0, timed_out)

    def _read(self, suffix: str) -> str:
        return self.log.with_suffix(suffix).read_text(errors="replace")

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)


def _proc_stat(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return text.rsplit(")", 1)[1].split()


def process_gone(pid: int) -> bool:
    """The process has exited (a zombie counts as exited); reaps it if it is this process's child."""
    with contextlib.suppress(ChildProcessError):
        if os.wait4(pid, os.WNOHANG)[0]:
            return True
    stat = _proc_stat(pid)
    return stat is None or stat[0] in ("Z", "X")


def children(pid: int, running: str = "") -> list[int]:
    """Child processes of `pid` whose command line contains `running`."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _proc_stat(int(entry.name))
            if stat is not None and stat[1] == str(pid):
                with contextlib.suppress(OSError):
                    if running in (entry / "cmdline").read_bytes().decode(errors="replace"):
                        found.append(int(entry.name))
    return sorted(found)


def environ_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def wait_until(cond: Callable[[], bool], proc: Proc | None, timeout: float) -> bool:
    """Poll `cond` every 5 ms until it holds; False if `proc` ended first or `timeout` passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        if proc is not None and not proc.alive():
            return cond()
        time.sleep(0.005)
    return False


def sleep_while(proc: Proc, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and proc.alive():
        time.sleep(0.005)


@contextlib.contextmanager
def subreaper() -> Iterator[bool]:
    """Become the child subreaper for the duration (Linux), so orphaned grandchildren are reaped here."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        ok = libc.prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        libc, ok = None, False
    try:
        yield ok
    finally:
        if ok and libc is not None:
            libc.prctl(36, 0, 0, 0, 0)


def file_size_limit(limit: int) -> Callable[[], None]:
    """preexec_fn: writes past `limit` bytes fail with EFBIG (SIGXFSZ ignored), as on a full disk."""
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return apply


# ------------------------------------------------------------------ files

def temp_files(folder: Path) -> list[Path]:
    """The `.NAME.*.tmp` files an interrupted atomic write leaves (rrd_fast.atomic)."""
    return sorted(p for p in folder.rglob(".*.tmp")) if folder.is_dir() else []


def _shallow_temp(run: Path) -> str | None:
    """Name of a temporary file in the folders the trainer writes, found with a few cheap scandir calls."""
    for folder in (run, run / "resume", run / "resume" / "memory"):
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.name.startswith(".") and entry.name.endswith(".tmp"):
                        return str((folder / entry.name).relative_to(run))
        except (FileNotFoundError, NotADirectoryError):
            continue
    return None


def snapshot(folder: Path, ignore: tuple[str, ...] = (".lock",)) -> dict[str, str]:
    """sha256 of every file under `folder` by relative path."""
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.name not in ignore:
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def snapshot_problem(before: dict[str, str], folder: Path, ignore: tuple[str, ...] = (".lock",)) -> str | None:
    """What changed in `folder` since `before` (taken with the same `ignore`)."""
    after = snapshot(folder, ignore)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    return f"the folder changed: {changed[:5]}" if changed else None


def tensors_problem(a: Path, b: Path) -> str | None:
    """None if the two safetensors files hold the same tensor names with equal values and dtypes."""
    import torch
    from safetensors.torch import load_file

    if not a.is_file():
        return f"{a.name} missing"
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return f"{a.name}: tensor names differ from the reference"
    differ = [k for k in x if x[k].dtype != y[k].dtype or not torch.equal(x[k], y[k])]
    return f"{a.name}: {len(differ)} of {len(x)} tensors differ from the reference (e.g. {differ[0]})" if differ else None


def _metrics(run: Path) -> list[dict[str, Any]]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def state_info(run: Path) -> str:
    """Where the run's resume state stands: 'epoch E step S' or why there is none."""
    path = run / STATE
    if not path.is_file():
        return "no checkpoint"
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        return f"checkpoint at epoch {int(state['epoch'])} step {int(state.get('step_in_epoch', 0))}"
    except Exception as exc:  # noqa: BLE001 - a report of what is on disk, whatever it is
        return f"unreadable checkpoint ({type(exc).__name__})"


def same_run_problem(run: Path, ref: Path) -> str | None:
    """The run ended like the uninterrupted reference: identical weights, every epoch, same top-1, no leftovers."""
    problem = tensors_problem(run / "model.safetensors", ref / "model.safetensors")
    if problem:
        return problem
    got, want = _metrics(run), _metrics(ref)
    if [(r["epoch"], r.get("top1")) for r in got] != [(r["epoch"], r.get("top1")) for r in want]:
        return f"metrics.jsonl: epochs/top-1 {[(r['epoch'], r.get('top1')) for r in got]} differ from the reference"
    if not (run / "summary.json").is_file():
        return "no summary.json"
    left = temp_files(run)
    if left:
        return f"temporary files left: {[str(p.relative_to(run)) for p in left[:3]]}"
    if (run / ".lock").exists():
        return "the run lock was not released"
    return None


def flip_byte(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if offset is None else offset
    data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def edit_json(path: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_pid() -> int:
    """The pid of a process that has just exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def billion_laughs(levels: int = 9, width: int = 9) -> str:
    """A few hundred bytes of YAML whose aliases expand to width**levels strings."""
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    for i in range(1, levels):
        lines.append(f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines)


def indent(text: str, spaces: int) -> str:
    return "\n".join(" " * spaces + line for line in text.splitlines())


# ------------------------------------------------------------------ the workspace

@dataclass
class Reference:
    run: Path
    seconds: float
    saves: int  # how often the watched file (resume state, cache manifest) was replaced in the whole run
    gap_s: float  # median seconds between two of those saves


class SaveWatch:
    """Counts the atomic replacements of one file (each leaves a new inode): a run's checkpoints, a build's shards.

    Kill points are counted in these saves rather than in seconds, so that they land inside the
    work however much a shared machine slows it down."""

    def __init__(self, path: Path) -> None:
        self.path, self.count, self.times = path, 0, []
        self._seen: tuple[int, int] | None = None

    def poll(self) -> int:
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_ino, st.st_mtime_ns) != self._seen:
                self._seen = (st.st_ino, st.st_mtime_ns)
                self.count += 1
                self.times.append(time.monotonic())
        return self.count

    def gap(self, default: float) -> float:
        """The latest interval between two saves (the pace right now), else `default`."""
        return self.times[-1] - self.times[-2] if len(self.times) >= 2 else default


def median_gap(times: list[float]) -> float:
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    return gaps[len(gaps) // 2] if gaps else 1.0


def wait_for_kill_point(t: Trial, proc: Proc, watch: SaveWatch, ref: Reference, spread: float = 1.0) -> str:
    """Wait for a random point of the work: after save k (uniform over the first `spread` of the reference's
    saves, counted from now), plus a random part of the interval to the next; returns where that was."""
    start = watch.poll()
    k = t.rng.randrange(0, max(int(ref.saves * spread), 1))
    while proc.alive() and watch.poll() < start + k:
        time.sleep(0.002)
    extra = t.rng.uniform(0.0, watch.gap(ref.gap_s))
    sleep_while(proc, extra)
    return f"{extra:.2f} s after save {watch.count - start}"


class Workspace:
    """Data, teachers, configs and the lazily made reference runs that every trial shares."""

    def __init__(self, root: Path, log: Callable[[str], None]) -> None:
        import torch

        from pipelines.synthetic import write_fashion_mnist
        from rrd_fast.checkpoint import write_model_checkpoint
        from rrd_fast.models import create_model

        self.root, self.log = root, log
        self.data = write_fashion_mnist(root / "fmnist", n_train=N_TRAIN, n_test=N_TEST, gz=True, seed=0)
        self.other_data = write_fashion_mnist(root / "fmnist_other", n_train=N_TRAIN, n_test=N_TEST, gz=True, seed=1)
        sidecar = {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
                   "normalization": {"mean": [0.2860], "std": [0.3530]}}
        self.teacher, self.other_teacher = root / "teacher", root / "teacher_other"
        for folder, seed in ((self.teacher, 7), (self.other_teacher, 8)):
            torch.manual_seed(seed)
            write_model_checkpoint(folder, create_model("resnet8", num_classes=10, in_channels=1), sidecar)
        self.config = self.write_config(root / "main.yaml")
        self.cache_config = self.write_config(root / "cache.yaml", teacher=dict(CACHE_SETTINGS, cache=str(root / "unset")))
        self._made: dict[str, Any] = {}
        self.cpu_s = 0.0  # of the reference runs

    def main_config(self, **sections: dict[str, Any]) -> dict[str, Any]:
        """MAIN_CONFIG on this workspace's data and teacher, with `sections` merged in."""
        cfg = json.loads(json.dumps(MAIN_CONFIG))
        cfg["data"]["root"] = str(self.data)
        cfg["teacher"] = {"checkpoint": str(self.teacher)}
        for section, values in sections.items():
            cfg.setdefault(section, {}).update(values)
        return cfg

    def write_config(self, path: Path, **sections: dict[str, Any]) -> Path:
        path.write_text(yaml.safe_dump(self.main_config(**sections), sort_keys=False))
        return path

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "RANK", "WORLD_SIZE", "LOCAL_"))}
        path = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": path, "ACCELERATE_USE_CPU": "true",
                    "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1"})
        env.update(extra)
        return env

    def fresh(self, run: Path, *extra: str, config: Path | None = None) -> list[str]:
        return ["--config", str(config or self.config), f"output_dir={run.parent}", f"name={run.name}", *extra]

    def _once(self, key: str, make: Callable[[], Any]) -> Any:
        """Make a shared fixture once; a failure is remembered and raised to every trial that needs it."""
        if key not in self._made:
            try:
                self._made[key] = make()
            except Exception as exc:  # noqa: BLE001 - reported in every dependent trial
                self._made[key] = exc
        value = self._made[key]
        if isinstance(value, Exception):
            raise value
        return value

    def _run(self, cmd: list[str], log: Path, what: str, watch: Path | None = None) -> Reference:
        """Run a fixture's command to the end; with `watch`, count that file's saves on the way."""
        log.parent.mkdir(parents=True, exist_ok=True)
        proc = Proc(cmd, log.parent, self.env(), log)
        saves = SaveWatch(watch) if watch is not None else None
        while proc.alive():
            if saves is not None:
                saves.poll()
            time.sleep(0.002)
        out = proc.wait()
        proc.kill_group()
        self.cpu_s += out.cpu_s
        if out.code != 0:
            raise HarnessError(f"{what} failed: {out.brief()}")
        self.log(f"  ({what}: {out.seconds:.1f} s" + (f", {saves.count} saves)" if saves else ")"))
        return Reference(log.parent, out.seconds, saves.count if saves else 0, median_gap(saves.times) if saves else 1.0)

    def reference(self) -> Reference:
        """The uninterrupted run of the main config: what every killed and resumed run must end as."""
        def make() -> Reference:
            run = self.root / "reference" / "main"
            ref = self._run([PY, TRAIN, *self.fresh(run)], run.parent / "main", "reference run", watch=run / STATE)
            ref.run = run
            return ref
        return self._once("reference", make)

    def partial(self) -> Path:
        """The main config's run after 1 of its epochs, finished: resumed with optim.epochs=4 it must equal the reference."""
        def make() -> Path:
            run = self.root / "reference" / "partial"
            self._run([PY, TRAIN, *self.fresh(run, "optim.epochs=1")], run.parent / "partial", "one-epoch run")
            return run
        return self._once("partial", make)

    def copy_partial(self, dest: Path) -> Path:
        shutil.copytree(self.partial(), dest)
        return dest

    def cache_reference(self) -> Reference:
        """A complete teacher cache built without interruption (the shards every resumed build must equal)."""
        def make() -> Reference:
            cache = self.root / "reference" / "cache"
            cmd = [PY, "-m", "rrd_fast.cache", "build", "--config", str(self.cache_config), f"teacher.cache={cache}"]
            ref = self._run(cmd, self.root / "reference" / "cache_build", "reference cache build",
                            watch=cache / "manifest.json")
            ref.run = cache
            return ref
        return self._once("cache", make)

    def artifact(self) -> Path:
        """An ONNX Runtime artifact exported from the reference run's student."""
        def make() -> Path:
            out = self.root / "reference" / "artifact_ort"
            cmd = [PY, "-m", "export", str(self.reference().run), "--backend", "onnxruntime", "--batch-sizes", "1",
                   "--device", "cpu", "--out", str(out)]
            self._run(cmd, self.root / "reference" / "export", "reference export")
            return out
        return self._once("artifact", make)


# ------------------------------------------------------------------ trials

@dataclass
class Trial:
    """One trial's context: its folder, random draws, the processes it started (cleaned up after it)."""

    ws: Workspace
    rng: random.Random
    index: int
    folder: Path
    notes: list[str] = field(default_factory=list)
    procs: list[Proc] = field(default_factory=list)
    extra_pids: list[int] = field(default_factory=list)
    immutable: list[Path] = field(default_factory=list)
    counter: int = 0

    def start(self, cmd: list[str], preexec: Callable[[], None] | None = None, **env: str) -> Proc:
        self.counter += 1
        proc = Proc(cmd, self.folder, self.ws.env(**env), self.folder / f"p{self.counter:02d}", preexec)
        self.procs.append(proc)
        return proc

    def run(self, cmd: list[str], timeout: float = TIMEOUT_S, **kwargs: Any) -> Outcome:
        return self.start(cmd, **kwargs).wait(timeout)

    def train(self, *args: str, **kwargs: Any) -> Proc:
        return self.start([PY, TRAIN, *args], **kwargs)

    def note(self, text: str) -> None:
        self.notes.append(text)

    def cleanup(self) -> None:
        for proc in self.procs:
            proc.kill_group()
            if proc.status is None:
                proc.wait(timeout=30)
        for pid in self.extra_pids:
            if not process_gone(pid):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)
        for path in self.immutable:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
            with contextlib.suppress(OSError):
                path.chmod(0o755)


Check = Callable[[Trial], "str | None"]


@dataclass
class Variant:
    label: str
    fn: Check


@dataclass
class TrialClass:
    name: str
    checks: str
    variants: list[Variant]
    default_trials: int


def recover(t: Trial, run: Path, *extra: str) -> str | None:
    """Continue an interrupted run as its user would, to the end: `--resume`, or, with no checkpoint yet,
    a fresh start with --overwrite once `--resume` has refused in one line."""
    if not (run / STATE).is_file():
        out = t.train("--resume", str(run), *extra).wait()
        problem = out.error_problem(str(run))
        if problem:
            return f"--resume without a checkpoint: {problem}"
        out = t.train(*t.ws.fresh(run, "--overwrite")).wait()
        t.note("restarted (no checkpoint yet)")
    else:
        out = t.train("--resume", str(run), *extra).wait()
    if out.code != 0:
        return f"recovery run: {out.brief()}"
    return None


def _kill_during_training(t: Trial, run: Path, proc: Proc, ref: Reference, spread: float = 1.0) -> str | None:
    if not wait_until(lambda: (run / ".lock").exists(), proc, TIMEOUT_S):
        return f"the run never took its lock: {proc.wait().brief()}"
    where = wait_for_kill_point(t, proc, SaveWatch(run / STATE), ref, spread)
    proc.send(signal.SIGKILL)
    out = proc.wait()
    if out.code == -signal.SIGKILL:
        t.note(f"killed {where}; {state_info(run)}")
    elif out.code == 0:
        t.note(f"the run ended before the kill ({where})")
    else:
        return f"the run failed before it was killed: {out.brief()}"
    return None


def kill_train(t: Trial) -> str | None:
    ref = t.ws.reference()
    run = t.folder / "runs" / "r"
    problem = _kill_during_training(t, run, t.train(*t.ws.fresh(run)), ref)
    return problem or recover(t, run) or same_run_problem(run, ref.run)


def kill_during_write(t: Trial) -> str | None:
    ref = t.ws.reference()
    run = t.folder / "runs" / "r"
    for attempt in range(2):
        proc = t.train(*t.ws.fresh(run, *(["--overwrite"] if attempt else [])))
        if not wait_until(lambda: (run / ".lock").exists(), proc, TIMEOUT_S):
            return f"the run never took its lock: {proc.wait().brief()}"
        if attempt == 0:
            wait_for_kill_point(t, proc, SaveWatch(run / STATE), ref, spread=0.9)
        skip = t.rng.randrange(3)  # a checkpoint writes several files: let the first `skip` of them go by
        names: list[str] = []
        seen = None
        while proc.alive() and len(names) <= skip:
            seen = _shallow_temp(run)
            if seen and seen not in names:
                names.append(seen)
            time.sleep(0.0005)
        if len(names) > skip and proc.alive():
            proc.send(signal.SIGKILL)
            proc.wait()
            left = [str(p.relative_to(run)) for p in temp_files(run)]
            t.note(f"killed while writing {seen}" + (f" (left {left[0]})" if left else " (the write had just ended)")
                   + f"; {state_info(run)}")
            break
        proc.wait()
        t.note("no write seen before the run ended; retried from the start")
    else:
        return "never caught a write in progress"
    return recover(t, run) or same_run_problem(run, ref.run)


def double_kill(t: Trial) -> str | None:
    ref = t.ws.reference()
    run = t.folder / "runs" / "r"
    problem = _kill_during_training(t, run, t.train(*t.ws.fresh(run)), ref, spread=0.6)
    if problem:
        return problem
    if (run / STATE).is_file():
        second = t.train("--resume", str(run))
    else:
        second = t.train(*t.ws.fresh(run, "--overwrite"))
    problem = _kill_during_training(t, run, second, ref, spread=0.4)
    return problem or recover(t, run) or same_run_problem(run, ref.run)


def _stop_signal(sig: int) -> Check:
    def trial(t: Trial) -> str | None:
        ref = t.ws.reference()
        run = t.folder / "runs" / "r"
        proc = t.train(*t.ws.fresh(run))
        if not wait_until(lambda: (run / ".lock").exists(), proc, TIMEOUT_S):
            return f"the run never took its lock: {proc.wait().brief()}"
        where = wait_for_kill_point(t, proc, SaveWatch(run / STATE), ref)
        proc.send(sig)
        out = proc.wait()
        name = signal.Signals(sig).name
        t.note(f"{name} {where}: exit {out.code}; {state_info(run)}")
        complete = len(_metrics(run)) == EPOCHS and (run / "summary.json").is_file()
        if out.code == 128 + sig:
            if "Traceback" in out.err or not any(w in out.last_line() for w in (f"stopped by {name}", "interrupted")):
                return f"stopped, but not with one line saying so: {out.last_line()[:300]}"
        elif not (complete and out.code in (0, -sig, 130)):
            return f"expected exit {128 + sig} with a mid-run checkpoint, got {out.brief()}"
        return recover(t, run) or same_run_problem(run, ref.run)
    return trial


def kill_cache_build(t: Trial) -> str | None:
    from safetensors.torch import load_file
    import torch

    ref = t.ws.cache_reference()
    cache = t.folder / "cache"
    cmd = [PY, "-m", "rrd_fast.cache", "build", "--config", str(t.ws.cache_config), f"teacher.cache={cache}"]
    proc = t.start(cmd)
    if not wait_until(lambda: (cache / ".build.lock").exists(), proc, TIMEOUT_S):
        return f"the build never took its lock: {proc.wait().brief()}"
    manifest = cache / "manifest.json"
    where = wait_for_kill_point(t, proc, SaveWatch(manifest), ref)
    proc.send(signal.SIGKILL)
    proc.wait()
    done = len(json.loads(manifest.read_text())["shards"]) if manifest.is_file() else 0
    t.note(f"killed {where} of the manifest, {done} shards recorded")
    out = t.run(cmd)
    if out.code != 0:
        return f"resumed build: {out.brief()}"
    got, want = json.loads(manifest.read_text()), json.loads((ref.run / "manifest.json").read_text())
    if not got.get("complete") or sorted(got["shards"]) != sorted(want["shards"]):
        return f"shards {sorted(got['shards'])[:3]}... differ from the reference's or the cache is incomplete"
    for name in want["shards"]:
        a, b = load_file(str(cache / name)), load_file(str(ref.run / name))
        if a.keys() != b.keys() or any(not torch.equal(a[k], b[k]) for k in a):
            return f"shard {name} differs from the uninterrupted build's"
    extra = sorted(p.name for p in cache.iterdir() if p.name not in want["shards"] and p.name != "manifest.json")
    if extra:
        return f"leftovers in the cache folder: {extra[:3]}"
    return None


def _launch(t: Trial, run: Path, processes: int) -> Proc:
    if processes == 1:
        launch = ["--cpu", "--num_processes", "1"]
    else:
        launch = ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1", "--mixed_precision", "no",
                  "--dynamo_backend", "no", "--main_process_port", str(free_port())]
    return t.start([PY, "-m", "accelerate.commands.launch", *launch, TRAIN, *t.ws.fresh(run)])


def _workers(launcher: Proc, count: int, timeout: float = TIMEOUT_S) -> list[int]:
    """The launcher's training processes, once `count` of them run (fewer if it gave up first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and launcher.alive():
        found = children(launcher.pid, running="train.py")
        if len(found) >= count:
            return found
        time.sleep(0.02)
    return children(launcher.pid, running="train.py")


def _wait_gone(pids: list[int], bound: float) -> float | None:
    """Seconds until every pid has exited, or None if some outlive `bound`."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < bound:
        if all(process_gone(p) for p in pids):
            return time.monotonic() - t0
        time.sleep(0.005)
    return None


def kill_rank(t: Trial) -> str | None:
    run = t.folder / "runs" / "r"
    launcher = _launch(t, run, 2)
    workers = _workers(launcher, 2)
    t.extra_pids += workers
    if len(workers) != 2 or not wait_until(lambda: (run / ".lock").exists(), launcher, TIMEOUT_S):
        return f"two workers never started training: {launcher.wait().brief()}"
    where = wait_for_kill_point(t, launcher, SaveWatch(run / STATE), t.ws.reference(), spread=0.8)
    victim = t.rng.choice(workers)
    rank = environ_of(victim).get("RANK", "?")
    if process_gone(victim):
        return f"rank {rank} had already exited before the kill: {launcher.wait().brief()}"
    os.kill(victim, signal.SIGKILL)
    survivors = [p for p in workers if p != victim]
    took = _wait_gone(survivors, SURVIVOR_BOUND_S)
    out = launcher.wait(timeout=SURVIVOR_BOUND_S)
    t.note(f"killed rank {rank} {where}; " + (f"the other ended {took:.2f} s later" if took is not None else "the other lived on")
           + f"; launcher {out.brief()[:80]}; {state_info(run)}")
    if took is None:
        return f"the surviving rank outlived its peer by more than {SURVIVOR_BOUND_S:.0f} s"
    if out.timed_out or out.code == 0:
        return f"the launcher should fail after a rank died, got {out.brief()}"
    problem = recover(t, run)
    if problem:
        return problem
    return None if len(_metrics(run)) == EPOCHS else f"the resumed run recorded {len(_metrics(run))} of {EPOCHS} epochs"


def _kill_launcher(processes: int) -> Check:
    def trial(t: Trial) -> str | None:
        ref = t.ws.reference()
        run = t.folder / "runs" / "r"
        with subreaper():
            launcher = _launch(t, run, processes)
            workers = _workers(launcher, processes)
            t.extra_pids += workers
            if len(workers) != processes or not wait_until(lambda: (run / ".lock").exists(), launcher, TIMEOUT_S):
                return f"the workers never started training: {launcher.wait().brief()}"
            where = wait_for_kill_point(t, launcher, SaveWatch(run / STATE), ref, spread=0.8)
            launcher.send(signal.SIGKILL)
            launcher.wait()
            took = _wait_gone(workers, SURVIVOR_BOUND_S)
            t.note(f"launcher killed {where}; "
                   + (f"workers gone {took:.2f} s later" if took is not None else "workers still running") + f"; {state_info(run)}")
            if took is None:
                for pid in workers:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                _wait_gone(workers, 30.0)
                return f"workers still running {SURVIVOR_BOUND_S:.0f} s after their launcher was killed"
        problem = recover(t, run)
        if problem:
            return problem
        if processes == 1:
            return same_run_problem(run, ref.run)
        return None if len(_metrics(run)) == EPOCHS else f"the resumed run recorded {len(_metrics(run))} of {EPOCHS} epochs"
    return trial


def _lock_holder(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / ".lock").read_text())
    except (OSError, ValueError):
        return {}


def _live_second_writer(second: Callable[[Path], list[str]], needle: str | None = None) -> Check:
    """A first run writing the folder; a second command on it must be refused and the first go on undisturbed."""
    def trial(t: Trial) -> str | None:
        run = t.folder / "runs" / "r"
        first = t.train(*t.ws.fresh(run, "optim.epochs=1000"))  # far longer than the second needs to start
        if not wait_until(lambda: (run / "config.yaml").exists() and bool(_lock_holder(run)), first, TIMEOUT_S):
            return f"the first run never started: {first.wait().brief()}"
        holder = _lock_holder(run)
        out = t.run([PY, TRAIN, *second(run)])
        needles = (needle,) if needle else (str(holder.get("pid")), str(holder.get("host")))
        problem = out.error_problem(*needles)
        if problem:
            return f"second writer: {problem}"
        if not first.alive():
            return f"the first run died: {first.wait().brief()}"
        if _lock_holder(run).get("pid") != holder.get("pid") or not (run / "config.yaml").is_file():
            return "the second writer changed the first run's folder (lock or config.yaml)"
        first.send(signal.SIGTERM)
        end = first.wait(timeout=60)
        t.note(f"second refused in {out.seconds:.1f} s; first stopped with exit {end.code}; {state_info(run)}")
        if end.code != 128 + signal.SIGTERM or not (run / STATE).is_file():
            return f"the first run did not stop cleanly on SIGTERM after the refusal: {end.brief()}"
        return None
    return trial


def _planted_lock(host: str | None) -> Check:
    """A lock file left in a resumable folder: by a dead process of this host (taken over) or by another host (refused)."""
    def trial(t: Trial) -> str | None:
        run = t.ws.copy_partial(t.folder / "runs" / "r")
        pid = dead_pid() if host is None else 4242
        (run / ".lock").write_text(json.dumps({"pid": pid, "host": host or socket.gethostname(), "since": "earlier"}))
        if host is None:
            out = t.train("--resume", str(run), f"optim.epochs={EPOCHS}").wait()
            if out.code != 0:
                return f"a stale lock (dead pid {pid}) was not taken over: {out.brief()}"
            return same_run_problem(run, t.ws.reference().run)
        before = snapshot(run, ignore=())
        out = t.train("--resume", str(run), f"optim.epochs={EPOCHS}").wait()
        return out.error_problem(str(pid), host) or snapshot_problem(before, run, ignore=())
    return trial


BAD_VALUES: list[tuple[str, str]] = [
    ("data.batch_size", "0"), ("data.batch_size", "-8"), ("data.batch_size", "2.5"), ("data.eval_batch_size", "0"),
    ("optim.lr", "-0.1"), ("optim.lr", "nan"), ("optim.lr", ".inf"), ("optim.lr", "fast"),
    ("optim.momentum", "1.5"), ("optim.momentum", "-0.1"), ("optim.weight_decay", "-5e-4"),
    ("optim.epochs", "0"), ("optim.epochs", "-3"), ("train.save_every", "0"), ("train.eval_every", "0"),
    ("train.save_every_steps", "-1"), ("data.train_limit", "-5"), ("optim.milestones", "[-1]"),
    ("optim.milestones", "[3, 1]"), ("data.pad", "-2"), ("seed", "-1"), ("optim.lr_decay", "0"),
    ("teacher.cache_views", "0"), ("optim.base_batch_size", "0"),
]
ACCEPTED_VALUES: list[tuple[str, str, float]] = [("optim.lr", "1e-3", 1e-3), ("optim.weight_decay", "5e-4", 5e-4)]


def _config_with(t: Trial, key: str, raw: str) -> Path:
    """The main config as a file with `key` set to the raw YAML text `raw`."""
    cfg = t.ws.main_config()
    *sections, leaf = key.split(".")
    node = cfg
    for section in sections:
        node = node.setdefault(section, {})
    node[leaf] = "@@VALUE@@"
    path = t.folder / "config.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False).replace("'@@VALUE@@'", raw))
    return path


def _bad_value(key: str, raw: str) -> Check:
    def trial(t: Trial) -> str | None:
        run = t.folder / "runs" / "r"
        if t.rng.random() < 0.5:
            t.note("on the command line")
            args = t.ws.fresh(run, f"{key}={raw}")
        else:
            t.note("in the config file")
            args = t.ws.fresh(run, config=_config_with(t, key, raw))
        out = t.train(*args).wait()
        problem = out.error_problem(key)
        if problem:
            return problem
        return f"{run.parent} was written" if run.parent.exists() else None
    return trial


def _accepted_value(key: str, raw: str, value: float) -> Check:
    def trial(t: Trial) -> str | None:
        run = t.folder / "runs" / "r"
        for where, args in (("command line", t.ws.fresh(run, f"{key}={raw}")),
                            ("config file", t.ws.fresh(run, config=_config_with(t, key, raw)))):
            out = t.train(*args, "--print-config").wait()
            if out.code != 0:
                return f"{key}={raw} on the {where} refused: {out.brief()}"
            node: Any = yaml.safe_load(out.out)
            for part in key.split("."):
                node = node[part]
            if node != value:
                return f"{key}={raw} on the {where} resolved to {node!r}"
        return None
    return trial


def _config_with_options(t: Trial, options: str) -> str:
    """The main config as YAML text with `options` (YAML lines) as method.options."""
    cfg = t.ws.main_config()
    del cfg["method"]["options"]
    return yaml.safe_dump(cfg, sort_keys=False).replace("method:\n", "method:\n  options:\n" + indent(options, 4) + "\n", 1)


def _bomb(kind: str) -> Check:
    def trial(t: Trial) -> str | None:
        out_dir = t.folder / "runs"
        bomb = t.folder / "bomb.yaml"
        laughs = billion_laughs()
        if kind == "override":
            cmd = [PY, TRAIN, *t.ws.fresh(out_dir / "r", "method.options={" + ", ".join(laughs.splitlines()) + "}")]
        elif kind == "recursive":
            bomb.write_text(_config_with_options(t, "rrd: &loop\n  queue_size: [*loop]"))
            cmd = [PY, TRAIN, *t.ws.fresh(out_dir / "r", config=bomb)]
        elif kind == "sweep":
            bomb.write_text(f"output_dir: {out_dir}\nconfig_dir: {t.folder}\npairs: [a_b]\nmethods: [kd]\n"
                            f"overrides:\n  lol:\n{indent(laughs, 4)}\n")
            cmd = [PY, "-m", "rrd_fast.sweep", str(bomb), "--dry-run"]
        else:  # a run config with the bomb under a known key, read by train.py or by the cache builder
            bomb.write_text(_config_with_options(t, "lol:\n" + indent(laughs, 2)))
            if kind == "cache":
                cmd = [PY, "-m", "rrd_fast.cache", "build", "--config", str(bomb), f"teacher.cache={t.folder / 'cache'}"]
            else:
                cmd = [PY, TRAIN, *t.ws.fresh(out_dir / "r", config=bomb)]
        out = t.run(cmd, timeout=60)
        t.note(f"{out.cpu_s:.1f} CPU s, peak {out.peak_mb:.0f} MB")
        problem = out.error_problem("alias", fold_case=True)
        if problem:
            return problem
        if out.cpu_s > BOMB_LIMIT_S or out.peak_mb > BOMB_LIMIT_MB:
            return f"took {out.cpu_s:.1f} CPU s and {out.peak_mb:.0f} MB (limits {BOMB_LIMIT_S:.0f} s, {BOMB_LIMIT_MB:.0f} MB)"
        written = [p for p in (out_dir, t.folder / "cache") if p.exists()]
        return f"written: {written}" if written else None
    return trial


def _path_is_file(kind: str) -> Check:
    def trial(t: Trial) -> str | None:
        blocker = t.folder / "taken"
        blocker.write_text("not a folder")
        if kind == "output_dir":
            cmd, needle = [PY, TRAIN, *t.ws.fresh(blocker / "r")], str(blocker)
        elif kind == "run_dir":
            cmd, needle = [PY, TRAIN, *t.ws.fresh(blocker)], str(blocker)
        elif kind == "output_dir_parent":
            cmd, needle = [PY, TRAIN, *t.ws.fresh(blocker / "sub" / "r")], str(blocker)
        elif kind == "resume":
            cmd, needle = [PY, TRAIN, "--resume", str(blocker)], str(blocker)
        elif kind == "cache":
            cmd = [PY, TRAIN, *t.ws.fresh(t.folder / "runs" / "r", f"teacher.cache={blocker}")]
            needle = str(blocker)
        elif kind == "export_out":
            cmd = [PY, "-m", "export", str(t.ws.teacher), "--backend", "eager", "--out", str(blocker)]
            needle = str(blocker)
        else:  # export --out inside a file
            cmd = [PY, "-m", "export", str(t.ws.teacher), "--backend", "eager", "--out", str(blocker / "art")]
            needle = str(blocker)
        out = t.run(cmd)
        problem = out.error_problem(needle)
        if problem:
            return problem
        if blocker.read_text() != "not a folder":
            return "the file in the way was changed"
        return f"{t.folder / 'runs'} was written" if (t.folder / "runs").exists() else None
    return trial


def _make_read_only(t: Trial, folder: Path) -> str | None:
    """Make `folder` unwritable for the child (root: chattr +i, since root ignores mode bits)."""
    t.immutable.append(folder)
    if os.geteuid() == 0:
        made = subprocess.run(["chattr", "+i", str(folder)], capture_output=True, text=True)
        if made.returncode != 0:
            return f"cannot make a read-only folder here (chattr: {made.stderr.strip()[:100]})"
    else:
        folder.chmod(0o555)
    try:
        (folder / ".probe").write_text("x")
    except OSError:
        return None
    (folder / ".probe").unlink()
    return "the folder is still writable after chattr/chmod"


def _read_only(kind: str) -> Check:
    def trial(t: Trial) -> str | None:
        if kind == "output_dir":
            out_dir = t.folder / "runs"
            out_dir.mkdir()
            problem = _make_read_only(t, out_dir)
            if problem:
                return problem
            out = t.train(*t.ws.fresh(out_dir / "r")).wait()
            return out.error_problem(str(out_dir)) or (f"{out_dir / 'r'} was created" if (out_dir / "r").exists() else None)
        run = t.ws.copy_partial(t.folder / "runs" / "r")
        before = snapshot(run, ignore=())
        problem = _make_read_only(t, run)
        if problem:
            return problem
        out = t.train("--resume", str(run), f"optim.epochs={EPOCHS}").wait()
        return out.error_problem(str(run)) or snapshot_problem(before, run, ignore=())
    return trial


# Limits in bytes that fall in the different files a resumed run writes: config.yaml and metrics
# (about 1 KB), memory shards (about 50 KB), weights (about 320 KB), the resume state (about 760 KB).
DISK_FULL_RANGES = ((8_000, 60_000), (60_000, 330_000), (330_000, 700_000))


def disk_full(t: Trial) -> str | None:
    ref = t.ws.reference()
    run = t.ws.copy_partial(t.folder / "runs" / "r")
    state_size = (run / STATE).stat().st_size
    lo, hi = DISK_FULL_RANGES[t.index % len(DISK_FULL_RANGES)]
    limit = t.rng.randrange(lo, min(hi, state_size))
    before = (run / STATE).read_bytes()
    out = t.train("--resume", str(run), f"optim.epochs={EPOCHS}", preexec=file_size_limit(limit)).wait()
    line = out.last_line()
    t.note(f"file size limit {limit} bytes, exit {out.code}: " + (line if len(line) <= 160 else line[:70] + " ... " + line[-80:]))
    problem = out.error_problem("disk full", fold_case=True)
    if problem:
        return problem
    left = temp_files(run)
    if left:
        return f"temporary files left after the failed write: {[str(p.relative_to(run)) for p in left[:3]]}"
    state = run / STATE
    if not state.is_file():
        return "the resume state is gone"
    if state.read_bytes() != before:
        t.note("a later checkpoint was completed before the limit was hit")
    return recover(t, run, f"optim.epochs={EPOCHS}") or same_run_problem(run, ref.run)


RESUME_CHANGES: list[tuple[str, str]] = [
    ("seed", "5"), ("data.batch_size", "64"), ("data.train_limit", "100"), ("optim.lr", "0.1"),
    ("method.name", "kd"), ("optim.milestones", "[1]"), ("data.flip", "false"), ("student.arch", "resnet14"),
]


def note_stale_lock(t: Trial, run: Path) -> None:
    """A refused resume may leave its lock behind (harmless: a dead pid's lock is taken over); say so."""
    if (run / ".lock").exists():
        t.note("left a stale .lock")


def _resume_changed(key: str, value: str) -> Check:
    def trial(t: Trial) -> str | None:
        run = t.ws.copy_partial(t.folder / "runs" / "r")
        before = snapshot(run)
        out = t.train("--resume", str(run), f"optim.epochs={EPOCHS}", f"{key}={value}").wait()
        note_stale_lock(t, run)
        return out.error_problem(key) or snapshot_problem(before, run)
    return trial


def resume_longer(t: Trial) -> str | None:
    run = t.ws.copy_partial(t.folder / "runs" / "r")
    out = t.train("--resume", str(run), f"optim.epochs={EPOCHS}").wait()
    if out.code != 0:
        return f"--resume with a larger optim.epochs: {out.brief()}"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    if saved["optim"]["epochs"] != EPOCHS:
        return f"config.yaml says optim.epochs {saved['optim']['epochs']} after the resume"
    return same_run_problem(run, t.ws.reference().run)


def _resume_inputs(replace_teacher: bool, replace_data: bool) -> Check:
    def trial(t: Trial) -> str | None:
        run = t.ws.copy_partial(t.folder / "runs" / "r")
        teacher, data = t.folder / "teacher", t.folder / "data"
        shutil.copytree(t.ws.teacher, teacher)
        shutil.copytree(t.ws.data, data)
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        cfg["teacher"]["checkpoint"], cfg["data"]["root"] = str(teacher), str(data)
        (run / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))  # the run now reads private copies
        if replace_teacher:
            shutil.rmtree(teacher)
            shutil.copytree(t.ws.other_teacher, teacher)
        if replace_data:
            shutil.rmtree(data)
            shutil.copytree(t.ws.other_data, data)
        before = snapshot(run)
        out = t.train("--resume", str(run)).wait()
        needles = (["teacher"] if replace_teacher else []) + (["training data"] if replace_data else [])
        note_stale_lock(t, run)
        return out.error_problem(*needles) or snapshot_problem(before, run)
    return trial


def _sidecar(change: Callable[[dict[str, Any]], Any] | None, raw: str | None = None, weights: bool = False) -> Check:
    """A tampered teacher checkpoint: training refuses it in one line before writing anything."""
    def trial(t: Trial) -> str | None:
        teacher = t.folder / "teacher"
        shutil.copytree(t.ws.teacher, teacher)
        if change is not None:
            edit_json(teacher / "model.json", change)
        if raw is not None:
            (teacher / "model.json").write_text(raw)
        if weights:
            flip_byte(teacher / "model.safetensors")
        run = t.folder / "runs" / "r"
        out = t.train(*t.ws.fresh(run, f"teacher.checkpoint={teacher}")).wait()
        problem = out.error_problem(str(teacher))
        if problem:
            return problem
        if out.peak_mb > BOMB_LIMIT_MB:
            return f"peak resident memory {out.peak_mb:.0f} MB (limit {BOMB_LIMIT_MB:.0f} MB)"
        return f"{run.parent} was written" if run.parent.exists() else None
    return trial


def malicious_pth(t: Trial) -> str | None:
    from pipelines.synthetic import write_malicious_pickle

    marker = t.folder / "code_ran"
    pth = write_malicious_pickle(t.folder / "ckpt_epoch_240.pth", marker)
    run = t.folder / "runs" / "r"
    out = t.train(*t.ws.fresh(run, f"teacher.checkpoint={pth}", "teacher.arch=resnet8")).wait()
    if marker.exists():
        return "the pickle in the .pth ran code"
    return out.error_problem(str(pth)) or (f"{run.parent} was written" if run.parent.exists() else None)


def _export_sidecar(change: Callable[[dict[str, Any]], Any]) -> Check:
    def trial(t: Trial) -> str | None:
        run = t.folder / "student"
        shutil.copytree(t.ws.reference().run, run, ignore=shutil.ignore_patterns("resume"))
        edit_json(run / "model.json", change)
        out_dir = t.folder / "artifact"
        out = t.run([PY, "-m", "export", str(run), "--backend", "eager", "--device", "cpu", "--out", str(out_dir)])
        problem = out.error_problem("model.json")
        return problem or (f"{out_dir} was written" if out_dir.exists() else None)
    return trial


def _cache_manifest(change: Callable[[dict[str, Any]], Any] | None, raw: str | None = None) -> Check:
    """A corrupt manifest: a run using the cache refuses it in one line before writing its folder."""
    def trial(t: Trial) -> str | None:
        cache = t.folder / "cache"
        shutil.copytree(t.ws.cache_reference().run, cache)
        if change is not None:
            edit_json(cache / "manifest.json", change)
        if raw is not None:
            (cache / "manifest.json").write_text(raw)
        run = t.folder / "runs" / "r"
        out = t.train(*t.ws.fresh(run, config=t.ws.cache_config), f"teacher.cache={cache}").wait()
        problem = out.error_problem("manifest.json")
        return problem or (f"{run.parent} was written" if run.parent.exists() else None)
    return trial


def _cache_shard(damage: str, route: str) -> Check:
    """A damaged shard: `cache verify`, or a run reading the cache, stops in one line naming it."""
    def trial(t: Trial) -> str | None:
        cache = t.folder / "cache"
        shutil.copytree(t.ws.cache_reference().run, cache)
        shard = sorted(cache.glob("*.safetensors"))[t.rng.randrange(len(list(cache.glob("*.safetensors"))))]
        if damage == "truncate":
            shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
        elif damage == "flip":
            flip_byte(shard)
        else:
            shard.unlink()
        t.note(f"{damage} {shard.name}")
        if route == "verify":
            out = t.run([PY, "-m", "rrd_fast.cache", "verify", str(cache)])
        else:
            run = t.folder / "runs" / "r"
            out = t.train(*t.ws.fresh(run, config=t.ws.cache_config), f"teacher.cache={cache}").wait()
        return out.error_problem(shard.name)
    return trial


def _resume_state(damage: str) -> Check:
    """Damaged or code-carrying resume files: `--resume` stops in one line naming the file; no code runs."""
    def trial(t: Trial) -> str | None:
        from pipelines.synthetic import write_malicious_pickle

        run = t.ws.copy_partial(t.folder / "runs" / "r")
        state = run / STATE
        shard = sorted((run / "resume" / "memory").glob("*.safetensors"))[0]
        marker = t.folder / "code_ran"
        target = state
        if damage == "state_truncated":
            state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])
        elif damage == "state_garbage":
            state.write_bytes(random.Random(t.index).randbytes(state.stat().st_size))
        elif damage == "state_empty":
            state.write_bytes(b"")
        elif damage == "state_pickle":
            write_malicious_pickle(state, marker)
        else:
            target = shard
            if damage == "shard_truncated":
                shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
            elif damage == "shard_header":
                shard.write_bytes((2**62).to_bytes(8, "little") + shard.read_bytes()[8:])
            elif damage == "shard_missing":
                shard.unlink()
            else:  # a valid safetensors file of the wrong content
                from safetensors.torch import save_file
                import torch

                save_file({"x": torch.zeros(3)}, str(shard))
        out = t.train("--resume", str(run), f"optim.epochs={EPOCHS}").wait()
        note_stale_lock(t, run)
        if marker.exists():
            return "a pickle in the resume state ran code"
        return out.error_problem(target.name)
    return trial


def _bench_slot(t: Trial, backend: str) -> tuple[Path, Path]:
    """(export.bench --out, the folder where it looks for a reusable artifact of `backend`) for the reference student."""
    ref = t.ws.reference().run
    sha = json.loads((ref / "model.json").read_text())["sha256"]
    out = t.folder / "bench"
    return out, out / "artifacts" / f"resnet8-{sha[:12]}" / f"{backend}-fp32-cpu"


def _bench_cmd(t: Trial, out: Path, backend: str, *extra: str) -> list[str]:
    return [PY, "-m", "export.bench", str(t.ws.reference().run), "--backends", backend, "--batch-sizes", "1",
            "--device", "cpu", "--warmup", "0", "--iters", "1", "--eval-limit", "8", "--out", str(out), *extra]


LOAD = ("import sys; from export.cli import run_cli; from export.artifact import load_artifact; "
        "sys.exit(run_cli(lambda: (load_artifact(sys.argv[1], 'cpu'), 0)[1]))")


def _artifact_tamper(kind: str) -> Check:
    def trial(t: Trial) -> str | None:
        if kind.startswith("native"):
            return _native_artifact(t, kind)
        folder = t.folder / "ort"
        shutil.copytree(t.ws.artifact(), folder)
        card = folder / "artifact.json"
        onnx = next(f["name"] for f in json.loads(card.read_text())["files"])
        if kind == "flipped":
            flip_byte(folder / onnx, (folder / onnx).stat().st_size - 10)
            needle = onnx
        elif kind == "traversal":
            (t.folder / "model.onnx").write_bytes((folder / onnx).read_bytes())
            edit_json(card, lambda m: m["files"][0].update(name="../model.onnx"))
            needle = "../model.onnx"
        elif kind == "absolute":
            edit_json(card, lambda m: m["files"][0].update(name="/etc/hostname"))
            needle = "/etc/hostname"
        else:
            edit_json(card, lambda m: m.update(batch_sizes="x"))
            needle = "batch_sizes"
        out = t.run([PY, "-c", LOAD, str(folder)])
        problem = out.error_problem(needle)
        if problem or kind != "flipped":
            return problem
        bench_out, slot = _bench_slot(t, "onnxruntime")  # export.bench reusing the tampered artifact
        shutil.copytree(folder, slot)
        out = t.run(_bench_cmd(t, bench_out, "onnxruntime"))
        return out.error_problem(onnx) or (None if not (bench_out / "bench.json").exists() else "bench.json written")
    return trial


def _native_artifact(t: Trial, kind: str) -> str | None:
    """An AOTInductor artifact (junk package, valid sha) others could have written: refused before loading."""
    import torch

    bench_out, slot = _bench_slot(t, "aotinductor")
    slot.mkdir(parents=True)
    card = json.loads((t.ws.artifact() / "artifact.json").read_text())
    package = slot / "model.pt2"
    package.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip: a loader that opens it fails
    card.update(backend="aotinductor", files=[{"name": "model.pt2", "sha256": hashlib.sha256(package.read_bytes()).hexdigest(),
                                               "bytes": package.stat().st_size}])
    card.setdefault("versions", {})["torch"] = torch.__version__
    (slot / "artifact.json").write_text(json.dumps(card))
    extra: list[str] = []
    if kind == "native_group":
        slot.chmod(0o775)
        needle = f"{slot}: refusing to load"
    elif kind == "native_world_file":
        slot.chmod(0o755)
        package.chmod(0o646)
        needle = "model.pt2: refusing to load"
    elif kind == "native_owner":
        slot.chmod(0o755)
        if os.geteuid() == 0:
            os.chown(package, 12345, -1)
            needle = "owned by uid 12345"
        else:
            t.note("not root, so no file of another uid can be made: checked a group-writable package instead")
            package.chmod(0o664)
            needle = "model.pt2: refusing to load"
    else:  # trusted explicitly: it is loaded, and a package that is not one fails in one line
        slot.chmod(0o775)
        extra, needle = ["--trust-artifact"], "cannot load"
    out = t.run(_bench_cmd(t, bench_out, "aotinductor", *extra))
    problem = out.error_problem(needle)
    if problem:
        return problem
    if not extra:
        loaded = t.run([PY, "-c", LOAD, str(slot)])
        problem = loaded.error_problem("refusing to load")
        if problem:
            return f"load_artifact: {problem}"
    return "bench.json written" if (bench_out / "bench.json").exists() else None


def trial_classes() -> list[TrialClass]:
    """Every class of trial, in the order the table lists them."""
    def each(name: str, checks: str, variants: list[Variant], default: int | None = None) -> TrialClass:
        return TrialClass(name, checks, variants, default if default is not None else len(variants))

    return [
        each("kill_train", "kill -9 at a random time; resume (or restart) ends byte-identical to the reference",
             [Variant("random time", kill_train)], 3),
        each("kill_write", "kill -9 while a checkpoint/weights/metrics temp file is open; resume byte-identical, "
             "no temp file left", [Variant("mid-write", kill_during_write)], 3),
        each("double_kill", "kill -9, resume, kill -9 the resume, resume: byte-identical",
             [Variant("twice", double_kill)], 2),
        each("sigterm", "SIGTERM/SIGINT: exit 143/130 with one 'stopped' line; resume byte-identical",
             [Variant("SIGTERM", _stop_signal(signal.SIGTERM)), Variant("SIGINT", _stop_signal(signal.SIGINT))]),
        each("kill_cache", "kill -9 `cache build`; the rerun completes with shards tensor-identical to an "
             "uninterrupted build", [Variant("random time", kill_cache_build)], 2),
        each("kill_rank", f"kill -9 one of two ranks: the other ends within {SURVIVOR_BOUND_S:.0f} s, the launcher "
             "fails; the folder resumes", [Variant("random rank", kill_rank)], 2),
        each("kill_launcher", f"kill -9 `accelerate launch`: workers gone within {SURVIVOR_BOUND_S:.0f} s; resume "
             "(1 process: byte-identical)", [Variant("1 process", _kill_launcher(1)), Variant("2 processes", _kill_launcher(2))]),
        each("two_writers", "a 2nd run on a folder being written is refused naming pid and host, the 1st goes on; "
             "stale lock taken over; another host's lock refused", [
                 Variant("--resume while running", _live_second_writer(lambda run: ["--resume", str(run)])),
                 Variant("--overwrite while running", _live_second_writer(lambda run: _fresh_of(run, "--overwrite"))),
                 Variant("fresh run on it", _live_second_writer(lambda run: _fresh_of(run), needle="already exists")),
                 Variant("stale lock", _planted_lock(None)),
                 Variant("other host's lock", _planted_lock("another-host.invalid")),
             ]),
        each("bad_config", "bad value (command line or file): one error line naming the key, exit 2, nothing "
             "written; 1e-3 and 5e-4 accepted",
             [Variant(f"{k}={v}", _bad_value(k, v)) for k, v in BAD_VALUES]
             + [Variant(f"{k}={v} accepted", _accepted_value(k, v, x)) for k, v, x in ACCEPTED_VALUES]),
        each("yaml_bomb", f"YAML alias bombs: one line, exit 2, under {BOMB_LIMIT_S:.0f} CPU s and "
             f"{BOMB_LIMIT_MB:.0f} MB, nothing written", [
                 Variant("config file", _bomb("file")), Variant("override", _bomb("override")),
                 Variant("self-alias", _bomb("recursive")), Variant("cache build", _bomb("cache")),
                 Variant("sweep file", _bomb("sweep"))]),
        each("bad_paths", "a file where a folder must be (output dir, run dir, cache, export --out): one line "
             "naming it, exit 2, the file untouched", [Variant(k, _path_is_file(k)) for k in (
                 "output_dir", "run_dir", "output_dir_parent", "resume", "cache", "export_out", "export_out_parent")]),
        each("readonly_dir", "read-only output dir / run folder: one line naming it, exit 2, nothing written",
             [Variant("output dir", _read_only("output_dir")), Variant("run folder (--resume)", _read_only("run"))]),
        each("disk_full", "file-size limit hit during a resumed run: one line saying disk full, exit 2, no temp "
             "file; resume then byte-identical", [Variant("limit", disk_full)], 3),
        each("resume_changed", "--resume with a changed setting: refused naming it, folder untouched; a larger "
             "optim.epochs is accepted and byte-identical",
             [Variant(f"{k}={v}", _resume_changed(k, v)) for k, v in RESUME_CHANGES]
             + [Variant("optim.epochs larger", resume_longer)]),
        each("resume_inputs", "teacher or data replaced before --resume: refused naming which, folder untouched", [
            Variant("teacher", _resume_inputs(True, False)), Variant("data", _resume_inputs(False, True)),
            Variant("both", _resume_inputs(True, True))]),
        each("corrupt_sidecar", "tampered teacher model.json/weights/.pth (train) or run model.json (export): one "
             "line, exit 2, nothing written, no code run", [
                 Variant("no arch", _sidecar(lambda m: m.pop("arch"))),
                 Variant("arch 5", _sidecar(lambda m: m.update(arch=5))),
                 Variant("no num_classes", _sidecar(lambda m: m.pop("num_classes"))),
                 Variant("num_classes '10'", _sidecar(lambda m: m.update(num_classes="10"))),
                 Variant("num_classes 1e8", _sidecar(lambda m: m.update(num_classes=100_000_000))),
                 Variant("in_channels -1", _sidecar(lambda m: m.update(in_channels=-1))),
                 Variant("mean of 2 channels", _sidecar(lambda m: m["normalization"].update(mean=[0.1, 0.2]))),
                 Variant("not JSON", _sidecar(None, raw="{\"arch\": ")),
                 Variant("weights changed", _sidecar(None, weights=True)),
                 Variant("malicious .pth", malicious_pth),
                 Variant("export: num_classes 'ten'", _export_sidecar(lambda m: m.update(num_classes="ten"))),
                 Variant("export: no arch", _export_sidecar(lambda m: m.pop("arch"))),
             ]),
        each("corrupt_cache", "corrupt cache manifest (run) or shard (verify, run): one line naming the file, exit 2", [
            Variant("shards 'x'", _cache_manifest(lambda m: m.update(shards="x"))),
            Variant("num_samples 1e12", _cache_manifest(lambda m: m["layout"].update(num_samples=10**12))),
            Variant("complete 'yes'", _cache_manifest(lambda m: m.update(complete="yes"))),
            Variant("truncated manifest", _cache_manifest(None, raw="{\"key\": {")),
            Variant("shard truncated (verify)", _cache_shard("truncate", "verify")),
            Variant("shard flipped (verify)", _cache_shard("flip", "verify")),
            Variant("shard missing (run)", _cache_shard("missing", "run")),
        ]),
        each("corrupt_resume", "damaged or code-carrying resume state and memory shards: one line naming the file, "
             "exit 2, no code run", [Variant(d, _resume_state(d)) for d in (
                 "state_truncated", "state_garbage", "state_empty", "state_pickle", "shard_truncated", "shard_header",
                 "shard_missing", "shard_wrong")]),
        each("tampered_artifact", "tampered ONNX artifact refused by load_artifact and export.bench; AOTInductor "
             "artifact writable by others (or owned by another uid) refused before loading unless --trust-artifact", [
                 Variant("file changed, sha stale", _artifact_tamper("flipped")),
                 Variant("name ../model.onnx", _artifact_tamper("traversal")),
                 Variant("name /etc/hostname", _artifact_tamper("absolute")),
                 Variant("batch_sizes 'x'", _artifact_tamper("schema")),
                 Variant("aoti folder group-writable", _artifact_tamper("native_group")),
                 Variant("aoti package world-writable", _artifact_tamper("native_world_file")),
                 Variant("aoti package of another uid", _artifact_tamper("native_owner")),
                 Variant("aoti --trust-artifact", _artifact_tamper("native_trusted")),
             ]),
    ]


def _fresh_of(run: Path, *extra: str) -> list[str]:
    """A fresh run's arguments for `run`, built from the folder's own config (as a second user would)."""
    return ["--config", str(run / "config.yaml"), f"output_dir={run.parent}", f"name={run.name}",
            "optim.epochs=1000", *extra]


# ------------------------------------------------------------------ running and reporting

@dataclass
class TrialResult:
    cls: str
    index: int
    variant: str
    handled: bool
    detail: str
    seconds: float
    cpu_s: float  # CPU time of the trial's processes and their children: a load-independent cost


def run_trials(classes: list[TrialClass], trials: int | None, seed: int, root: Path,
               log: Callable[[str], None]) -> tuple[list[TrialResult], float]:
    """Every trial of `classes`, and the CPU seconds the shared reference runs took."""
    ws = Workspace(root / "shared", log)
    results = []
    for cls in classes:
        rng = random.Random(f"{seed}:{cls.name}")
        for i in range(trials if trials is not None else cls.default_trials):
            variant = cls.variants[i % len(cls.variants)]
            folder = root / cls.name / f"{i:02d}"
            folder.mkdir(parents=True)
            t = Trial(ws, random.Random(rng.getrandbits(64)), i, folder)
            began = time.monotonic()
            try:
                problem = variant.fn(t)
            except Exception as exc:  # noqa: BLE001 - a harness failure is a failed trial, reported
                problem = f"harness: {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            finally:
                t.cleanup()
            detail = "; ".join(([problem] if problem else []) + t.notes)
            cpu = sum(p.cpu_s for p in t.procs)
            result = TrialResult(cls.name, i, variant.label, problem is None, detail, time.monotonic() - began, cpu)
            results.append(result)
            log(f"{cls.name} #{i} ({variant.label}): {'handled' if result.handled else 'FAILED'} in "
                f"{result.seconds:.1f} s{' - ' + detail if detail else ''}")
    return results, ws.cpu_s


def summarize(classes: list[TrialClass], results: list[TrialResult]) -> list[dict[str, Any]]:
    rows = []
    for cls in classes:
        mine = [r for r in results if r.cls == cls.name]
        rows.append({"class": cls.name, "trials": len(mine), "handled": sum(r.handled for r in mine),
                     "failed": sum(not r.handled for r in mine), "checks": cls.checks,
                     "seconds": round(sum(r.seconds for r in mine), 1), "cpu_s": round(sum(r.cpu_s for r in mine), 1)})
    return rows


def format_table(rows: list[dict[str, Any]], results: list[TrialResult]) -> str:
    width = max([len("class")] + [len(r["class"]) for r in rows])
    lines = [f"{'class':<{width}} | trials | handled | failed | what is checked",
             f"{'-' * width}-|--------|---------|--------|----------------"]
    for r in rows:
        lines.append(f"{r['class']:<{width}} | {r['trials']:>6} | {r['handled']:>7} | {r['failed']:>6} | {r['checks']}")
    total = {k: sum(r[k] for r in rows) for k in ("trials", "handled", "failed")}
    lines.append(f"{'total':<{width}} | {total['trials']:>6} | {total['handled']:>7} | {total['failed']:>6} |")
    failed = [r for r in results if not r.handled]
    if failed:
        lines += ["", "failed trials:"]
        lines += [f"  {r.cls} #{r.index} ({r.variant}): {r.detail}" for r in failed]
    return "\n".join(lines)


def select_classes(names: str | None) -> list[TrialClass]:
    classes = trial_classes()
    if not names:
        return classes
    known = {c.name: c for c in classes}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in known]
    if unknown or not wanted:
        raise HarnessError(f"--classes: unknown class {', '.join(unknown) or '(none given)'}; known: {', '.join(known)}")
    return [known[n] for n in wanted]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trials", type=int, default=None, metavar="N",
                        help="trials per class (default: each class's own count, about 10 minutes in all on 2 cores)")
    parser.add_argument("--classes", default=None, metavar="A,B",
                        help="comma-separated subset of: " + ", ".join(c.name for c in trial_classes()))
    parser.add_argument("--seed", type=int, default=None, help="seed of kill times and limits (default: random, printed)")
    parser.add_argument("--out", type=Path, default=None, metavar="FILE.json", help="write every trial's result as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (runs, logs) and print where it is")


def _loads(loads: list[float] | None) -> str:
    return "/".join(f"{x:.1f}" for x in loads) if loads else "unknown"


def command(args: argparse.Namespace) -> int:
    classes = select_classes(args.classes)
    if args.trials is not None and args.trials < 1:
        raise HarnessError(f"--trials: expected a positive count, got {args.trials}")
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    root = Path(tempfile.mkdtemp(prefix="rrd-reliability-"))
    load_before = load_average()
    print(f"reliability harness: seed {seed} (replay with --seed {seed}), {machine_name()}, 1 thread per process, "
          f"load average {_loads(load_before)}, work folder {root}", flush=True)
    began = time.monotonic()
    try:
        results, reference_cpu = run_trials(classes, args.trials, seed, root, log)
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    wall = time.monotonic() - began
    cpu = reference_cpu + sum(r.cpu_s for r in results)
    rows = summarize(classes, results)
    print(format_table(rows, results))
    print(f"wall time {wall:.0f} s, subprocess CPU time {cpu:.0f} s, load average now {_loads(load_average())}"
          + (f"; work folder kept: {root}" if args.keep else ""))
    if args.out is not None:
        write_json(args.out, {"seed": seed, "machine": machine_name(), "threads_per_process": 1, "wall_s": round(wall, 1),
                              "cpu_s": round(cpu, 1), "load_average": [load_before, load_average()],
                              "classes": rows, "trials": [asdict(r) for r in results]})
    return 0 if all(r.handled for r in results) else 1
