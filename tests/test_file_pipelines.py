"""The torch/Pillow pipeline for file datasets, the shared view geometry, and bad input on
the way from disk to a pipeline (readers plus both backends, and the training CLI)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import synthetic as syn
from pipelines.augment import ResizedCropSpec
from pipelines.backends import build_pipeline
from pipelines.errors import DataError
from pipelines.formats import get_format, read_split
from pipelines.sampler import EpochSampler
from pipelines.torch_files import FilePipeline, load_view
from pipelines.views import CenterCropSpec, eval_view, train_box

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return syn.write_tiny_imagenet(tmp_path_factory.mktemp("tiny"), n_classes=3, per_class_train=10, per_class_val=4, seed=1)


def _normalise(pixels: np.ndarray, mean, std) -> torch.Tensor:
    x = torch.from_numpy(np.array(pixels)).permute(2, 0, 1).float() / 255
    return (x - torch.tensor(mean).view(-1, 1, 1)) / torch.tensor(std).view(-1, 1, 1)


# ---------------------------------------------------------------------------------------
# geometry
# ---------------------------------------------------------------------------------------

def test_center_crop_box_follows_dali_rounding() -> None:
    spec = CenterCropSpec(resize=256, size=224)
    assert spec.box(256, 256) == (16.0, 16.0, 240.0, 240.0)
    # 451×300 -> 385×256 (long side rounded half up), centre offset 80.5 rounded up to 81.
    x0, y0, x1, y1 = spec.box(451, 300)
    scale = 256 / 300
    assert (x0 * scale, y0 * scale) == pytest.approx((81, 16)) and (x1 - x0) * scale == pytest.approx(224)
    assert CenterCropSpec(64, 64).box(64, 64) == (0.0, 0.0, 64.0, 64.0)
    with pytest.raises(ValueError):
        CenterCropSpec(resize=200, size=224)


def test_eval_views_per_format() -> None:
    assert eval_view(get_format("imagenet")) == CenterCropSpec(256, 224)
    assert eval_view(get_format("tiny_imagenet")) == CenterCropSpec(64, 64)


def test_train_box_is_the_relative_box_in_pixels() -> None:
    row = np.array([0.25, 0.5, 0.5, 0.25, 1.0], np.float32)  # y0, x0, h, w, flip
    assert train_box(row, width=200, height=100) == (100.0, 25.0, 150.0, 75.0)


def test_load_view_crops_resizes_and_flips(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:40, 0:60]
    img = np.stack([xx * 4, yy * 6, (xx + yy) * 2], -1).astype(np.uint8)
    path = tmp_path / "a.png"  # lossless, so the expected pixels are exact
    Image.fromarray(img).save(path)
    whole = np.array([0, 0, 1, 1, 0], np.float32)
    assert np.array_equal(load_view(path, 40, np.array([0, 0, 1, 40 / 60, 0], np.float32), None), img[:, :40])
    flipped = load_view(path, 40, np.array([0, 0, 1, 40 / 60, 1], np.float32), None)
    assert np.array_equal(flipped, img[:, :40][:, ::-1])
    # The right half of the image, 30×40 -> 20×20, equals Pillow's own resize of that region.
    half = load_view(path, 20, np.array([0.25, 0.5, 0.5, 0.5, 0], np.float32), None)
    expect = np.array(Image.fromarray(img[10:30, 30:60]).resize((20, 20), Image.BILINEAR))
    assert np.abs(half.astype(int) - expect.astype(int)).max() <= 1
    assert load_view(path, 20, whole, None).shape == (20, 20, 3)
    # Evaluation: shorter side 40 -> 20, centre 20×20.
    center = load_view(path, 20, None, CenterCropSpec(20, 20))
    expect = np.array(Image.fromarray(img).resize((30, 20), Image.BILINEAR))[:, 5:25]
    assert np.abs(center.astype(int) - expect.astype(int)).max() <= 1


# ---------------------------------------------------------------------------------------
# the torch file pipeline
# ---------------------------------------------------------------------------------------

def test_eval_batches_are_the_images_normalised(tiny: Path) -> None:
    split = read_split("tiny_imagenet", tiny, "val")  # 12 images
    fmt = get_format("tiny_imagenet")
    pipe = build_pipeline("torch", split, fmt, EpochSampler(len(split.labels), 5, shuffle=False, drop_last=False), None)
    assert isinstance(pipe, FilePipeline)
    batches = list(pipe.epoch(0))
    assert [len(b) for b in batches] == [5, 5, 2]
    assert torch.cat([b.index for b in batches]).tolist() == list(range(12))
    assert torch.cat([b.labels for b in batches]).tolist() == split.labels.tolist()
    for b in batches:
        for k, i in enumerate(b.index.tolist()):
            expect = _normalise(Image.open(split.paths[i]).convert("RGB"), fmt.mean, fmt.std)
            assert (b.images[k] - expect).abs().max().item() <= 1e-5
    assert batches[0].aug.shape == (5, 5) and not batches[0].aug.any()


def test_train_batches_use_the_shared_augmentation(tiny: Path) -> None:
    split = read_split("tiny_imagenet", tiny, "train")  # 30 images
    fmt = get_format("tiny_imagenet")
    spec = ResizedCropSpec()
    sampler = EpochSampler(len(split.labels), 8, seed=6)
    pipe = build_pipeline("torch", split, fmt, sampler, spec)
    batches = list(pipe.epoch(2))
    assert len(batches) == len(sampler) == 3
    for b, planned in zip(batches, sampler.batches(2), strict=True):
        assert b.index.tolist() == planned.tolist()
        assert torch.equal(b.aug, torch.from_numpy(spec.params(6, 2, planned)))
        assert b.images.shape == (8, 3, 64, 64) and b.images.is_contiguous()
    i, row = int(batches[0].index[0]), batches[0].aug[0].numpy()
    expect = _normalise(load_view(split.paths[i], 64, row, None), fmt.mean, fmt.std)
    assert (batches[0].images[0] - expect).abs().max().item() <= 1e-5
    again = pipe.batch_for(batches[1].index.numpy(), 2)
    assert torch.equal(again.images, batches[1].images)
    assert len(list(pipe.epoch(2, start_step=1))) == 2
    replay = next(iter(pipe.epoch(0, aug_epoch=2)))  # epoch 0's order, epoch 2's boxes
    assert replay.index.tolist() == sampler.batches(0)[0].tolist() and replay.epoch == 2
    assert torch.equal(replay.aug, torch.from_numpy(spec.params(6, 2, sampler.batches(0)[0])))


def test_threads_do_not_change_the_result(tiny: Path) -> None:
    split = read_split("tiny_imagenet", tiny, "train")
    fmt = get_format("tiny_imagenet")
    sampler = EpochSampler(len(split.labels), 8, seed=6)
    one = FilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, ResizedCropSpec(), 64, eval_view(fmt),
                       workers=1, prefetch=0)
    many = FilePipeline(split.paths, split.labels, sampler, fmt.mean, fmt.std, ResizedCropSpec(), 64, eval_view(fmt),
                        workers=3, prefetch=3)
    for a, b in zip(one.epoch(1), many.epoch(1), strict=True):
        assert torch.equal(a.images, b.images) and torch.equal(a.index, b.index)
    one.close()
    many.close()


@pytest.mark.parametrize("backend", ["torch", "dali"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_output_is_the_fp32_batch_rounded_once(tiny: Path, backend: str, dtype: torch.dtype) -> None:
    """Mixed-precision runs get the fp32 batch rounded once, as autocast would round it."""
    split = read_split("tiny_imagenet", tiny, "train")
    fmt = get_format("tiny_imagenet")
    sampler = EpochSampler(len(split.labels), 6, seed=3)
    ref = build_pipeline(backend, split, fmt, sampler, ResizedCropSpec())
    half = build_pipeline(backend, split, fmt, sampler, ResizedCropSpec(), dtype=dtype)
    for a, b in zip(ref.epoch(0), half.epoch(0), strict=True):
        assert b.images.dtype == dtype
        assert torch.equal(a.images.to(dtype), b.images)


def test_wrong_augmentation_kind_is_refused(tiny: Path) -> None:
    from pipelines.augment import CropFlipSpec

    split = read_split("tiny_imagenet", tiny, "train")
    with pytest.raises(DataError, match="random-resized-crop"):
        build_pipeline("torch", split, get_format("tiny_imagenet"), EpochSampler(len(split.labels), 8), CropFlipSpec())


# ---------------------------------------------------------------------------------------
# bad input, from disk to either backend
# ---------------------------------------------------------------------------------------

def _one_line(exc: pytest.ExceptionInfo, needle: Path | str) -> None:
    msg = str(exc.value)
    assert "\n" not in msg and str(needle) in msg, msg


@pytest.mark.parametrize("backend", ["torch", "dali"])
def test_bad_folders_are_named(tmp_path: Path, backend: str) -> None:
    fmt = get_format("tiny_imagenet")

    def build(split_name: str):
        split = read_split("tiny_imagenet", tmp_path, split_name)
        sampler = EpochSampler(len(split.labels), 2, shuffle=False, drop_last=False)
        return list(build_pipeline(backend, split, fmt, sampler, None).epoch(0))

    root = syn.write_tiny_imagenet(tmp_path, n_classes=2, per_class_train=3, per_class_val=2, seed=0)
    d = root / "tiny-imagenet-200"
    assert len(build("val")) == 2
    ann = d / "val" / "val_annotations.txt"
    text = ann.read_text()
    # a wnid in the annotations that is not in wnids.txt
    ann.write_text(text.replace(text.split("\t")[1], "n99999999", 1))
    with pytest.raises(DataError) as ei:
        build("val")
    _one_line(ei, ann)
    assert "n99999999" in str(ei.value)
    # a missing val_annotations.txt
    ann.unlink()
    with pytest.raises(DataError) as ei:
        build("val")
    _one_line(ei, ann)
    # a class folder with no images
    wnid = sorted(p.name for p in (d / "train").iterdir())[0]
    for f in (d / "train" / wnid / "images").iterdir():
        f.unlink()
    with pytest.raises(DataError) as ei:
        build("train")
    _one_line(ei, d / "train" / wnid / "images")


def test_truncated_stl10_bin_is_named(tmp_path: Path) -> None:
    root = syn.write_stl10(tmp_path, n_train=4, n_test=2, seed=0)
    x = root / "stl10_binary" / "train_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    with pytest.raises(DataError) as ei:
        read_split("stl10", root, "train")
    _one_line(ei, x)
    assert "truncated" in str(ei.value)


def test_training_cli_reports_a_missing_annotation_file(tmp_path: Path) -> None:
    """`train.py data.pipeline=dali` on a broken dataset: one line naming the file, exit 2."""
    root = syn.write_tiny_imagenet(tmp_path / "data", n_classes=2, per_class_train=4, per_class_val=2, seed=0)
    ann = root / "tiny-imagenet-200" / "val" / "val_annotations.txt"
    ann.unlink()
    cmd = [sys.executable, str(REPO / "rrd_fast" / "train.py"), "data.format=tiny_imagenet", f"data.root={root}",
           "data.pipeline=dali", "data.batch_size=4", "student.arch=resnet8", f"output_dir={tmp_path / 'runs'}",
           "train.progress=false", "optim.epochs=1"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(ann) in last
