"""Every zoo model's feature list and feature modules equal RepDistiller's (pinned fixture).

The fixture (scripts/reference_fixtures/model_features.py) ran the reference models on
reference_inputs.model_input() with the weights of fill_module(seed=0); ours get the same
weights under the same keys, so `feats(preact)` must match `model(x, is_feat=True, preact)`
tensor by tensor and `feature_modules()` must be `get_feat_modules()`.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from torch import nn

from reference_inputs import assert_summary_close, fill_module, load_fixture, model_input, summarize
from rrd_fast.models import ModelOutput, create_model, feat_shapes, list_models

FIXTURE = load_fixture("model_features")
INPUTS = FIXTURE["inputs"]
MODELS: dict[str, Any] = FIXTURE["models"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@functools.lru_cache(maxsize=None)
def _model(name: str) -> nn.Module:
    """Ours, prepared as the generator prepared the reference: float64, filled, eval mode."""
    model = create_model(name, num_classes=INPUTS["num_classes"]).double()
    fill_module(model, INPUTS["fill_seed"])
    return model.eval()


@functools.lru_cache(maxsize=None)
def _output(name: str) -> ModelOutput:
    x = model_input(INPUTS["batch"], 3, INPUTS["size"], INPUTS["seed"])
    with torch.no_grad():
        return _model(name)(x, features=True)


def test_fixture_covers_the_zoo() -> None:
    assert sorted(MODELS) == list_models()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("preact", [False, True], ids=["feat", "preact"])
def test_feats_equal_reference(name: str, preact: bool) -> None:
    ref = MODELS[name]["preact" if preact else "feat"]
    feats = _output(name).feats(preact)
    assert [list(f.shape) for f in feats] == [r["shape"] for r in ref], name
    for i, (f, r) in enumerate(zip(feats, ref)):
        assert f.dtype == torch.float64
        assert_summary_close(summarize(f, f"feat.{i}"), r["summary"], f"{name}.{'preact' if preact else 'feat'}[{i}]")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_logits_and_layout_equal_reference(name: str) -> None:
    assert_summary_close(summarize(_output(name).logits, "logits"), MODELS[name]["logits"], f"{name}.logits")
    state = _model(name).state_dict()
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in state.items())
    assert (len(state), zlib.crc32(text.encode())) == (MODELS[name]["state_keys"], MODELS[name]["state_crc"])


@pytest.mark.parametrize("name", sorted(MODELS))
def test_feature_modules_are_get_feat_modules(name: str) -> None:
    """Same modules in the same order: attribute names, their state_dict keys, their sizes."""
    model = _model(name)
    names = {id(m): n for n, m in model.named_modules()}
    ours = [{"name": names[id(m)], "keys": [f"{names[id(m)]}.{k}" for k in m.state_dict()],
             "params": sum(p.numel() for p in m.parameters())} for m in model.feature_modules()]
    ref = [{k: e[k] for k in ("name", "keys", "params")} for e in MODELS[name]["feat_modules"]]
    assert ours == ref
    # Parameter-free entries (ReLU, pools) are the same kind of module as the reference's.
    for m, e in zip(model.feature_modules(), MODELS[name]["feat_modules"]):
        if not e["keys"]:
            assert type(m).__name__ == e["type"]
    # What the init stage trains excludes at least the classifier.
    trained = {id(p) for m in model.feature_modules() for p in m.parameters()}
    assert len(trained) < len(list(model.parameters()))


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1", "vgg8", "MobileNetV2", "ShuffleV2"])
def test_feat_shapes_are_per_sample_feature_shapes(name: str) -> None:
    """float32, train mode in: shapes of feats() without the batch, mode and BN statistics unchanged."""
    model = create_model(name).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shapes = feat_shapes(model, 3, 32)
    assert shapes == tuple(tuple(f["shape"][1:]) for f in MODELS[name]["feat"])
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    model.eval()
    assert feat_shapes(model, 3, 32) == shapes and not model.training


def test_feat_shapes_follow_input_size_and_channels() -> None:
    model = create_model("wrn_16_1", num_classes=10, in_channels=1).eval()
    with torch.no_grad():
        feats = model(torch.zeros(1, 1, 16, 16), features=True).feats()
    assert feat_shapes(model, 1, 16) == tuple(tuple(f.shape[1:]) for f in feats)
    assert feat_shapes(model, 1, 16)[-2][-1] == 4  # 16x16 in, two stride-2 stages
