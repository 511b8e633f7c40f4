"""DALI pipeline for in-memory splits: bit-level parity with the torch ArrayPipeline, exact
epoch semantics under sharding, regeneration of any batch, and the GPU-resident source."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import synthetic as syn
from pipelines.augment import CropFlipSpec
from pipelines.backends import build_pipeline
from pipelines.dali_arrays import DaliArrayPipeline
from pipelines.formats import ArraySplit, get_format, head, read_split
from pipelines.formats.fashion_mnist import DEBIAN_FASHION_MNIST
from pipelines.sampler import EpochSampler
from pipelines.torch_arrays import ArrayPipeline

TOL = 1e-5  # fp32: only the normalisation's float rounding may differ


@pytest.fixture(scope="module")
def splits(tmp_path_factory: pytest.TempPathFactory) -> dict[str, ArraySplit]:
    """Real readers on synthetic files: CIFAR-100 (3×32×32), Fashion-MNIST (1×28×28), STL-10 (3×96×96)."""
    root = tmp_path_factory.mktemp("arrays")
    syn.write_cifar100(root / "c100", n_train=150, n_test=70, seed=1)
    syn.write_fashion_mnist(root / "fm", n_train=150, n_test=70, seed=2)
    syn.write_stl10(root / "stl", n_train=60, n_test=30, seed=3)
    return {
        "cifar100": read_split("cifar100", root / "c100", "train"),
        "fashion_mnist": read_split("fashion_mnist", root / "fm", "train"),
        "stl10": read_split("stl10", root / "stl", "train"),
        "cifar100_test": read_split("cifar100", root / "c100", "test"),
    }


def _pair(split: ArraySplit, fmt_name: str, sampler: EpochSampler, augment: CropFlipSpec | None,
          dtype: torch.dtype = torch.float32):
    fmt = get_format(fmt_name)
    torch_pipe = build_pipeline("torch", split, fmt, sampler, augment, dtype=dtype)
    dali_pipe = build_pipeline("dali", split, fmt, sampler, augment, dtype=dtype)
    return torch_pipe, dali_pipe


@pytest.mark.parametrize("fmt_name,pad,flip", [("cifar100", 4, True), ("fashion_mnist", 4, True),
                                               ("stl10", 12, True), ("cifar100", 3, True), ("cifar100", 0, True),
                                               ("cifar100", 4, False)])
def test_train_batches_equal_torch_pipeline(splits: dict, fmt_name: str, pad: int, flip: bool) -> None:
    split = splits[fmt_name]
    sampler = EpochSampler(len(split.labels), 16, seed=11)
    t, d = _pair(split, fmt_name, sampler, CropFlipSpec(pad=pad, flip=flip))
    assert isinstance(d, DaliArrayPipeline) and len(d) == len(t)
    for epoch in (0, 3):
        pairs = list(zip(t.epoch(epoch), d.epoch(epoch), strict=True))
        assert len(pairs) == len(sampler)
        for bt, bd in pairs:
            assert torch.equal(bt.index, bd.index) and torch.equal(bt.labels, bd.labels)
            assert torch.equal(bt.aug, bd.aug) and bd.epoch == epoch
            assert bd.images.shape == bt.images.shape and bd.images.dtype == torch.float32
            assert (bt.images - bd.images).abs().max().item() <= TOL
    # The augmentation really varies (otherwise parity would be trivial).
    aug = torch.cat([b.aug for b in d.epoch(0)])
    assert len(torch.unique(aug[:, 0])) > (1 if pad else 0) and (aug[:, 2].any().item() == flip)


@pytest.mark.parametrize("fmt_name,pad,flip", [("cifar100", 4, True), ("fashion_mnist", 4, True), ("stl10", 12, True),
                                               ("cifar100", 0, True), ("cifar100", 4, False)])
def test_sequence_layout_equals_torch_pipeline(splits: dict, fmt_name: str, pad: int, flip: bool) -> None:
    """One DALI sample per batch, per-frame warp_affine crops and flips: the same batches."""
    split = splits[fmt_name]
    fmt = get_format(fmt_name)
    sampler = EpochSampler(len(split.labels), 16, seed=7)
    spec = CropFlipSpec(pad=pad, flip=flip)
    t = build_pipeline("torch", split, fmt, sampler, spec)
    d = DaliArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, spec, sequence=True, lanes=2)
    flipped = 0
    for epoch in (0, 2):
        for bt, bd in zip(t.epoch(epoch), d.epoch(epoch), strict=True):
            assert torch.equal(bt.index, bd.index) and torch.equal(bt.aug, bd.aug)
            assert bd.images.shape == bt.images.shape
            assert (bt.images - bd.images).abs().max().item() <= TOL
            flipped += int(bd.aug[:, 2].sum())
    assert (flipped > 0) == flip
    regenerated = d.batch_for(np.arange(5), 2)  # fewer frames than a batch
    assert (regenerated.images - t.batch_for(np.arange(5), 2).images).abs().max().item() <= TOL


def test_sequence_layout_eval_with_partial_last_batch(splits: dict) -> None:
    test = splits["cifar100_test"]  # no augmentation, 70 = 32 + 32 + 6
    eval_sampler = EpochSampler(len(test.labels), 32, shuffle=False, drop_last=False)
    fmt = get_format("cifar100")
    te = build_pipeline("torch", test, fmt, eval_sampler, None)
    de = DaliArrayPipeline(test.images, test.labels, eval_sampler, fmt.mean, fmt.std, None, sequence=True)
    batches = list(de.epoch(0))
    assert [len(b) for b in batches] == [32, 32, 6]
    for bt, bd in zip(te.epoch(0), batches, strict=True):
        assert (bt.images - bd.images).abs().max().item() <= TOL


@pytest.mark.skipif(not (DEBIAN_FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
                    reason="real Fashion-MNIST not installed (Debian package dataset-fashion-mnist)")
def test_real_fashion_mnist_batches_equal_torch_pipeline() -> None:
    """Real photographs of clothes, not noise: the first 4096 training images, batch 256, two epochs."""
    split = head(read_split("fashion_mnist", DEBIAN_FASHION_MNIST, "train"), 4096)
    sampler = EpochSampler(len(split.labels), 256, seed=5)
    t, d = _pair(split, "fashion_mnist", sampler, CropFlipSpec(pad=4))
    for epoch in (0, 1):
        for bt, bd in zip(t.epoch(epoch), d.epoch(epoch), strict=True):
            assert torch.equal(bt.index, bd.index) and torch.equal(bt.labels, bd.labels) and torch.equal(bt.aug, bd.aug)
            assert bd.images.shape == (256, 1, 28, 28)
            assert (bt.images - bd.images).abs().max().item() <= TOL
    assert bd.images.std().item() > 0.5  # real pixels, not a blank image


def test_eval_batches_equal_with_partial_last_batch(splits: dict) -> None:
    split = splits["cifar100_test"]  # 70 samples, batch 32: 32, 32, 6
    sampler = EpochSampler(len(split.labels), 32, shuffle=False, drop_last=False)
    t, d = _pair(split, "cifar100", sampler, None)
    batches = list(d.epoch(0))
    assert [len(b) for b in batches] == [32, 32, 6]
    for bt, bd in zip(t.epoch(0), batches, strict=True):
        assert torch.equal(bt.index, bd.index)
        assert (bt.images - bd.images).abs().max().item() <= TOL
    # The eval view is the unpadded image, normalised.
    fmt = get_format("cifar100")
    first = torch.from_numpy(split.images[0]).permute(2, 0, 1).float() / 255
    expect = (first - torch.tensor(fmt.mean).view(3, 1, 1)) / torch.tensor(fmt.std).view(3, 1, 1)
    assert (batches[0].images[0] - expect).abs().max().item() <= TOL


def test_padding_is_zero_pixels_then_normalised(splits: dict) -> None:
    """An offset of 0 in a pad-4 crop shows 4 rows and columns of black, normalised like the torch pipeline."""
    split = splits["cifar100"]
    fmt = get_format("cifar100")
    sampler = EpochSampler(len(split.labels), 8, seed=0)
    d = build_pipeline("dali", split, fmt, sampler, CropFlipSpec(pad=4))
    for epoch in range(8):
        b = d.batch_for(np.arange(40), epoch)
        rows = (b.aug[:, 0] == 0).nonzero().flatten()
        if len(rows):
            break
    assert len(rows), "no zero row offset drawn in 8 epochs"
    black = -torch.tensor(fmt.mean) / torch.tensor(fmt.std)
    top = b.images[rows[0], :, :4, :]
    assert (top - black.view(3, 1, 1)).abs().max().item() <= TOL


@pytest.mark.parametrize("world", [2, 3])
def test_each_sample_once_per_epoch_across_ranks(splits: dict, world: int) -> None:
    """W ranks together see every sample exactly once; training drops the `n mod global batch` tail."""
    split = splits["cifar100"]  # 150 samples
    n, per_rank = len(split.labels), 8
    fmt = get_format("cifar100")
    for train in (True, False):
        seen_dali, seen_torch = [], []
        for rank in range(world):
            sampler = EpochSampler(n, per_rank, seed=5, rank=rank, world_size=world, shuffle=train, drop_last=train)
            aug = CropFlipSpec() if train else None
            seen_dali += [b.index for b in build_pipeline("dali", split, fmt, sampler, aug).epoch(2)]
            seen_torch += [b.index for b in build_pipeline("torch", split, fmt, sampler, aug).epoch(2)]
        dali_idx = torch.cat(seen_dali).tolist()
        assert sorted(dali_idx) == sorted(torch.cat(seen_torch).tolist())
        assert len(set(dali_idx)) == len(dali_idx), "a sample was seen twice in one epoch"
        if train:
            global_batch = per_rank * world
            assert len(dali_idx) == n - n % global_batch
            dropped = set(range(n)) - set(dali_idx)
            order = EpochSampler(n, per_rank, seed=5, world_size=world).order(2)
            assert dropped == set(order[len(dali_idx):].tolist())  # the documented tail, nothing else
        else:
            assert sorted(dali_idx) == list(range(n))


def test_batch_for_and_resume_regenerate_exactly(splits: dict) -> None:
    split = splits["cifar100"]
    sampler = EpochSampler(len(split.labels), 16, seed=9)
    d = build_pipeline("dali", split, get_format("cifar100"), sampler, CropFlipSpec())
    full = list(d.epoch(4))
    resumed = list(d.epoch(4, start_step=5))
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        assert torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
    again = d.batch_for(full[2].index.numpy(), 4)
    assert torch.equal(again.images, full[2].images) and torch.equal(again.aug, full[2].aug)
    # A larger-than-batch request works too (its own DALI pipeline is sized for it).
    big = d.batch_for(np.arange(40), 4)
    assert big.images.shape[0] == 40


def test_aug_epoch_replays_another_epochs_views_in_this_epochs_order(splits: dict) -> None:
    """The teacher cache's replay: order of epoch 7, crops and flips of epoch 2, on both backends."""
    split = splits["cifar100"]
    sampler = EpochSampler(len(split.labels), 16, seed=9)
    t, d = _pair(split, "cifar100", sampler, CropFlipSpec())
    for bt, bd, planned in zip(t.epoch(7, aug_epoch=2), d.epoch(7, aug_epoch=2), sampler.batches(7), strict=True):
        assert bd.index.tolist() == planned.tolist() and bd.epoch == bt.epoch == 2
        assert torch.equal(bd.aug, torch.from_numpy(CropFlipSpec().params(9, 2, planned)))
        assert (bt.images - bd.images).abs().max().item() <= TOL


@pytest.mark.parametrize("lanes", [1, 2, 3])
def test_lanes_change_nothing_but_speed(splits: dict, lanes: int) -> None:
    """Batches dealt to several DALI pipelines come back in plan order and identical to one lane's."""
    split = splits["cifar100"]
    fmt = get_format("cifar100")
    train = EpochSampler(len(split.labels), 16, seed=4)  # 9 batches: lanes get unequal shares
    evaluation = EpochSampler(len(split.labels), 64, shuffle=False, drop_last=False)  # 64, 64, 22: fewer than 3 lanes' worth
    for sampler, augment in ((train, CropFlipSpec(pad=4)), (evaluation, None)):
        ref = ArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, augment)
        d = DaliArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, augment, lanes=lanes)
        assert d.lanes == lanes
        for epoch, start in ((0, 0), (1, 0), (1, 2)):
            got = list(d.epoch(epoch, start_step=start))
            assert [b.index.tolist() for b in got] == [i.tolist() for i in sampler.batches(epoch)[start:]]
            for a, b in zip(ref.epoch(epoch, start_step=start), got, strict=True):
                assert torch.equal(a.aug, b.aug) and (a.images - b.images).abs().max().item() <= TOL
    # A finished epoch leaves every lane's DALI pipeline built for the next one.
    pipes = [runner._pipe for runner in d._runners]
    list(d.epoch(2))
    assert all(p is not None for p in pipes) and [runner._pipe for runner in d._runners] == pipes


def test_abandoned_epoch_leaves_the_pipeline_usable(splits: dict) -> None:
    split = splits["cifar100"]
    sampler = EpochSampler(len(split.labels), 16, seed=9)
    d = build_pipeline("dali", split, get_format("cifar100"), sampler, CropFlipSpec())
    it = d.epoch(0)
    first = next(it)
    next(it)
    it.close()  # a trainer that stops mid-epoch
    again = list(d.epoch(0))
    assert len(again) == len(sampler) and torch.equal(again[0].images, first.images)
    # An epoch left suspended (not closed) while a new one starts: the new one is exact, the old one stops.
    stale = d.epoch(1)
    next(stale)
    fresh = list(d.epoch(1))
    assert [b.index.tolist() for b in fresh] == [i.tolist() for i in sampler.batches(1)]
    with pytest.raises(RuntimeError, match="newer epoch"):
        next(stale)


def test_source_errors_propagate_instead_of_hanging(splits: dict) -> None:
    split = splits["cifar100"]
    sampler = EpochSampler(len(split.labels), 16, seed=9)
    images = split.images.copy()
    d = DaliArrayPipeline(images, split.labels, sampler, (0.5,) * 3, (0.25,) * 3, CropFlipSpec())
    d.sampler = EpochSampler(len(split.labels) + 50, 16, seed=9)  # plans indices beyond the array
    with pytest.raises(IndexError):
        list(d.epoch(0))
    d.sampler = sampler
    assert len(list(d.epoch(0))) == len(sampler)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_outputs_are_the_fp32_batch_rounded_once(splits: dict, dtype: torch.dtype) -> None:
    """Mixed-precision runs get half-precision batches: both backends normalise in fp32 and round once."""
    split = splits["cifar100"]
    sampler = EpochSampler(len(split.labels), 16, seed=1)
    ref_t, ref_d = _pair(split, "cifar100", sampler, CropFlipSpec())
    half_t, half_d = _pair(split, "cifar100", sampler, CropFlipSpec(), dtype=dtype)
    for a_t, a_d, b_t, b_d in zip(ref_t.epoch(0), ref_d.epoch(0), half_t.epoch(0), half_d.epoch(0), strict=True):
        assert b_t.images.dtype == b_d.images.dtype == dtype
        assert torch.equal(a_t.images.to(dtype), b_t.images) and torch.equal(a_d.images.to(dtype), b_d.images)
        # Across backends the fp32 values differ by float rounding only, so at most one step of the half type.
        step = torch.finfo(dtype).eps * a_t.images.abs().clamp(min=1.0)
        assert ((b_t.images.float() - b_d.images.float()).abs() <= step).all()


def test_array_pipeline_matches_dali_for_a_given_device_string(splits: dict) -> None:
    """The factory accepts the trainer's torch.device."""
    split = splits["fashion_mnist"]
    sampler = EpochSampler(len(split.labels), 16, seed=1)
    d = build_pipeline("dali", split, get_format("fashion_mnist"), sampler, CropFlipSpec(), device=torch.device("cpu"))
    b = next(iter(d.epoch(0)))
    assert b.images.device.type == "cpu" and b.images.shape == (16, 1, 28, 28)


# ---------------------------------------------------------------------------------------
# GPU (scripts/gpu_check.sh)
# ---------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("sequence", [False, True])
def test_gpu_resident_source_matches_cpu_torch_pipeline(splits: dict, sequence: bool) -> None:
    split = splits["cifar100"]
    fmt = get_format("cifar100")
    sampler = EpochSampler(len(split.labels), 32, seed=3)
    ref = ArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, CropFlipSpec())
    gpu = DaliArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, CropFlipSpec(), device="cuda",
                            sequence=sequence)
    assert gpu._images.is_cuda  # the split itself lives on the GPU
    for a, b in zip(ref.epoch(1), gpu.epoch(1), strict=True):
        assert b.images.is_cuda and b.index.is_cuda
        assert torch.equal(a.index, b.index.cpu()) and torch.equal(a.aug, b.aug.cpu())
        assert (a.images - b.images.cpu()).abs().max().item() <= TOL


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_half_precision(splits: dict, dtype: torch.dtype) -> None:
    split = splits["cifar100"]
    fmt = get_format("cifar100")
    sampler = EpochSampler(len(split.labels), 32, seed=3)
    ref = ArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, CropFlipSpec())
    gpu = DaliArrayPipeline(split.images, split.labels, sampler, fmt.mean, fmt.std, CropFlipSpec(), device="cuda",
                            dtype=dtype)
    for a, b in zip(ref.epoch(0), gpu.epoch(0), strict=True):
        assert b.images.dtype == dtype and b.images.is_cuda
        assert (a.images - b.images.float().cpu()).abs().max().item() <= 3.2e-2 * a.images.abs().max().item()

