"""The model.json schema (ModelCard): a lossless round trip, and every bad field refused in one line
naming the file and field, through the teacher loader and through export; bounded sizes; corrupt
memory shards of a resume state refused in one line."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from rrd_fast.checkpoint import (
    SIDECAR_FORMAT,
    CheckpointError,
    ModelCard,
    Normalization,
    read_model_card,
    read_model_checkpoint,
    sha256_file,
    write_model_checkpoint,
)
from rrd_fast.cli import RunError, run_cli
from rrd_fast.models import create_model
from rrd_fast.checkpoint import load_teacher

# What the trainer's _write_student hands to write_model_checkpoint.
TRAINER_SIDECAR: dict[str, Any] = {
    "arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
    "normalization": {"mean": [0.2860], "std": [0.3530]},
    "dataset": {"format": "fashion_mnist", "root": "/data/fmnist"},
    "method": {"name": "rrd", "gamma": 1.0, "alpha": 1.0, "beta": 1.0, "options": {"rrd": {"queue_size": 64}}},
    "teacher": {"arch": "resnet8", "checkpoint": "/t", "sha256": "ab" * 32, "top1": 12.5},
    "seed": 0, "epochs_trained": 2, "init_epochs_trained": 0,
    "top1_final": 11.0, "top1_best": 12.0, "best_epoch": 1,
}


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", num_classes=10, in_channels=1).eval()


@pytest.fixture(scope="module")
def checkpoint(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("schema") / "ckpt"
    write_model_checkpoint(folder, model, TRAINER_SIDECAR)
    return folder


# -- round trip ------------------------------------------------------------------------------

def test_model_card_round_trip(checkpoint: Path, model: torch.nn.Module, tmp_path: Path) -> None:
    card = ModelCard.from_dict(TRAINER_SIDECAR)
    assert card.arch == "resnet8" and card.num_classes == 10 and card.normalization == Normalization((0.2860,), (0.3530,))
    assert card.to_dict() == {**TRAINER_SIDECAR, "format": SIDECAR_FORMAT, "source": None, "sha256": None}
    assert ModelCard.from_dict(card.to_dict()) == card
    # Unknown fields survive a round trip; the file on disk reads back as the same card plus the weights' sha.
    assert ModelCard.from_dict({**TRAINER_SIDECAR, "note": {"x": [1]}}).to_dict()["note"] == {"x": [1]}
    written = json.loads((checkpoint / "model.json").read_text())
    assert {**written, "sha256": None} == card.to_dict()
    assert written["sha256"] == sha256_file(checkpoint / "model.safetensors") == read_model_card(checkpoint).sha256
    # A ModelCard and the same fields as a dict write identical sidecars.
    write_model_checkpoint(tmp_path / "from_card", model, card)
    assert json.loads((tmp_path / "from_card" / "model.json").read_text()) == written
    loaded, meta = read_model_checkpoint(tmp_path / "from_card")
    assert meta == written and sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in model.parameters())


# -- every bad field, one line naming the file and the field ---------------------------------

def _drop(key: str) -> Callable[[dict[str, Any]], None]:
    return lambda d: d.pop(key)


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def change(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[p]
        d[last] = value
    return change


BAD_SIDECARS = [
    ("no-arch", _drop("arch"), "'arch' is missing"),
    ("no-num-classes", _drop("num_classes"), "'num_classes' is missing"),
    ("no-normalization", _drop("normalization"), "'normalization' is missing"),
    ("no-sha", _drop("sha256"), "'sha256' is missing"),
    ("arch-int", _set("arch", 42), "'arch' is 42 (int)"),
    ("arch-unknown", _set("arch", "resnet9000"), "'arch' is 'resnet9000', not a model of the zoo"),
    ("arch-null", _set("arch", None), "'arch' is None"),
    ("classes-str", _set("num_classes", "10"), "'num_classes' is '10' (str), expected an integer in 1..100000"),
    ("classes-float", _set("num_classes", 10.5), "'num_classes' is 10.5 (float)"),
    ("classes-bool", _set("num_classes", True), "'num_classes' is True (bool)"),
    ("classes-zero", _set("num_classes", 0), "'num_classes' is 0 (int)"),
    ("channels-list", _set("in_channels", [1]), "'in_channels' is [1] (list), expected an integer in 1..64"),
    ("channels-huge", _set("in_channels", 4096), "'in_channels' is 4096 (int), expected an integer in 1..64"),
    ("size-huge", _set("image_size", 100_000), "'image_size' is 100000 (int), expected an integer in 1..4096"),
    ("size-negative", _set("image_size", -28), "'image_size' is -28 (int)"),
    ("norm-str", _set("normalization", "imagenet"), "'normalization' is 'imagenet' (str), expected a JSON object"),
    ("mean-length", _set("normalization.mean", [0.1, 0.2]), "'normalization.mean' is [0.1, 0.2] (list)"),
    ("std-zero", _set("normalization.std", [0.0]), "'normalization.std' is [0.0] (list)"),
    ("std-str", _set("normalization.std", ["0.35"]), "'normalization.std' is ['0.35'] (list)"),
    ("dataset-str", _set("dataset", "fashion_mnist"), "'dataset' is 'fashion_mnist' (str), expected a JSON object"),
    ("dataset-format", _set("dataset.format", 3), "'dataset.format' is 3 (int)"),
    ("method-int", _set("method", 7), "'method' is 7 (int)"),
    ("method-name", _set("method.name", None), "'method.name' is None"),
    ("teacher-list", _set("teacher", ["resnet8"]), "'teacher' is ['resnet8'] (list)"),
    ("top1-str", _set("top1_final", "high"), "'top1_final' is 'high' (str)"),
    ("epochs-negative", _set("epochs_trained", -1), "'epochs_trained' is -1 (int)"),
    ("sha-short", _set("sha256", "abc"), "'sha256' is 'abc' (str), expected 64 lowercase hex digits"),
]


def _bad_copy(checkpoint: Path, folder: Path, change: Callable[[dict[str, Any]], None]) -> Path:
    folder.mkdir()
    (folder / "model.safetensors").write_bytes((checkpoint / "model.safetensors").read_bytes())
    meta = json.loads((checkpoint / "model.json").read_text())
    change(meta)
    (folder / "model.json").write_text(json.dumps(meta))
    return folder


def _one_line(message: str, *needles: str) -> None:
    assert "\n" not in message.strip(), message
    for needle in needles:
        assert needle in message, (needle, message)


@pytest.mark.parametrize("change, needle", [pytest.param(c, n, id=i) for i, c, n in BAD_SIDECARS])
def test_bad_sidecar_is_one_line_through_teacher_loader_and_export(
        checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        change: Callable[[dict[str, Any]], None], needle: str) -> None:
    from export.__main__ import main as export_main

    folder = _bad_copy(checkpoint, tmp_path / "bad", change)
    where = str(folder / "model.json")
    with pytest.raises(CheckpointError) as info:
        load_teacher(folder, "resnet8", 10, 1)
    _one_line(str(info.value), where + ": field ", needle)
    assert run_cli(lambda: export_main([str(folder), "--backend", "eager", "--out", str(tmp_path / "out")])) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    _one_line(err, where + ": field ", needle)
    assert not (tmp_path / "out").exists()


def test_write_refuses_a_bad_sidecar_before_writing(model: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"model\.json: field 'in_channels' is missing"):
        write_model_checkpoint(tmp_path / "w", model, {k: v for k, v in TRAINER_SIDECAR.items() if k != "in_channels"})
    assert not (tmp_path / "w").exists()
    built_directly = ModelCard("resnet8", 100_000_000, 1, 28, Normalization((0.5,), (0.25,)))  # not validated yet
    with pytest.raises(CheckpointError, match=r"model\.json: field 'num_classes' is 100000000 \(int\)"):
        write_model_checkpoint(tmp_path / "w", model, built_directly)
    assert not (tmp_path / "w").exists()


def test_num_classes_bomb_is_refused_before_any_allocation(checkpoint: Path, tmp_path: Path) -> None:
    """100M classes would make a 25.6 GB classifier; the bound refuses the sidecar before building anything."""
    folder = _bad_copy(checkpoint, tmp_path / "bomb", _set("num_classes", 100_000_000))
    began = time.perf_counter()
    with pytest.raises(CheckpointError) as info:
        read_model_checkpoint(folder)
    assert time.perf_counter() - began < 2.0
    _one_line(str(info.value), f"{folder / 'model.json'}: field 'num_classes' is 100000000 (int)", "1..100000")


# -- memory shards of a resume state --------------------------------------------------------

def _saved_queue(run_dir: Path) -> Path:
    from rrd_fast.memory import FifoQueue
    from rrd_fast.memory.resume import write_rank_shards

    return write_rank_shards(run_dir, "t", FifoQueue(8, 4), 0, 1)


def _rewrite_rows(path: Path, rows: str, keep_rows: int = 8) -> None:
    """The same shard re-saved with other `rows` metadata (and only the first `keep_rows` rows)."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as fh:
        tensors = {k: fh.get_tensor(k)[:keep_rows].contiguous() for k in fh.keys()}
        meta = dict(fh.metadata())
    save_file(tensors, str(path), metadata={**meta, "rows": rows})


CORRUPT_SHARDS = [
    ("truncated", lambda p: p.write_bytes(p.read_bytes()[:-40]), "not a readable safetensors file"),
    ("garbage", lambda p: p.write_bytes(b"\x07" * 64), "not a readable safetensors file"),
    ("empty", lambda p: p.write_bytes(b""), "not a readable safetensors file"),
    ("rows-not-json", lambda p: _rewrite_rows(p, "{oops"), "metadata 'rows' is not a JSON object"),
    ("rows-wrong-type", lambda p: _rewrite_rows(p, json.dumps({"queue": "all"})), "metadata 'rows.queue' is 'all'"),
    ("rows-list", lambda p: _rewrite_rows(p, "[0, 8]"), "metadata 'rows' is not a JSON object"),
    ("rows-unknown-tensor", lambda p: _rewrite_rows(p, json.dumps({"bank": [0, 8, 8, 0]})), "'rows.bank'"),
    ("rows-beyond-data", lambda p: _rewrite_rows(p, json.dumps({"queue": [0, 8, 8, 0]}), keep_rows=5),
     "queue holds 5 rows where its metadata promises 8"),
]


@pytest.mark.parametrize("damage, needle", [pytest.param(d, n, id=i) for i, d, n in CORRUPT_SHARDS])
def test_corrupt_resume_shard_is_a_one_line_run_error(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      damage: Callable[[Path], None], needle: str) -> None:
    from rrd_fast.memory import FifoQueue
    from rrd_fast.memory.resume import load_rank_shards

    shard = _saved_queue(tmp_path)
    intact = FifoQueue(8, 4, seed=5)
    load_rank_shards(tmp_path, "t", 1, intact, 0, 1)
    assert torch.equal(intact.queue, FifoQueue(8, 4).queue)  # the undamaged shard restores the saved rows
    damage(shard)

    def resume() -> int:
        load_rank_shards(tmp_path, "t", 1, FifoQueue(8, 4), 0, 1)
        return 0

    with pytest.raises(RunError) as info:
        resume()
    _one_line(str(info.value), f"{shard}: ", needle)
    assert run_cli(resume) == 2 and capsys.readouterr().err.count("\n") == 1

