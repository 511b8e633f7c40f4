"""Transfer linear probe: how well a frozen student's pooled feature carries to another data set.

    python -m rrd_fast.transfer RUN_DIR --data stl10|tiny_imagenet --root DIR [--bn train|eval]
                                [--config YAML] [--feature-views V] [--overwrite] [key=value ...]

The protocol is the RRD authors' (their `cifar/transfer_student.py`): the student of RUN_DIR
is frozen, a new linear classifier on its pooled penultimate vector (`ModelOutput.pooled`,
so every zoo model works, whatever its own classifier is called) is trained with SGD (lr
0.05, or 0.01 for MobileNetV2/ShuffleV1/ShuffleV2 as in the reference; momentum 0.9, weight
decay 5e-4 on the probe only; 120 epochs, x0.1 after epochs 30, 60, 90; batch 64, the last
partial batch kept) on the target's training split, and evaluated on its test split every
epoch: STL-10 train (5k) / test (8k), Tiny-ImageNet train (100k) / val (10k). Images are
resized to 32x32 once (see `rrd_fast.transfer.data`), then randomly cropped at 32 after
4-pixel zero padding and flipped; the test images are only resized and normalised.

BatchNorm (`bn`): `train`, the reference's setting, runs the frozen backbone in train mode
while probing, so it normalises each batch with the batch's statistics and its running
statistics keep adapting to the target data (its parameters stay frozen); evaluation then
uses those adapted statistics. `eval` keeps the checkpoint's statistics throughout.

Outputs, in RUN_DIR/transfer/<dataset>_bn-<bn>/ (with `_views<V>` appended when
`feature_views` V > 0, whose views repeat every V epochs, so it is kept apart from the
reference protocol): `config.yaml` (the resolved probe config), `metrics.jsonl` (one JSON
record per epoch: epoch, lr, loss, train_top1, top1, top5, test_loss, epoch_time_s,
images_per_s), `probe.safetensors` (the probe's `weight` and `bias`, and the backbone's
buffers under `backbone.<name>`, which `bn=train` changes), `features.safetensors` (only
with V > 0) and `result.json`:

    format          "rrd-fast-transfer/1"
    dataset         "stl10" | "tiny_imagenet"
    bn              "train" | "eval"
    epochs          epochs trained (120 in the protocol)
    top1_last       test top-1 (%) after the last epoch: the figure the paper reports
    top1_best       best test top-1 (%) over the epochs
    best_epoch      1-based epoch of top1_best (the first one on ties)
    top5_last       test top-5 (%) after the last epoch
    feature_views   V (0: every epoch draws fresh augmentations, the protocol)
    feature_cache   "none" | "built" | "reused" (features.safetensors, V > 0 only)
    lr, seed        the resolved base learning rate and the seed
    num_classes, num_train, num_eval, feature_dim
    train_time_s    wall time of the probe's training epochs (evaluation and feature precompute excluded)
    wall_time_s     wall time of the whole probe (feature precompute and evaluation included)
    student         {run_dir, arch, sha256, method, teacher_arch}

`read_results(run_dir)` collects them for reports; this package imports no torch until a
probe runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

TRANSFER_DIR = "transfer"
RESULT_NAME = "result.json"
RESULT_FORMAT = "rrd-fast-transfer/1"

__all__ = ["RESULT_FORMAT", "RESULT_NAME", "TRANSFER_DIR", "probe_folder_name", "read_results"]


def probe_folder_name(dataset: str, bn: str, feature_views: int = 0) -> str:
    """`<dataset>_bn-<bn>`, plus `_views<V>` when features are precomputed for V views."""
    name = f"{dataset}_bn-{bn}"
    return f"{name}_views{feature_views}" if feature_views > 0 else name


def read_results(run_dir: str | Path) -> dict[str, dict[str, Any]]:
    """Every finished probe of a run: {folder name: result.json contents}; unreadable files are skipped."""
    root = Path(run_dir) / TRANSFER_DIR
    results: dict[str, dict[str, Any]] = {}
    if not root.is_dir():
        return results
    for path in sorted(root.glob(f"*/{RESULT_NAME}")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == RESULT_FORMAT:
            results[path.parent.name] = data
    return results
