"""The linear probe itself: a frozen student, a new linear head on its pooled feature, SGD epochs.

The backbone never needs a gradient (its parameters are frozen and the head is its only
consumer), so it runs under `no_grad`; in `bn=train` mode that forward still normalises
with batch statistics and updates the running statistics, exactly as the reference's
autograd forward in train mode does.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file
from torch import nn

from rrd_fast.atomic import atomic_path, write_json_atomic
from rrd_fast.checkpoint import SIDECAR_NAME, WEIGHTS_NAME, read_model_checkpoint
from rrd_fast.cli import RunError
from rrd_fast.run_dir import LOCK_NAME, RunLock, remove_temp_files
from rrd_fast.transfer import RESULT_FORMAT, RESULT_NAME, TRANSFER_DIR, probe_folder_name
from rrd_fast.transfer.config import ProbeConfig, probe_config_dict, resolve_lr, validate
from rrd_fast.transfer.data import ProbeData, build_probe_data, check_root
from rrd_fast.transfer.features import FEATURES_NAME, build_views, fingerprint, load_views, pooled, save_views

PROBE_NAME = "probe.safetensors"
OUTPUT_NAMES = ("config.yaml", "metrics.jsonl", RESULT_NAME, PROBE_NAME)


def check_student(run_dir: Path) -> None:
    """Refuse, before anything starts, a folder that holds no student checkpoint."""
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: run folder not found")
    missing = [n for n in (WEIGHTS_NAME, SIDECAR_NAME) if not (run_dir / n).is_file()]
    if missing:
        raise RunError(f"{run_dir}: no student checkpoint here (missing {' and '.join(missing)}); "
                       "expected a finished training run folder")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RunError(f"device: {name!r} requested but no CUDA device is available")
    return device


def new_head(in_features: int, num_classes: int, seed: int) -> nn.Linear:
    """The reference's fresh classifier: weight ~ N(0, 0.01), bias 0, drawn from the seed."""
    head = nn.Linear(in_features, num_classes)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=gen) * 0.01)
        head.bias.zero_()
    return head


def lr_at(cfg: ProbeConfig, base_lr: float, epoch: int) -> float:
    """Step decay after each milestone (0-based epochs; the reference's 1-based `epoch > m`)."""
    return base_lr * cfg.lr_decay ** sum(epoch >= m for m in cfg.milestones)


class Counts:
    """Loss sum and top-1/top-5 hits, accumulated on the device so a step never waits for the host."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, samples

    def add(self, logits: torch.Tensor, labels: torch.Tensor, loss_sum: torch.Tensor) -> None:
        k = min(5, logits.shape[1])
        hits = logits.detach().topk(k, dim=1).indices == labels[:, None]
        self.sums += torch.stack([loss_sum.detach().double(), hits[:, 0].sum().double(), hits.any(1).sum().double(),
                                  torch.tensor(float(labels.shape[0]), dtype=torch.float64, device=labels.device)])

    def values(self) -> tuple[float, float, float, int]:
        """(mean loss, top-1 %, top-5 %, samples)."""
        loss, top1, top5, seen = self.sums.tolist()
        n = max(seen, 1.0)
        return loss / n, 100.0 * top1 / n, 100.0 * top5 / n, int(seen)


class LinearProbe:
    """Probe the student of `run_dir` on `cfg.dataset`; `fit()` writes the probe folder and returns result.json."""

    def __init__(self, run_dir: str | Path, cfg: ProbeConfig, overwrite: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.cfg = cfg
        validate(cfg)
        check_student(self.run_dir)
        check_root(cfg)
        self.device = resolve_device(cfg.device)
        self.out_dir = self.run_dir / TRANSFER_DIR / probe_folder_name(cfg.dataset, cfg.bn, cfg.feature_views)
        if (self.out_dir / RESULT_NAME).exists() or (self.out_dir / "metrics.jsonl").exists():
            if not overwrite:
                raise RunError(f"{self.out_dir}: this probe already ran; replace it with --overwrite")
        self.overwrite = overwrite
        backbone, self.meta = read_model_checkpoint(self.run_dir)
        if int(self.meta["in_channels"]) != 3:
            raise RunError(f"{self.run_dir / SIDECAR_NAME}: the student takes {self.meta['in_channels']}-channel "
                           f"images; {cfg.dataset} is RGB")
        self.arch = str(self.meta["arch"])
        self.lr = resolve_lr(cfg, self.arch)
        self.backbone = backbone.to(self.device)
        for param in self.backbone.parameters():
            param.requires_grad_(False)
        self.data: ProbeData = build_probe_data(cfg, self.device)
        self.feature_dim = self._feature_dim()
        self.head = new_head(self.feature_dim, self.data.num_classes, cfg.seed).to(self.device)
        # Weight decay reaches the head only, as in the reference (its optimizer holds only `fc`).
        self.optimizer = torch.optim.SGD(self.head.parameters(), lr=self.lr, momentum=cfg.momentum,
                                         weight_decay=cfg.weight_decay)
        self.history: list[dict[str, Any]] = []
        self.feature_cache = "none"  # none | built | reused

    def _feature_dim(self) -> int:
        # A dummy pass in eval mode: it reads no data and leaves the BatchNorm statistics alone.
        self.backbone.eval()
        size = self.cfg.image_size
        return int(pooled(self.backbone, torch.zeros(2, 3, size, size, device=self.device)).shape[1])

    # ------------------------------------------------------------------ folder
    def _open_folder(self) -> RunLock:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.out_dir).acquire()
        if self.overwrite:
            for child in self.out_dir.iterdir():
                if child.name in (LOCK_NAME, FEATURES_NAME):  # the feature file is checked by its fingerprint
                    continue
                shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
        remove_temp_files(self.out_dir)
        return lock

    # ------------------------------------------------------------------ features
    def _set_backbone_mode(self, train: bool) -> None:
        self.backbone.train(train and self.cfg.bn == "train")

    def _train_views(self) -> torch.Tensor | None:
        views = self.cfg.feature_views
        if views == 0:
            return None
        cfg, split = self.cfg, self.data.train_split
        mean, std = self.data.fmt.mean, self.data.fmt.std
        expected = fingerprint(str(self.meta.get("sha256")), split.images,
                               {"views": views, "seed": cfg.seed, "pad": cfg.pad, "flip": cfg.flip,
                                "mean": list(mean), "std": list(std), "image_size": cfg.image_size})
        path = self.out_dir / FEATURES_NAME
        stored = load_views(path, expected, views, self.device)
        if stored is not None:
            self.feature_cache = "reused"
            return stored
        self._set_backbone_mode(False)
        built = build_views(self.backbone, self.data.train, len(split.labels), views, cfg.eval_batch_size)
        save_views(path, built, expected)
        self.feature_cache = "built"
        return built

    def _train_batches(self, epoch: int, views: torch.Tensor | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(features, labels) of each training step of `epoch`, in the pipeline's sample order."""
        if views is not None:
            labels = torch.from_numpy(self.data.train_split.labels).to(self.device)
            view = views[epoch % views.shape[0]]
            for index in self.data.train.sampler.batches(epoch):
                idx = torch.from_numpy(index).to(self.device)
                yield view[idx], labels[idx]
            return
        for batch in self.data.train.epoch(epoch):
            yield pooled(self.backbone, batch.images), batch.labels

    def _test_features(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.data.eval.epoch(0):
            yield pooled(self.backbone, batch.images), batch.labels

    # ------------------------------------------------------------------ loop
    def _train_epoch(self, epoch: int, views: torch.Tensor | None) -> dict[str, Any]:
        lr = lr_at(self.cfg, self.lr, epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._set_backbone_mode(True)
        self.head.train()
        counts = Counts(self.device)
        start = time.perf_counter()
        for feats, labels in self._train_batches(epoch, views):
            logits = self.head(feats)
            loss = F.cross_entropy(logits, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            counts.add(logits, labels, loss.detach() * labels.shape[0])
        loss_mean, top1, _, seen = counts.values()
        if not math.isfinite(loss_mean):
            raise RunError(f"non-finite probe loss in epoch {epoch + 1}; lower lr=")
        elapsed = time.perf_counter() - start
        return {"epoch": epoch + 1, "lr": lr, "loss": loss_mean, "train_top1": top1, "epoch_time_s": elapsed,
                "images_per_s": seen / max(elapsed, 1e-9)}

    @torch.no_grad()
    def evaluate(self, cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> dict[str, float]:
        self._set_backbone_mode(False)
        self.head.eval()
        counts = Counts(self.device)
        for feats, labels in cached if cached is not None else self._test_features():
            logits = self.head(feats)
            counts.add(logits, labels, F.cross_entropy(logits, labels, reduction="sum"))
        loss_mean, top1, top5, _ = counts.values()
        return {"top1": top1, "top5": top5, "test_loss": loss_mean}

    def fit(self) -> dict[str, Any]:
        lock = self._open_folder()
        try:
            return self._fit()
        finally:
            lock.release()

    def _fit(self) -> dict[str, Any]:
        cfg = self.cfg
        start = time.perf_counter()
        resolved = {**probe_config_dict(cfg), "lr": self.lr}
        with atomic_path(self.out_dir / "config.yaml") as tmp:
            tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        views = self._train_views()
        # bn=eval: the backbone is fixed, so the test features are too; compute them once.
        cached = None
        if cfg.bn == "eval":
            self._set_backbone_mode(False)
            cached = list(self._test_features())
        best, best_epoch = -1.0, 0
        for epoch in range(cfg.epochs):
            record = self._train_epoch(epoch, views)
            record.update(self.evaluate(cached))
            self.history.append(record)
            if record["top1"] > best:
                best, best_epoch = record["top1"], epoch + 1
            with atomic_path(self.out_dir / "metrics.jsonl") as tmp:
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
            if cfg.progress:
                print(f"{cfg.dataset} bn={cfg.bn} epoch {epoch + 1}/{cfg.epochs}: lr {record['lr']:.4g} "
                      f"loss {record['loss']:.4f} train {record['train_top1']:.2f} test {record['top1']:.2f}",
                      flush=True)
        self._save_probe()
        result = self._result(best, best_epoch, time.perf_counter() - start)
        write_json_atomic(self.out_dir / RESULT_NAME, result)
        return result

    def _save_probe(self) -> None:
        tensors = {"weight": self.head.weight, "bias": self.head.bias}
        tensors.update({f"backbone.{k}": v for k, v in self.backbone.named_buffers()})
        with atomic_path(self.out_dir / PROBE_NAME) as tmp:
            save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(tmp),
                      metadata={"format": RESULT_FORMAT, "bn": self.cfg.bn})

    def _result(self, best: float, best_epoch: int, wall: float) -> dict[str, Any]:
        last = self.history[-1]
        method = self.meta.get("method") if isinstance(self.meta.get("method"), dict) else {}
        teacher = self.meta.get("teacher") if isinstance(self.meta.get("teacher"), dict) else {}
        return {
            "format": RESULT_FORMAT,
            "dataset": self.cfg.dataset,
            "bn": self.cfg.bn,
            "epochs": len(self.history),
            "top1_last": last["top1"],
            "top1_best": best,
            "best_epoch": best_epoch,
            "top5_last": last["top5"],
            "feature_views": self.cfg.feature_views,
            "feature_cache": self.feature_cache,
            "lr": self.lr,
            "seed": self.cfg.seed,
            "num_classes": self.data.num_classes,
            "num_train": int(len(self.data.train_split.labels)),
            "num_eval": int(len(self.data.eval_split.labels)),
            "feature_dim": self.feature_dim,
            "train_time_s": sum(r["epoch_time_s"] for r in self.history),
            "wall_time_s": wall,
            "student": {"run_dir": str(self.run_dir), "arch": self.arch, "sha256": self.meta.get("sha256"),
                        "method": method.get("name"), "teacher_arch": teacher.get("arch")},
        }


def run_probe(run_dir: str | Path, cfg: ProbeConfig, overwrite: bool = False) -> dict[str, Any]:
    return LinearProbe(run_dir, cfg, overwrite=overwrite).fit()


__all__ = ["LinearProbe", "check_student", "lr_at", "new_head", "run_probe"]
