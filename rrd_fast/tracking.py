"""Experiment tracking through Accelerate's own trackers (`train.log_with: none|tensorboard`).

The trainer passes `make_tracker_kwargs(cfg)` to `Accelerator(...)`, calls `start_tracking`
once the run folder exists, `log_epoch` after each epoch record and `end_tracking` at the end.
TensorBoard writes to RUN_DIR/tensorboard (a resumed run adds an event file there, continuing
the epoch steps). Accelerate quietly drops a tracker whose package is missing, so the check
that `tensorboard` is installed happens here, up front, as a one-line error naming the extra.

Tags: main-stage records give `loss/<term>` (and `loss/total`), `top1/eval`, `top1/train`,
`top5/eval` and `train/<key>` for lr, images/s and epoch time; init-stage records give
`init/<key>`, each series stepped by its own stage's epoch number, as metrics.jsonl counts them.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

import yaml

from rrd_fast.config import ConfigError, RunConfig, config_to_dict

if TYPE_CHECKING:
    from accelerate import Accelerator

TENSORBOARD_DIR = "tensorboard"  # under the run folder; Accelerate's project_name
LOG_WITH = ("none", "tensorboard")
_MAIN_TAGS = {"loss": "loss/total", "top1": "top1/eval", "train_top1": "top1/train", "top5": "top5/eval"}


def make_tracker_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """Keyword arguments for `Accelerator(...)`: {} without tracking, log_with + project_dir with it."""
    log_with = cfg.train.log_with
    if log_with == "none":
        return {}
    if log_with not in LOG_WITH:
        raise ConfigError(f"train.log_with: {log_with!r} is not one of {', '.join(map(repr, LOG_WITH))}")
    if importlib.util.find_spec("tensorboard") is None:
        raise ConfigError("train.log_with=tensorboard needs the tensorboard package: "
                          "pip install 'rrd-fast[tensorboard]' (or pip install tensorboard)")
    return {"log_with": log_with, "project_dir": str(cfg.run_dir)}


def config_text(cfg: RunConfig) -> str:
    """The resolved config as YAML, indented so TensorBoard's markdown shows it verbatim."""
    text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())


def start_tracking(accelerator: Accelerator, cfg: RunConfig) -> None:
    """Open the trackers (RUN_DIR/tensorboard) and log the resolved config as text; a no-op without any.

    Call it after the run folder is created, since `--overwrite` empties that folder. The config
    goes in as text rather than as `init_trackers(config=...)` hparams, which would add two
    timestamp-named folders (a separate TensorBoard run) at every start and resume.
    """
    if accelerator.log_with:
        accelerator.init_trackers(TENSORBOARD_DIR)
        accelerator.log({"config": config_text(cfg)}, step=0)


def epoch_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's numbers under their tracker tags (see the module docstring); `epoch`/`stage` excluded."""
    init = record.get("stage") == "init"
    out: dict[str, float] = {}
    for key, value in record.items():
        if key in ("epoch", "stage") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if init:
            tag = f"init/{key}"
        elif key.startswith("loss_"):
            tag = f"loss/{key.removeprefix('loss_')}"
        else:
            tag = _MAIN_TAGS.get(key, f"train/{key}")
        out[tag] = float(value)
    return out


def log_epoch(accelerator: Accelerator, record: dict[str, Any], step: int | None = None) -> None:
    """Log one metrics.jsonl record to every tracker (the main process writes; a no-op without trackers).

    `step` defaults to the record's own epoch number, so the curves line up with metrics.jsonl.
    """
    if accelerator.log_with:
        accelerator.log(epoch_scalars(record), step=int(record["epoch"]) if step is None else step)


def end_tracking(accelerator: Accelerator) -> None:
    """Flush and close the trackers (what `accelerator.end_training()` does for them).

    `end_training()` also destroys the torch.distributed process group, which a library call
    such as `Trainer.fit()` must not do behind its caller's back; this closes the trackers only.
    """
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
