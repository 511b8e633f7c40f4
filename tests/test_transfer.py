"""Transfer linear probe: both target layouts, any classifier name, frozen weights, BatchNorm modes, outputs, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from pipelines.formats import read_split
from pipelines.synthetic import write_stl10, write_tiny_imagenet
from rrd_fast.checkpoint import read_model_checkpoint, write_model_checkpoint
from rrd_fast.cli import run_cli
from rrd_fast.models import create_model
from rrd_fast.transfer import read_results
from rrd_fast.transfer.__main__ import main as transfer_main
from rrd_fast.transfer.config import ProbeConfig, resolve_lr
from rrd_fast.transfer.data import resize_split
from rrd_fast.transfer.probe import LinearProbe, new_head

N_STL_TRAIN, N_STL_TEST = 40, 20
TINY_CLASSES, TINY_TRAIN, TINY_VAL = 3, 8, 4  # 24 train, 12 val images
BATCH = 16  # 40 images: steps of 16, 16, 8 (the last partial batch is kept)


@pytest.fixture(scope="module")
def roots(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("targets")
    return {"stl10": write_stl10(base / "stl", N_STL_TRAIN, N_STL_TEST, seed=1),
            "tiny_imagenet": write_tiny_imagenet(base / "tiny", TINY_CLASSES, TINY_TRAIN, TINY_VAL, seed=2)}


def make_student(folder: Path, arch: str) -> Path:
    """A CIFAR-100 student run folder (random weights, non-trivial BatchNorm statistics)."""
    torch.manual_seed(3)
    model = create_model(arch, num_classes=100)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.normal_(0.0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    write_model_checkpoint(folder, model, {"arch": arch, "num_classes": 100, "in_channels": 3, "image_size": 32,
                                           "normalization": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
                                           "method": {"name": "rrd"}, "teacher": {"arch": "wrn_40_2"}})
    return folder


def probe_cfg(roots: dict[str, Path], dataset: str, bn: str, **kw: object) -> ProbeConfig:
    base = dict(dataset=dataset, root=str(roots[dataset]), bn=bn, epochs=2, milestones=[1], batch_size=BATCH,
                eval_batch_size=8, device="cpu", progress=False, workers=1)
    base.update(kw)
    return ProbeConfig(**base)  # type: ignore[arg-type]


def bn_buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers() if "running" in k or "num_batches" in k}


# resnet8 names its classifier `fc`; MobileNetV2's is `classifier`: the probe must not care.
@pytest.mark.parametrize("arch,dataset,bn", [("resnet8", "stl10", "train"), ("MobileNetV2", "tiny_imagenet", "train"),
                                             ("resnet8", "tiny_imagenet", "eval"), ("MobileNetV2", "stl10", "eval")])
def test_probe_trains_head_on_frozen_student(roots: dict[str, Path], tmp_path: Path, arch: str, dataset: str,
                                             bn: str) -> None:
    run = make_student(tmp_path / "run", arch)
    original, _ = read_model_checkpoint(run)
    probe = LinearProbe(run, probe_cfg(roots, dataset, bn))
    result = probe.fit()

    n_train = N_STL_TRAIN if dataset == "stl10" else TINY_CLASSES * TINY_TRAIN
    n_classes = 10 if dataset == "stl10" else TINY_CLASSES
    assert hasattr(original, "fc") == (arch == "resnet8")
    # The backbone's parameters, its own CIFAR classifier included, are bit-identical and frozen.
    for (name, before), (_, after) in zip(original.named_parameters(), probe.backbone.named_parameters()):
        assert torch.equal(before, after), name
        assert not after.requires_grad, name
    before_bn, after_bn = bn_buffers(original), bn_buffers(probe.backbone)
    steps = 2 * -(-n_train // BATCH)
    for name, value in before_bn.items():
        if bn == "eval":
            assert torch.equal(value, after_bn[name]), name
        elif name.endswith("num_batches_tracked"):
            assert int(after_bn[name]) == int(value) + steps, name  # one update per training step
        else:
            assert not torch.equal(value, after_bn[name]), name  # adapted to the target data

    out = run / "transfer" / f"{dataset}_bn-{bn}"
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    base_lr = 0.01 if arch == "MobileNetV2" else 0.05  # the reference's lower rate for MobileNetV2/ShuffleNets
    assert [r["lr"] for r in records] == pytest.approx([base_lr, base_lr / 10])
    assert result["lr"] == base_lr
    tops = [r["top1"] for r in records]
    assert result == json.loads((out / "result.json").read_text())
    assert result["format"] == "rrd-fast-transfer/1" and result["dataset"] == dataset and result["bn"] == bn
    assert result["epochs"] == 2 and result["top1_last"] == tops[-1] and result["top1_best"] == max(tops)
    assert result["best_epoch"] == tops.index(max(tops)) + 1
    assert result["num_classes"] == n_classes and result["num_train"] == n_train
    assert result["feature_dim"] == original.pooled_dim
    assert result["student"]["arch"] == arch and result["student"]["method"] == "rrd"
    assert read_results(run) == {f"{dataset}_bn-{bn}": result}
    assert yaml.safe_load((out / "config.yaml").read_text())["bn"] == bn

    saved = load_file(str(out / "probe.safetensors"))
    assert saved["weight"].shape == (n_classes, original.pooled_dim)
    assert torch.equal(saved["weight"], probe.head.weight.detach())
    assert not torch.equal(saved["weight"], new_head(original.pooled_dim, n_classes, 0).weight.detach())  # it learned
    for name, value in after_bn.items():
        assert torch.equal(saved[f"backbone.{name}"], value), name


def test_precomputed_views_match_fresh_features_and_are_reused(roots: dict[str, Path], tmp_path: Path) -> None:
    run = make_student(tmp_path / "run", "resnet8")
    fresh = LinearProbe(run, probe_cfg(roots, "stl10", "eval"))
    fresh_result = fresh.fit()
    cached = LinearProbe(run, probe_cfg(roots, "stl10", "eval", feature_views=2))
    cached_result = cached.fit()
    assert cached_result["feature_cache"] == "built" and fresh_result["feature_cache"] == "none"
    # V >= epochs: every epoch still sees its own augmentation, so the probe is the same up to rounding.
    torch.testing.assert_close(cached.head.weight, fresh.head.weight, rtol=1e-4, atol=1e-6)
    assert cached_result["top1_last"] == fresh_result["top1_last"]

    out = run / "transfer" / "stl10_bn-eval_views2"
    with safe_open(str(out / "features.safetensors"), framework="pt") as fh:
        stored = fh.get_tensor("train")
    assert stored.shape == (2, N_STL_TRAIN, 64)
    # View 1 is the eval-mode feature of each sample's augmentation at epoch 1.
    backbone, _ = read_model_checkpoint(run)
    with torch.no_grad():
        batch = cached.data.train.batch_for(np.arange(N_STL_TRAIN), 1)
        torch.testing.assert_close(stored[1], backbone(batch.images, features=True).pooled, rtol=1e-4, atol=1e-5)
    assert not torch.equal(stored[0], stored[1])

    again = LinearProbe(run, probe_cfg(roots, "stl10", "eval", feature_views=2), overwrite=True)
    again_result = again.fit()
    assert again_result["feature_cache"] == "reused"
    assert torch.equal(again.head.weight, cached.head.weight)
    changed = LinearProbe(run, probe_cfg(roots, "stl10", "eval", feature_views=2, seed=5), overwrite=True).fit()
    assert changed["feature_cache"] == "built"  # another seed draws other views: the fingerprint no longer fits


def test_resize_is_antialiased_bilinear(roots: dict[str, Path]) -> None:
    for dataset in ("stl10", "tiny_imagenet"):
        split = read_split(dataset, roots[dataset], "train")
        small = resize_split(split, 32, workers=2)
        assert small.images.shape == (len(split.labels), 32, 32, 3) and small.images.dtype == np.uint8
        assert np.array_equal(small.labels, split.labels)
        if dataset == "stl10":
            full = split.images
        else:
            full = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in split.paths])
        ref = F.interpolate(torch.from_numpy(full).permute(0, 3, 1, 2).float(), size=(32, 32), mode="bilinear",
                            antialias=True, align_corners=False).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
        diff = np.abs(small.images.astype(np.float64) - ref)
        assert diff.mean() < 0.3 and diff.max() <= 1, (dataset, diff.mean(), diff.max())


def test_reference_learning_rates() -> None:
    cfg = ProbeConfig(root="x")
    assert resolve_lr(cfg, "wrn_16_2") == 0.05
    assert resolve_lr(cfg, "ShuffleV2") == 0.01 and resolve_lr(cfg, "MobileNetV2") == 0.01
    assert resolve_lr(ProbeConfig(root="x", lr=0.2), "ShuffleV2") == 0.2


def cli(argv: list[str]) -> int:
    return run_cli(lambda: transfer_main(argv))


def test_cli_runs_and_refuses_bad_input(roots: dict[str, Path], tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    run = make_student(tmp_path / "run", "resnet8")
    common = ["epochs=1", f"batch_size={BATCH}", "device=cpu", "progress=false"]
    assert cli([str(run), "--data", "tiny_imagenet", "--root", str(roots["tiny_imagenet"]), "--bn", "eval", *common]) == 0
    assert "last-epoch top-1" in capsys.readouterr().out
    assert (run / "transfer" / "tiny_imagenet_bn-eval" / "result.json").is_file()

    def refused(argv: list[str], *names: object) -> None:
        assert cli(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and "\n" not in err
        for name in names:
            assert str(name) in err, (name, err)

    # A second probe of the same kind needs --overwrite.
    refused([str(run), "--data", "tiny_imagenet", "--root", str(roots["tiny_imagenet"]), "--bn", "eval", *common],
            run / "transfer" / "tiny_imagenet_bn-eval", "--overwrite")
    # No student in the folder; a data set folder that does not exist: nothing is created.
    empty = tmp_path / "empty"
    empty.mkdir()
    refused([str(empty), "--data", "stl10", "--root", str(roots["stl10"]), *common], empty, "model.safetensors")
    refused([str(run), "--data", "stl10", "--root", str(tmp_path / "nowhere"), *common], tmp_path / "nowhere")
    refused([str(run), "--data", "stl10", "--root", str(roots["tiny_imagenet"]), *common], "stl10_binary")
    refused([str(run), "--data", "stl10", "--root", str(roots["stl10"]), "--feature-views", "3", *common],
            "feature_views")
    refused([str(run), "--data", "stl10", "--root", str(roots["stl10"]), "epoch=3"], "epochs")
    assert not (empty / "transfer").exists()
    assert sorted(p.name for p in (run / "transfer").iterdir()) == ["tiny_imagenet_bn-eval"]
