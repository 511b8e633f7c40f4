"""The probe's typed config: the reference protocol as defaults, YAML plus `key=value` overrides.

It is flat (no sections), so overrides read `epochs=30 lr=0.1`. It reuses the run config's
YAML loader and type checks, so a wrong key or value fails the same way as in training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


from rrd_fast.config import ConfigError, _build, config_to_dict, parse_override, read_yaml_mapping

# The reference lowers the probe's learning rate for these students (transfer_student.py).
SMALL_LR_ARCHS: dict[str, float] = {"MobileNetV2": 0.01, "ShuffleV1": 0.01, "ShuffleV2": 0.01}
DEFAULT_LR = 0.05


@dataclass
class ProbeConfig:
    dataset: Literal["stl10", "tiny_imagenet"] = "stl10"
    root: str = ""  # dataset folder (the one holding stl10_binary/, or tiny-imagenet-200 or its parent)
    bn: Literal["train", "eval"] = "train"  # BatchNorm mode of the frozen backbone while probing
    epochs: int = 120
    lr: float | None = None  # null: 0.05, or the reference's 0.01 for MobileNetV2/ShuffleV1/ShuffleV2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    milestones: list[int] = field(default_factory=lambda: [30, 60, 90])
    lr_decay: float = 0.1
    batch_size: int = 64
    eval_batch_size: int = 256
    image_size: int = 32  # every image is resized to this square once, before augmentation
    pad: int = 4
    flip: bool = True
    seed: int = 0
    feature_views: int = 0  # bn=eval only: V>0 precomputes V augmented views, epoch e uses view e mod V
    train_limit: int = 0  # >0: only the first N training images (smoke tests)
    eval_limit: int = 0
    device: str = "auto"  # auto: cuda when available, else cpu
    pipeline: Literal["torch", "dali", "auto"] = "torch"
    workers: int = 0  # decode/resize threads; 0: one per core (at most 16)
    progress: bool = True  # one line per epoch on stdout


def resolve_lr(cfg: ProbeConfig, arch: str) -> float:
    """The base learning rate: the config's, else the reference's default for this student."""
    return float(cfg.lr) if cfg.lr is not None else SMALL_LR_ARCHS.get(arch, DEFAULT_LR)


def validate(cfg: ProbeConfig) -> None:
    for key in ("epochs", "batch_size", "eval_batch_size", "image_size"):
        if getattr(cfg, key) <= 0:
            raise ConfigError(f"{key}: expected a positive integer, got {getattr(cfg, key)}")
    for key in ("pad", "feature_views", "train_limit", "eval_limit", "workers"):
        if getattr(cfg, key) < 0:
            raise ConfigError(f"{key}: expected zero or a positive integer, got {getattr(cfg, key)}")
    if cfg.lr is not None and cfg.lr <= 0:
        raise ConfigError(f"lr: expected a positive number, got {cfg.lr}")
    if cfg.feature_views and cfg.bn != "eval":
        raise ConfigError("feature_views: precomputed features need bn=eval "
                          "(with BatchNorm in train mode a sample's feature depends on its batch)")
    if not cfg.root:
        raise ConfigError("root: no dataset folder given (--root DIR or root=DIR)")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise ConfigError(f"device: {cfg.device!r} is not one of 'auto', 'cpu', 'cuda', 'cuda:N'")


def load_probe_config(path: str | Path | None = None, overrides: list[str] | None = None,
                      values: dict[str, Any] | None = None) -> ProbeConfig:
    """Read YAML (optional), then `values` (command-line flags), then `key=value` overrides; build the typed config."""
    tree = read_yaml_mapping(path) if path is not None else {}
    tree.update({k: v for k, v in (values or {}).items() if v is not None})
    for text in overrides or []:
        key, value = parse_override(text)
        if "." in key:
            raise ConfigError(f"override {text!r}: the probe config has no sections (e.g. epochs=30)")
        tree[key] = value
    return _build(ProbeConfig, tree)


def probe_config_dict(cfg: ProbeConfig) -> dict[str, Any]:
    return config_to_dict(cfg)
