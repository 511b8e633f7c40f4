"""ArrayPipeline against a plain numpy pad/crop/flip/normalise reference, and EpochSampler semantics.

The reference does the obvious per-sample thing with the same float32 arithmetic
(x * 1/(255 std) - mean/std), so the pipeline must match it bit for bit. The DALI
backend is held to the same output, so this file pins what "the same" means.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import pipelines.torch_arrays as torch_pipeline
from pipelines.augment import CropFlipSpec
from pipelines.sampler import EpochSampler
from pipelines.torch_arrays import ArrayPipeline

MEAN3, STD3 = (0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)
MEAN1, STD1 = (0.2860,), (0.3530,)


def make_images(n: int, h: int, w: int, c: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    # 1..255 so that zero padding is distinguishable from every real pixel.
    return rng.integers(1, 256, size=(n, h, w, c), dtype=np.uint8), rng.integers(0, 10, size=n)


def reference_batch(images: np.ndarray, index: np.ndarray, params: np.ndarray, pad: int,
                    mean: tuple[float, ...], std: tuple[float, ...]) -> np.ndarray:
    """Per sample: zero-pad, crop at (dy, dx), flip if asked, CHW, normalise in float32."""
    _, h, w, c = images.shape
    scale = np.array([1.0 / (255.0 * s) for s in std], dtype=np.float32).reshape(c, 1, 1)
    shift = np.array([m / s for m, s in zip(mean, std)], dtype=np.float32).reshape(c, 1, 1)
    out = []
    for i, (dy, dx, flip) in zip(index, params):
        padded = np.pad(images[i], ((pad, pad), (pad, pad), (0, 0)))
        crop = padded[dy : dy + h, dx : dx + w]
        if flip:
            crop = crop[:, ::-1]
        chw = crop.transpose(2, 0, 1).astype(np.float32)
        out.append(chw * scale - shift)
    return np.stack(out)


def build(images: np.ndarray, labels: np.ndarray, batch: int, augment: CropFlipSpec | None, seed: int = 3,
          mean: tuple[float, ...] = MEAN3, std: tuple[float, ...] = STD3, **sampler_kw) -> ArrayPipeline:
    sampler = EpochSampler(len(images), batch, seed=seed, **sampler_kw)
    return ArrayPipeline(images, labels, sampler, mean, std, augment)


def assert_matches_reference(pipe: ArrayPipeline, images: np.ndarray, labels: np.ndarray, epochs: range,
                             mean: tuple[float, ...], std: tuple[float, ...]) -> int:
    spec = pipe.augment
    checked = 0
    for epoch in epochs:
        for batch in pipe.epoch(epoch):
            index = batch.index.numpy()
            params = spec.params(pipe.sampler.seed, epoch, index) if spec is not None else np.zeros((len(index), 3), np.int32)
            expected = reference_batch(images, index, params, spec.pad if spec else 0, mean, std)
            assert batch.images.dtype == torch.float32 and batch.images.is_contiguous()
            np.testing.assert_array_equal(batch.images.numpy(), expected)
            np.testing.assert_array_equal(batch.aug.numpy(), params)
            np.testing.assert_array_equal(batch.labels.numpy(), labels[index])
            assert batch.epoch == epoch
            checked += len(batch)
    return checked


@pytest.mark.parametrize("shape,augment,mean,std", [
    ((32, 32, 3), CropFlipSpec(pad=4, flip=True), MEAN3, STD3),     # CIFAR recipe
    ((24, 20, 3), CropFlipSpec(pad=3, flip=True), MEAN3, STD3),     # H != W catches swapped axes
    ((28, 28, 1), CropFlipSpec(pad=4, flip=True), MEAN1, STD1),     # Fashion-MNIST, one channel
    ((32, 32, 3), CropFlipSpec(pad=4, flip=False), MEAN3, STD3),
    ((16, 16, 3), CropFlipSpec(pad=0, flip=True), MEAN3, STD3),
    ((32, 32, 3), None, MEAN3, STD3),                               # eval: only normalised
])
def test_matches_numpy_reference(shape, augment, mean, std) -> None:
    images, labels = make_images(96, *shape)
    pipe = build(images, labels, 16, augment, mean=mean, std=std)
    assert assert_matches_reference(pipe, images, labels, range(3), mean, std) == 3 * 96


def test_fallback_without_mirrored_copy_matches_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits too large to mirror take the per-pixel gather path; the output is the same."""
    monkeypatch.setattr(torch_pipeline, "MAX_MIRROR_BYTES", 0)
    images, labels = make_images(64, 24, 20, 3)
    pipe = build(images, labels, 16, CropFlipSpec(pad=4, flip=True))
    assert not pipe.mirrored
    assert assert_matches_reference(pipe, images, labels, range(2), MEAN3, STD3) == 2 * 64


def test_every_crop_offset_and_flip_matches_reference() -> None:
    """All 9×9×2 augmentations are exercised (small images, many samples) and each matches."""
    images, labels = make_images(2048, 6, 5, 3)
    pipe = build(images, labels, 256, CropFlipSpec(pad=4))
    assert assert_matches_reference(pipe, images, labels, range(1), MEAN3, STD3) == 2048
    seen = {tuple(map(int, row)) for batch in pipe.epoch(0) for row in batch.aug}
    assert seen == {(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)}


def test_aug_params_equal_the_pure_function_for_any_index() -> None:
    images, labels = make_images(200, 8, 8, 3)
    spec = CropFlipSpec(pad=4)
    pipe = build(images, labels, 10, spec, seed=11)
    rng = np.random.default_rng(5)
    for epoch in (4, 0, 9, 4, 1, 7):  # revisits an evicted epoch table
        index = rng.integers(0, 200, size=37)
        np.testing.assert_array_equal(pipe.aug_params(index, epoch), spec.params(11, epoch, index))
    with pytest.raises(IndexError):
        pipe.aug_params(np.array([0, 200]), 0)
    with pytest.raises(IndexError):
        pipe.aug_params(np.array([-1]), 0)


def test_deterministic_across_calls_and_instances() -> None:
    images, labels = make_images(120, 32, 32, 3)
    first = build(images, labels, 24, CropFlipSpec())
    second = build(images, labels, 24, CropFlipSpec())
    epoch2 = [b.images.clone() for b in first.epoch(2)]
    _ = list(first.epoch(5))  # other epochs in between must not leak state
    for step, index in enumerate(first.sampler.batches(2)):
        assert torch.equal(first.batch_for(index, 2).images, epoch2[step])
        assert torch.equal(second.batch_for(index, 2).images, epoch2[step])
    resumed = list(first.epoch(2, start_step=3))
    assert len(resumed) == len(epoch2) - 3
    assert all(torch.equal(a.images, b) for a, b in zip(resumed, epoch2[3:]))
    # A different seed or epoch gives different augmentations.
    other = build(images, labels, 24, CropFlipSpec(), seed=4)
    assert not torch.equal(other.batch_for(first.sampler.batches(2)[0], 2).aug, first.batch_for(first.sampler.batches(2)[0], 2).aug)
    assert not torch.equal(first.batch_for(np.arange(24), 2).aug, first.batch_for(np.arange(24), 3).aug)


def test_batches_do_not_alias_each_other() -> None:
    images, labels = make_images(64, 16, 16, 3)
    pipe = build(images, labels, 16, CropFlipSpec())
    a = pipe.batch_for(np.arange(16), 0)
    kept = a.images.clone()
    b = pipe.batch_for(np.arange(16, 32), 0)
    b.images.zero_()
    assert torch.equal(a.images, kept)
    again = pipe.batch_for(np.arange(16), 0)
    assert torch.equal(again.images, kept)  # storage was not modified through a batch


def test_rejects_non_uint8_images() -> None:
    images, labels = make_images(8, 8, 8, 3)
    with pytest.raises(ValueError, match="uint8"):
        build(images.astype(np.float32), labels, 4, None)


# ---------------------------------------------------------------- sampler


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,batch", [(100, 8), (97, 5), (30, 10)])
def test_train_sampler_exact_epoch_with_dropped_tail(world: int, n: int, batch: int) -> None:
    global_batch = batch * world
    if n < global_batch:
        pytest.skip("smaller than one global batch")
    samplers = [EpochSampler(n, batch, seed=2, rank=r, world_size=world) for r in range(world)]
    for epoch in (0, 1):
        order = samplers[0].order(epoch)
        assert sorted(order.tolist()) == list(range(n))
        per_rank = [s.batches(epoch) for s in samplers]
        steps = n // global_batch
        assert all(len(b) == steps == len(s) for b, s in zip(per_rank, samplers))
        seen = []
        for step in range(steps):
            assert all(len(b[step]) == batch for b in per_rank)
            global_step = np.concatenate([b[step] for b in per_rank])
            # Rank r holds its contiguous slice of the step's global batch, in epoch order.
            np.testing.assert_array_equal(global_step, order[step * global_batch : (step + 1) * global_batch])
            seen.append(global_step)
        seen = np.concatenate(seen)
        assert len(set(seen.tolist())) == len(seen) == steps * global_batch
        dropped = set(range(n)) - set(seen.tolist())
        assert dropped == set(order[steps * global_batch :].tolist())
        assert len(dropped) == n % global_batch
    assert not np.array_equal(samplers[0].order(0), samplers[0].order(1))


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n,batch", [(100, 8), (7, 4), (2, 5)])
def test_eval_sampler_sees_every_sample_once(world: int, n: int, batch: int) -> None:
    samplers = [EpochSampler(n, batch, rank=r, world_size=world, shuffle=False, drop_last=False) for r in range(world)]
    seen = []
    for s in samplers:
        batches = s.batches(0)
        assert len(batches) == len(s)
        assert all(0 < len(b) <= batch for b in batches)
        seen += [int(i) for b in batches for i in b]
    assert sorted(seen) == list(range(n))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_eval_pipeline_sees_every_sample_once_unaugmented(world: int) -> None:
    images, labels = make_images(50, 12, 12, 3)
    seen = []
    for rank in range(world):
        pipe = build(images, labels, 8, None, rank=rank, world_size=world, shuffle=False, drop_last=False)
        for batch in pipe.epoch(0):
            index = batch.index.numpy()
            expected = reference_batch(images, index, np.zeros((len(index), 3), np.int32), 0, MEAN3, STD3)
            np.testing.assert_array_equal(batch.images.numpy(), expected)
            seen += index.tolist()
    assert sorted(seen) == list(range(50))


def test_sampler_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="batch size"):
        EpochSampler(10, 0)
    with pytest.raises(ValueError, match="rank"):
        EpochSampler(10, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="smaller than one global batch"):
        EpochSampler(10, 4, world_size=3)


# ---------------------------------------------------------------- device


@pytest.mark.gpu
def test_cuda_pipeline_matches_cpu() -> None:
    images, labels = make_images(300, 32, 32, 3)
    sampler = EpochSampler(300, 64, seed=1)
    cpu = ArrayPipeline(images, labels, sampler, MEAN3, STD3, CropFlipSpec())
    gpu = ArrayPipeline(images, labels, sampler, MEAN3, STD3, CropFlipSpec(), device="cuda")
    for a, b in zip(cpu.epoch(1), gpu.epoch(1)):
        assert b.images.is_cuda
        assert torch.equal(a.images, b.images.cpu())
        assert torch.equal(a.aug, b.aug.cpu()) and torch.equal(a.labels, b.labels.cpu())
