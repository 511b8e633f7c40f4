"""The Accelerate training loop shared by teacher training and every distillation method.

It sums the named terms an `Objective` returns and knows no method names. Resume state
is written atomically at epoch ends; since batches are a pure function of (seed, epoch),
a resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import threading
import time
import warnings
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs
from torch import nn
from tqdm import tqdm

from pipelines.batch import Batch
from pipelines.errors import first_line
from rrd_fast.atomic import atomic_path, write_json_atomic
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.cli import RunError
from rrd_fast.compile import Compiler, resolve_compile, sgd
from rrd_fast.config import RunConfig, config_to_dict, load_config, save_config
from rrd_fast.data import RunData, build_data
from rrd_fast.methods import InitStage, NetInfo, Objective, TermContext
from rrd_fast.methods.objective import resolve_weights
from rrd_fast.models import ModelOutput, create_model, feat_shapes
from rrd_fast.precision import resolve_mixed_precision, warn_if_emulated
from rrd_fast.threads import resolve_threads
from rrd_fast.tracking import end_tracking, log_epoch, make_tracker_kwargs, start_tracking
from rrd_fast.run_dir import check_fresh, open_run_dir
from rrd_fast.cache.manifest import split_fingerprint
from rrd_fast.memory.resume import load_rank_shards, memory_shards, remove_stale_shards, write_rank_shards
from rrd_fast.checkpoint import load_teacher
from rrd_fast.teacher import open_teacher

RESUME_FILE = "resume/state.pt"
BEST_WEIGHTS = "model_best.safetensors"


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def epoch_line(record: dict[str, Any], state: "TrainState", total_main: int, total_init: int, elapsed: float,
               eta: float) -> str:
    """One line per epoch: where the run is, its losses and accuracy, speed and time left."""
    if record["stage"] == "init":
        head = f"init {record['epoch']}/{total_init}"
    else:
        head = f"epoch {record['epoch']}/{total_main}"
    terms = " ".join(f"{k.removeprefix('loss_')} {v:.4f}" for k, v in record.items() if k.startswith("loss_"))
    parts = [head, f"lr {record['lr']:.3g}", f"loss {record['loss']:.4f} ({terms})"]
    if "train_top1" in record:
        parts.append(f"train top-1 {record['train_top1']:.2f}")
    if "top1" in record:
        parts.append(f"top-1 {record['top1']:.2f} (best {state.best_top1:.2f} at epoch {state.best_epoch + 1})")
    parts += [f"{record['images_per_s']:.0f} img/s", f"elapsed {_clock(elapsed)}", f"eta {_clock(eta)}"]
    return " | ".join(parts)


class DistillModule(nn.Module):
    """Student plus the objective's heads and memories: everything the optimizer or DDP touches."""

    def __init__(self, student: nn.Module, objective: Objective) -> None:
        super().__init__()
        self.student = student
        self.objective = objective

    def forward(self, images: torch.Tensor, teacher_out: ModelOutput | None, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.student(images, features=True)
        return out.logits, self.objective(out, teacher_out, batch)


def net_info(model: nn.Module, arch: str, num_classes: int, in_channels: int, image_size: int) -> NetInfo:
    return NetInfo(arch=arch, num_classes=num_classes, pooled_dim=int(model.pooled_dim),
                   stage_channels=tuple(int(c) for c in model.stage_channels),
                   feat_shapes=feat_shapes(model, in_channels, image_size))


def lr_at(cfg: RunConfig, epoch: int) -> float:
    """Step decay at the milestones (0-based epochs, as RepDistiller's 1-based `epoch > m`)."""
    lr = cfg.optim.lr
    if cfg.optim.lr_scaling == "linear":
        lr *= cfg.data.batch_size / cfg.optim.base_batch_size
    return lr * cfg.optim.lr_decay ** sum(epoch >= m for m in cfg.optim.milestones)


@dataclass
class InitRun:
    """A method's init stage as the trainer runs it: the stage, its term, and its own optimizer."""

    term_name: str
    stage: InitStage
    params: list[nn.Parameter]
    modules: list[nn.Module]
    optimizer: torch.optim.Optimizer


_LAUNCHER_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def check_launch(accelerator: Accelerator, cfg: RunConfig | None = None) -> None:
    """Refuse launches that would silently train something other than what was asked for.

    Launchers export the number of processes they started (torchrun and `accelerate launch
    --multi_gpu`: WORLD_SIZE; MPI: PMI_SIZE / OMPI_COMM_WORLD_SIZE). If Accelerate sees fewer,
    N independent single-process trainings are running, e.g. `--multi_gpu` without GPUs,
    `Accelerator(cpu=True)` or ACCELERATE_USE_CPU. (`accelerate launch --cpu --num_processes N`
    starts one process and exports nothing, so that mistake cannot be seen from inside.)
    """
    launched = max(int(os.environ.get(name) or 1) for name in _LAUNCHER_WORLD_VARS)
    if launched > 1 and accelerator.num_processes != launched:
        raise RunError(
            f"launched {launched} processes but each sees world size {accelerator.num_processes}, so they would train "
            "independently: on CPU use `accelerate launch --multi_gpu --num_processes N` with ACCELERATE_USE_CPU=true "
            "(`--cpu` runs one process)"
        )
    if cfg is not None and cfg.distributed.sync_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cpu":
        raise RunError("distributed.sync_batchnorm: torch's SyncBatchNorm runs only on GPUs; set it to false on CPU")


@dataclass
class TrainState:
    epoch: int = 0  # next epoch to run, counting a method's init-stage epochs first
    global_step: int = 0
    best_top1: float = -1.0
    best_epoch: int = -1  # main-stage epoch (0-based)
    history: list[dict[str, Any]] = field(default_factory=list)
    step_in_epoch: int = 0  # >0: a mid-epoch checkpoint; the epoch resumes at this batch
    partial: dict[str, Any] | None = None  # the interrupted epoch's running sums, so its record is exact


class TrainingStopped(Exception):
    """SIGTERM/SIGINT: the step finished, a mid-epoch resume state was written, the run exits."""

    def __init__(self, signum: int, epoch: int, step: int, run_dir: Path) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} in epoch {epoch + 1} after step {step}; "
                         f"resume with: python rrd_fast/train.py --resume {run_dir}")
        self.exit_code = 128 + signum


# Settings that cannot change the trajectory up to the point where a run stopped; anything else
# differing on --resume would silently make a run that is neither the old one nor a new one.
RESUME_MAY_CHANGE = ("name", "output_dir", "optim.epochs", "train.progress", "train.save_every", "train.save_every_steps",
                     "train.log_with", "train.threads", "teacher.cache_verify", "train.sync_every",
                     # compiled kernels round differently from eager ones; a resume may switch, exactness is per setting
                     "train.compile", "train.compile_mode", "train.compile_backend")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and not (prefix.endswith("options") or prefix == "method.options"):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    return {prefix: tree}


def resume_differences(saved: RunConfig, wanted: RunConfig) -> list[str]:
    """`key: saved -> wanted` for every setting that differs and may not change on resume."""
    a, b = _flat(config_to_dict(saved)), _flat(config_to_dict(wanted))
    return [f"{key} {a.get(key)!r} -> {b.get(key)!r}" for key in sorted(set(a) | set(b))
            if a.get(key) != b.get(key) and key not in RESUME_MAY_CHANGE]


def resolve_method(cfg: RunConfig) -> None:
    """Fill the weights the user left unset with the method's own, so config.yaml shows what ran."""
    cfg.method.gamma, cfg.method.alpha, cfg.method.beta = resolve_weights(cfg.method)


class Trainer:
    def __init__(self, cfg: RunConfig, resume: bool = False, rebuild_cache: bool = False, overwrite: bool = False) -> None:
        self.cfg = cfg
        ddp = DistributedDataParallelKwargs(broadcast_buffers=False)
        cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
        device = torch.device("cpu") if cpu else torch.device("cuda")
        cfg.train.mixed_precision = resolve_mixed_precision(cfg.train.mixed_precision, device)
        resolve_method(cfg)
        self.accelerator = Accelerator(mixed_precision=cfg.train.mixed_precision, cpu=cpu, kwargs_handlers=[ddp],
                                       **make_tracker_kwargs(cfg))
        check_launch(self.accelerator, cfg)
        acc = self.accelerator
        self.run_dir = cfg.run_dir
        if not resume:
            check_fresh(self.run_dir, overwrite)  # every rank, before any writes
        else:
            self._check_resume_config(device)
        self.lock = None
        self._stop_signal: int | None = None
        self._agreed_stop = 0  # the stop signal the last check agreed on; only this decides a stop
        warn_if_emulated(acc.device, cfg.train.mixed_precision)
        cfg.train.threads = resolve_threads(cfg)  # the same under every launcher; saved in config.yaml
        torch.manual_seed(cfg.seed)
        self.data: RunData = build_data(cfg.data, cfg.seed, acc.process_index, acc.num_processes, acc.device,
                                        cfg.train.mixed_precision)
        m = cfg.method
        compiled, why = resolve_compile(cfg.train.compile, len(self.data.train) * cfg.optim.epochs, acc.device)
        self.compiler = Compiler(compiled, cfg.train.compile_backend, cfg.train.compile_mode, acc.device)
        if acc.is_main_process and cfg.train.progress:
            print(f"data: {self.data.fmt.name}, {self.data.num_classes} classes, {self.data.num_train} train / "
                  f"{self.data.num_eval} eval samples, "
                  f"{self.data.backend} pipeline (data.pipeline={cfg.data.pipeline}), "
                  f"{str(self.data.train.dtype).removeprefix('torch.')} batches, "
                  f"train.mixed_precision={cfg.train.mixed_precision}, {cfg.train.threads} CPU threads per process "
                  f"(train.threads)", flush=True)
            print(f"method: {m.name}, loss = {m.gamma:g}*CE + {m.alpha:g}*KD + {m.beta:g}*{m.name}", flush=True)
            mode = f", mode {self.compiler.mode}, backend {self.compiler.backend}" if compiled else ""
            print(f"compile: {why}{mode}", flush=True)
        fmt = self.data.fmt
        student = create_model(cfg.student.arch, num_classes=self.data.num_classes, in_channels=fmt.channels)
        teacher_model, self.teacher_meta = self._load_teacher()
        teacher_info = (net_info(teacher_model, self.teacher_meta["arch"], self.data.num_classes, fmt.channels, fmt.image_size)
                        if teacher_model is not None else None)
        sharding = cfg.distributed.memory_sharding
        if sharding == "auto":
            sharding = "sharded" if acc.num_processes > 1 else "local"
        context = TermContext(self.data.num_train, cfg.seed, acc.num_processes, sharding, train_labels=self.data.train_labels)
        student_info = net_info(student, cfg.student.arch, self.data.num_classes, fmt.channels, fmt.image_size)
        objective = Objective(cfg.method, student_info, teacher_info, context)
        if cfg.distributed.sync_batchnorm and acc.num_processes > 1:
            student = nn.SyncBatchNorm.convert_sync_batchnorm(student)
        memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.memory_format = memory_format
        module = DistillModule(student.to(memory_format=memory_format), objective)
        params = [p for p in module.parameters() if p.requires_grad]
        optimizer = sgd(params, acc.device, lr=lr_at(cfg, 0), momentum=cfg.optim.momentum,
                        weight_decay=cfg.optim.weight_decay, nesterov=cfg.optim.nesterov)
        with warnings.catch_warnings():
            # torch deprecates broadcast_buffers but its replacement still syncs buffers at init, which would
            # overwrite the per-rank memories; torch's own warning says to keep broadcast_buffers=False for that.
            warnings.filterwarnings("ignore", message=r"`broadcast_buffers` is deprecated", category=FutureWarning)
            self.module, self.optimizer = acc.prepare(self.compiler.module(module), optimizer)
        # Evaluation's own compiled graph (the student in eval mode); the saved weights stay the student's.
        self.eval_student = self.compiler.function(module.student)
        self._first_step_pending = compiled
        self.init = self._build_init_stage()
        self.fingerprints = {"data": split_fingerprint(fmt.name, cfg.data.root, self.data.train_split),
                             "teacher": self.teacher_meta["sha256"] if self.teacher_meta else None}
        if teacher_model is not None and cfg.teacher.eval_top1 and not resume:
            self.teacher_meta["top1"] = self._teacher_top1(teacher_model)
        self.teacher = self._open_teacher(teacher_model, rebuild_cache)
        if compiled and hasattr(self.teacher, "static_buffers"):
            self.teacher.static_buffers = True
        self.state = TrainState()
        acc.wait_for_everyone()  # every rank has checked the folder before rank 0 creates it
        if acc.is_main_process:
            self.lock = open_run_dir(self.run_dir, resume, overwrite)
        if resume:
            try:
                self._load_resume()
            except BaseException:
                self.close()  # a refused resume leaves the folder as it was, its lock included
                raise
        if acc.is_main_process:
            save_config(cfg, self.run_dir / "config.yaml")  # on resume: the resolved config, new epoch count included
        start_tracking(acc, cfg)

    def _check_resume_config(self, device: torch.device) -> None:
        path = self.run_dir / "config.yaml"
        if not path.is_file():
            raise RunError(f"{path}: no config.yaml in this run folder, so it cannot be resumed")
        saved = load_config(path)
        saved.train.mixed_precision = resolve_mixed_precision(saved.train.mixed_precision, device)
        resolve_method(saved)
        saved.name, saved.output_dir = self.cfg.name, self.cfg.output_dir
        diffs = resume_differences(saved, self.cfg)
        if diffs:
            raise RunError(f"--resume {self.run_dir}: these settings differ from the run's own ({'; '.join(diffs)}); "
                           f"only {', '.join(RESUME_MAY_CHANGE[2:])} may change on resume; start a new run instead")

    def _load_teacher(self) -> tuple[nn.Module | None, dict[str, Any] | None]:
        cfg, fmt = self.cfg, self.data.fmt
        if cfg.teacher.arch and not cfg.teacher.checkpoint:
            raise RunError("teacher.checkpoint: a teacher architecture is set but no checkpoint to load it from")
        from rrd_fast.methods import get_method

        if not get_method(cfg.method.name).uses_teacher:
            return None, None
        if not cfg.teacher.checkpoint:
            raise RunError(f"teacher.checkpoint: method {cfg.method.name!r} needs a teacher checkpoint")
        return load_teacher(cfg.teacher.checkpoint, cfg.teacher.arch, self.data.num_classes, fmt.channels)

    def _build_init_stage(self) -> InitRun | None:
        """The method's init stage (AB, FT, FSP), with a fresh SGD over what it trains, as helper/pretrain.py."""
        stages = self.unwrapped.objective.init_stages()
        if not stages:
            return None
        if len(stages) > 1:
            raise RunError(f"method: terms {[n for n, _ in stages]} each have an init stage; at most one can run")
        (name, stage), cfg = stages[0], self.cfg
        modules = list(stage.modules)
        if stage.student_features:
            modules += list(self.unwrapped.student.feature_modules())
        params = list(dict.fromkeys(p for mod in modules for p in mod.parameters()))
        lr = stage.lr if stage.lr is not None else lr_at(self.cfg, 0)
        optimizer = torch.optim.SGD(params, lr=lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay)
        return InitRun(name, stage, params, modules, optimizer)

    def _teacher_top1(self, model: nn.Module) -> float:
        """The teacher's own top-1 on this run's eval split, recorded so that a weak teacher shows."""
        home = next(model.parameters()).device
        top1 = self.evaluate_model(model.to(self.accelerator.device, memory_format=self.memory_format))["top1"]
        model.to(home)
        if self.accelerator.is_main_process and self.cfg.train.progress:
            print(f"teacher: {self.teacher_meta['arch']} from {self.teacher_meta['checkpoint']}, "
                  f"top-1 {top1:.2f} on the eval split", flush=True)
        return top1

    @property
    def init_epochs(self) -> int:
        return self.init.stage.epochs if self.init is not None else 0

    def _open_teacher(self, teacher_model: nn.Module | None, rebuild_cache: bool) -> Any:
        """The online or cached teacher, or None when no stage of the objective reads the teacher."""
        cfg, acc = self.cfg, self.accelerator
        objective = self.unwrapped.objective
        fields = list(objective.teacher_fields)
        if self.init is not None:
            fields += [f for f in self.init.stage.teacher_fields if f not in fields]
        if teacher_model is None or not fields:
            return None
        return open_teacher(cfg, teacher_model, self.teacher_meta, self.data, acc, self.memory_format,
                            self.fingerprints["data"], rebuild_cache, self.compiler)

    # ------------------------------------------------------------------ state
    @property
    def unwrapped(self) -> DistillModule:
        return self.accelerator.unwrap_model(self.module)

    def _memory_tag(self) -> str:
        return f"step{self.state.global_step:010d}"

    def _resume_payload(self) -> dict[str, Any]:
        """Everything but the memories' row buffers, which each rank writes itself (`_save_resume`)."""
        scaler = self.accelerator.scaler
        memory_rows = set(memory_shards(self.unwrapped))
        return {
            "module": {k: v for k, v in self.unwrapped.state_dict().items() if k not in memory_rows},
            "memory_tag": self._memory_tag(),
            "memory_world_size": self.accelerator.num_processes,
            "optimizer": self.optimizer.state_dict(),
            "init_optimizer": self.init.optimizer.state_dict() if self.init is not None else {},
            "scaler": scaler.state_dict() if scaler is not None else {},
            "epoch": self.state.epoch,
            "global_step": self.state.global_step,
            "best_top1": self.state.best_top1,
            "best_epoch": self.state.best_epoch,
            "history_json": json.dumps(self.state.history),
            "step_in_epoch": self.state.step_in_epoch,
            "partial_json": json.dumps(self.state.partial),
            "teacher_meta_json": json.dumps(self.teacher_meta),
            "fingerprints_json": json.dumps(self.fingerprints),
            "torch_rng": torch.get_rng_state(),
        }

    def _save_resume(self) -> None:
        """Each rank writes its memory rows; then rank 0 writes the main file naming them, then drops older ones.

        No rank gathers a sharded memory, not even here; see `rrd_fast.memory.resume`. Called on every rank.
        """
        acc = self.accelerator
        write_rank_shards(self.run_dir, self._memory_tag(), self.unwrapped, acc.process_index, acc.num_processes)
        acc.wait_for_everyone()
        if acc.is_main_process:
            with atomic_path(self.run_dir / RESUME_FILE) as tmp:
                torch.save(self._resume_payload(), tmp)
            remove_stale_shards(self.run_dir, keep=self._memory_tag())

    def _load_resume(self) -> None:
        path = self.run_dir / RESUME_FILE
        if not path.is_file():
            raise RunError(f"{path}: no resume state in this run folder")
        try:
            # CPU first: under MULTI_CPU the device is "cpu:0", which torch.load cannot map to; load_state_dict copies to the device.
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:
            raise RunError(f"{path}: resume state unreadable ({first_line(exc)})") from None
        saved_inputs = json.loads(payload.get("fingerprints_json", "null")) or {}
        changed = [name for name, value in saved_inputs.items() if value != self.fingerprints.get(name)]
        if changed:
            what = {"data": f"the training data ({self.cfg.data.root})", "teacher": f"the teacher ({self.cfg.teacher.checkpoint})"}
            raise RunError(f"{path}: {' and '.join(what[c] for c in changed)} changed since this run started "
                           "(fingerprints differ); resume needs the same inputs, start a new run instead")
        memory_rows = set(memory_shards(self.unwrapped))
        try:
            missing, unexpected = self.unwrapped.load_state_dict(payload["module"], strict=False)
        except RuntimeError as exc:
            raise RunError(f"{path}: resume state does not fit this config ({first_line(exc)})") from None
        if unexpected or set(missing) != memory_rows or "memory_tag" not in payload:
            wrong = sorted(set(unexpected) | (set(missing) - memory_rows)) or ["memory shards"]
            raise RunError(f"{path}: resume state does not fit this config (mismatched {', '.join(wrong[:3])})")
        # Memories are re-split for this run's number of processes: each rank reads only its own rows.
        load_rank_shards(self.run_dir, str(payload["memory_tag"]), int(payload["memory_world_size"]), self.unwrapped,
                         self.accelerator.process_index, self.accelerator.num_processes)
        self.optimizer.load_state_dict(payload["optimizer"])
        if self.init is not None and payload.get("init_optimizer"):
            self.init.optimizer.load_state_dict(payload["init_optimizer"])
        if self.accelerator.scaler is not None and payload["scaler"]:
            self.accelerator.scaler.load_state_dict(payload["scaler"])
        self.state = TrainState(int(payload["epoch"]), int(payload["global_step"]), float(payload["best_top1"]),
                                int(payload["best_epoch"]), json.loads(payload["history_json"]),
                                int(payload.get("step_in_epoch", 0)), json.loads(payload.get("partial_json", "null")))
        torch.set_rng_state(payload["torch_rng"].cpu())
        saved_teacher = json.loads(payload.get("teacher_meta_json", "null"))
        if saved_teacher and self.teacher_meta is not None and "top1" in saved_teacher:
            self.teacher_meta["top1"] = saved_teacher["top1"]

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        total = self.init_epochs + self.cfg.optim.epochs
        previous = self._install_signal_handlers()
        try:
            self._fit_epochs(total)
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        summary = self.summary()
        if self.accelerator.is_main_process:
            write_json_atomic(self.run_dir / "summary.json", summary)
            from rrd_fast.plot import write_curves  # matplotlib is imported only when a run ends

            write_curves(self.run_dir)
        self.close()
        return summary

    def request_stop(self, signum: int = signal.SIGTERM, frame: Any = None) -> None:
        """Signal handler: finish the current step, checkpoint mid-epoch, then stop (a second SIGINT interrupts)."""
        if self._stop_signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._stop_signal = signum

    def _should_pause(self, done_steps: int) -> bool:
        """Checkpoint after this step? Every rank must agree, so with several processes the stop flag is
        all-reduced, every 10 steps to keep host syncs rare."""
        every = self.cfg.train.save_every_steps
        periodic = every > 0 and self.state.global_step % every == 0
        if self.accelerator.num_processes > 1 and done_steps % 10 and not periodic:
            return False
        stop = self._stop_agreed()  # always, so that every rank reaches the same all-reduces
        return periodic or bool(stop)

    def _stop_agreed(self) -> int:
        """The stop signal every rank has seen (0: none); with several processes, all-reduced. A signal that
        arrives during the all-reduce is kept for the next check, not overwritten."""
        if self.accelerator.num_processes == 1:
            self._agreed_stop = self._stop_signal or 0
            return self._agreed_stop
        flag = torch.tensor(float(self._stop_signal or 0), device=self.accelerator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        self._agreed_stop = int(flag.item())
        self._stop_signal = self._agreed_stop or self._stop_signal
        return self._agreed_stop

    def _install_signal_handlers(self) -> dict[int, Any]:
        """Route SIGTERM/SIGINT to `request_stop` for the duration of `fit`; returns the handlers to restore."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        return {signum: signal.signal(signum, self.request_stop) for signum in (signal.SIGTERM, signal.SIGINT)}

    def _fit_epochs(self, total: int) -> None:
        cfg, acc = self.cfg, self.accelerator
        began, first = time.perf_counter(), self.state.epoch
        while self.state.epoch < total:
            epoch = self.state.epoch
            if epoch < self.init_epochs:
                record = self._train_epoch(epoch, init=True)
            else:
                record = self._train_epoch(epoch, init=False)
                main_epoch = epoch - self.init_epochs
                if (main_epoch + 1) % cfg.train.eval_every == 0 or main_epoch + 1 == cfg.optim.epochs:
                    record.update(self.evaluate())
                    if record["top1"] > self.state.best_top1:
                        self.state.best_top1, self.state.best_epoch = record["top1"], main_epoch
            self.state.history.append(record)
            log_epoch(acc, record)
            self.state.epoch += 1
            if acc.is_main_process:
                self._write_metrics()
                self._write_student(best=record.get("top1") is not None and self.state.best_epoch == record["epoch"] - 1
                                    and record["stage"] == "main")
                if cfg.train.progress:
                    done = self.state.epoch - first
                    elapsed = time.perf_counter() - began
                    print(epoch_line(record, self.state, total_main=cfg.optim.epochs, total_init=self.init_epochs,
                                     elapsed=elapsed, eta=elapsed / done * (total - self.state.epoch)), flush=True)
            stop = self._stop_agreed()
            if self.state.epoch % cfg.train.save_every == 0 or self.state.epoch == total or stop:
                self._save_resume()
            acc.wait_for_everyone()
            if stop and self.state.epoch < total:
                raise TrainingStopped(stop, self.state.epoch - 1, len(self.data.train), self.run_dir)

    def close(self) -> None:
        """Close the trackers and release the run folder (fit does this at its end)."""
        end_tracking(self.accelerator)
        if self.lock is not None:
            self.lock.release()

    def _sync_buffers(self) -> None:
        """DDP runs with broadcast_buffers=False (memories differ per rank), so BN stats are synced here."""
        if self.accelerator.num_processes > 1:
            for buf in self.unwrapped.student.buffers():
                torch.distributed.broadcast(buf, 0)

    def _main_step(self, batch: Batch, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        teacher_out = self.teacher(batch, images) if self.teacher is not None and self._main_reads_teacher else None
        logits, losses = self.module(images, teacher_out, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.accelerator.backward(sum(losses.values()))
        self.optimizer.step()
        return logits, losses

    def _init_step(self, batch: Batch, images: torch.Tensor) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
        """One step of the init stage: the term's init loss, its own optimizer, gradients averaged by hand.

        DDP is bypassed (the init modules may not require grad in the main stage, so DDP does not
        reduce them); with several processes the gradients are all-reduced here instead.
        """
        assert self.init is not None
        module = self.unwrapped
        term = module.objective.terms[self.init.term_name]
        teacher_out = self.teacher(batch, images) if self.teacher is not None else None
        student_out = None
        if self.init.stage.student_features:
            with self.accelerator.autocast():
                student_out = module.student(images, features=True)
        with self.accelerator.autocast():
            loss = term.init_loss(student_out, teacher_out, batch)
        self.init.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.accelerator.num_processes > 1:
            for param in self.init.params:
                if param.grad is not None:
                    torch.distributed.all_reduce(param.grad)
                    param.grad /= self.accelerator.num_processes
        self.init.optimizer.step()
        logits = student_out.logits if student_out is not None else None
        return logits, {"init": loss}

    def _set_modes(self, init: bool) -> None:
        """Main stage: everything in train mode. Init stage: as helper/pretrain.py, the student in eval
        mode and then the init modules (which may be the student's feature modules) in train mode."""
        self.module.train()
        if init:
            assert self.init is not None
            self.unwrapped.student.eval()
            for mod in self.init.modules:
                mod.train()

    @property
    def _main_reads_teacher(self) -> bool:
        return bool(self.unwrapped.objective.teacher_fields)

    def _train_epoch(self, epoch: int, init: bool) -> dict[str, Any]:
        cfg, acc = self.cfg, self.accelerator
        main_epoch = epoch - self.init_epochs
        if init:
            assert self.init is not None
            lr = self.init.optimizer.param_groups[0]["lr"]
            names, step_fn = ["init"], self._init_step
            desc = f"init {epoch + 1}/{self.init_epochs}"
            flags = [p.requires_grad for p in self.init.params]
            for param in self.init.params:
                param.requires_grad_(True)
        else:
            lr = lr_at(cfg, main_epoch)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.unwrapped.objective.start_epoch(main_epoch)
            names, step_fn = list(self.unwrapped.objective.weights), self._main_step
            desc = f"epoch {main_epoch + 1}/{cfg.optim.epochs}"
        self._set_modes(init)
        pipe = self.data.train
        steps = len(pipe)
        first, partial = self.state.step_in_epoch, self.state.partial or {}
        sums = torch.tensor(partial.get("sums", [0.0] * len(names)), device=acc.device, dtype=torch.float64)
        correct = torch.tensor(int(partial.get("correct", 0)), device=acc.device, dtype=torch.long)
        pending: list[torch.Tensor] = []
        seen = int(partial.get("seen", 0))
        bar = tqdm(total=steps, initial=first, desc=desc,
                   disable=not (cfg.train.progress and acc.is_local_main_process), leave=False, dynamic_ncols=True)
        start = time.perf_counter() - float(partial.get("elapsed", 0.0))
        for step, batch in enumerate(pipe.epoch(epoch, first), start=first):
            images = batch.images.contiguous(memory_format=self.memory_format)
            if self._first_step_pending and not init:
                began = time.perf_counter()
                logits, losses = step_fn(batch, images)
                self._report_first_step(time.perf_counter() - began)
            else:
                logits, losses = step_fn(batch, images)
            values = torch.stack([losses[n].detach().double() for n in names])
            pending.append(values)
            sums += values
            if logits is not None:
                correct += (logits.detach().argmax(1) == batch.labels).sum()
            seen += len(batch)
            self.state.global_step += 1
            # Reading the losses on the host waits for the device, so it happens every train.sync_every steps.
            if len(pending) >= cfg.train.sync_every or step + 1 == steps:
                self._check_finite(pending, names, self.state.global_step - len(pending))
                pending = []
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(sums.sum()) / (step + 1):.4f}", img_s=f"{seen * acc.num_processes / elapsed:.0f}")
            bar.update(1)
            if step + 1 < steps and self._should_pause(step + 1):
                self.state.step_in_epoch = step + 1
                self.state.partial = {"sums": sums.tolist(), "correct": int(correct), "seen": seen,
                                      "elapsed": time.perf_counter() - start}
                self._save_resume()
                if self._agreed_stop:
                    bar.close()
                    raise TrainingStopped(self._agreed_stop, epoch, step + 1, self.run_dir)
        bar.close()
        self.state.step_in_epoch, self.state.partial = 0, None
        if init:
            for param, flag in zip(self.init.params, flags):
                param.requires_grad_(flag)
        elapsed = time.perf_counter() - start
        sums = acc.reduce(sums, reduction="mean")
        correct = acc.reduce(correct, reduction="sum")
        record: dict[str, Any] = {"stage": "init" if init else "main",
                                  "epoch": epoch + 1 if init else main_epoch + 1, "lr": lr, "epoch_time_s": elapsed,
                                  "images_per_s": seen * acc.num_processes / elapsed}
        if not init:
            record["train_top1"] = 100.0 * float(correct) / (seen * acc.num_processes)
        record["loss"] = float(sums.sum()) / steps
        for name, value in zip(names, sums.tolist()):
            record[f"loss_{name}"] = value / steps
        return record

    def _report_first_step(self, seconds: float) -> None:
        """A compiled run's first step compiles its graphs: say how long that took (once per process)."""
        self._first_step_pending = False
        if self.accelerator.is_main_process and self.cfg.train.progress:
            print(f"compile: the first compiled step took {seconds:.1f} s (compilation, or the kernel cache)", flush=True)

    def _check_finite(self, pending: list[torch.Tensor], names: list[str], first_step: int) -> None:
        values = torch.stack(pending).cpu()
        bad = ~torch.isfinite(values)
        if bad.any():
            row, col = (int(i) for i in bad.nonzero()[0])
            raise RunError(f"non-finite loss at step {first_step + row + 1}: term {names[col]!r} = {values[row, col].item()}")

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        self._sync_buffers()
        student = self.unwrapped.student
        student.eval()
        result = self.evaluate_model(self.eval_student, pad=self.compiler.enabled)
        student.train()
        return result

    @torch.no_grad()
    def evaluate_model(self, model: nn.Module | Any, pad: bool = False) -> dict[str, float]:
        """Top-1/top-5 of `model` (already in eval mode, on this device) on the eval split, over all ranks.

        With `pad`, a last smaller batch is padded to the first batch's size (the padding rows' logits are
        dropped; eval-mode BN treats rows independently), so a compiled model sees one shape."""
        acc = self.accelerator
        counts = torch.zeros(3, device=acc.device, dtype=torch.long)
        full = 0
        for batch in self.data.eval.epoch(0):
            images = batch.images.contiguous(memory_format=self.memory_format)
            full, n = max(full, len(batch)), len(batch)
            if pad and n < full:
                images = torch.cat([images, images[:1].expand(full - n, *images.shape[1:])])
                images = images.contiguous(memory_format=self.memory_format)
            with acc.autocast():
                logits = model(images)[:n]
            top5 = logits.float().topk(min(5, logits.shape[1]), dim=1).indices
            hits = top5 == batch.labels[:, None]
            counts += torch.stack([hits[:, 0].sum(), hits.any(1).sum(), torch.tensor(len(batch), device=acc.device)])
        counts = acc.reduce(counts, reduction="sum")
        total = max(int(counts[2]), 1)
        return {"top1": 100.0 * float(counts[0]) / total, "top5": 100.0 * float(counts[1]) / total}

    # ------------------------------------------------------------------ outputs
    def _write_metrics(self) -> None:
        with atomic_path(self.run_dir / "metrics.jsonl") as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in self.state.history))

    def _write_student(self, best: bool = False) -> None:
        cfg, fmt = self.cfg, self.data.fmt
        evaluated = [r for r in self.state.history if "top1" in r]
        sidecar = {
            "arch": cfg.student.arch,
            "num_classes": self.data.num_classes,
            "class_names": list(self.data.class_names),
            "in_channels": fmt.channels,
            "image_size": fmt.image_size,
            "normalization": {"mean": list(fmt.mean), "std": list(fmt.std)},
            "dataset": {"format": fmt.name, "root": str(cfg.data.root)},
            "method": {"name": cfg.method.name, "gamma": cfg.method.gamma, "alpha": cfg.method.alpha,
                       "beta": cfg.method.beta, "options": cfg.method.options},
            "teacher": self.teacher_meta,
            "seed": cfg.seed,
            "epochs_trained": max(self.state.epoch - self.init_epochs, 0),
            "init_epochs_trained": min(self.state.epoch, self.init_epochs),
            "top1_final": evaluated[-1]["top1"] if evaluated else None,
            "top1_best": self.state.best_top1 if evaluated else None,
            "best_epoch": self.state.best_epoch + 1 if evaluated else None,
        }
        write_model_checkpoint(self.run_dir, self.unwrapped.student, sidecar)
        if best:  # the best epoch's weights beside the last, since users report both
            with atomic_path(self.run_dir / BEST_WEIGHTS) as tmp:
                shutil.copyfile(self.run_dir / "model.safetensors", tmp)

    def summary(self) -> dict[str, Any]:
        evaluated = [r for r in self.state.history if "top1" in r]
        main = [r for r in self.state.history if r.get("stage", "main") == "main"]
        times = [r["epoch_time_s"] for r in self.state.history]
        return {
            "run_dir": str(self.run_dir),
            "epochs": len(main),
            "init_epochs": len(self.state.history) - len(main),
            "top1_last": evaluated[-1]["top1"] if evaluated else math.nan,
            "top1_best": self.state.best_top1,
            "best_epoch": self.state.best_epoch + 1,
            "train_time_s": sum(times),
            "images_per_s": sum(r["images_per_s"] for r in main) / max(len(main), 1),
            "config": config_to_dict(self.cfg),
        }
