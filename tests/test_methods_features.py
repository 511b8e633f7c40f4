"""FitNet, AT, SP and NST against RepDistiller (fixtures from scripts/reference_fixtures/simple_features.py).

Prefix mapping: models/util.py ConvReg's state_dict loads unchanged into the fitnet term's
`regressor` (term keys `regressor.<ConvReg key>`). Fixture cases may transform single entries
of the feature lists (`transforms`, defined as in the generator) to get spatial mismatches.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from reference_inputs import (BATCH, NUM_CLASSES, SHAPES, assert_summary_close, features, fill_module, labels,
                              load_fixture, state_shapes, student_features, summarize)

from pipelines.batch import Batch
from rrd_fast.config import MethodConfig
from rrd_fast.methods import MethodError, NetInfo, Objective, TermContext, get_method
from rrd_fast.methods.objective import teacher_fields_for
from rrd_fast.models import ModelOutput

WEIGHTS = {"fitnet": (1.0, 0.0, 100.0), "at": (1.0, 0.0, 1000.0), "sp": (1.0, 0.0, 3000.0), "nst": (1.0, 0.0, 50.0)}
CASES = [(m, i) for m in WEIGHTS for i in range(len(load_fixture(m)["cases"]))]
CONTEXT = TermContext(num_train_samples=8, seed=0)


def transform(feats: list[torch.Tensor], ops: dict[str, str]) -> list[torch.Tensor]:
    """As the generator's: `pool2` 2x2 average pooling, `crop12` the top-left 12x12, `drop` removes the entry."""
    out: list[torch.Tensor | None] = list(feats)
    for index, op in ops.items():
        f = feats[int(index)]
        out[int(index)] = {"pool2": lambda: F.avg_pool2d(f, 2), "crop12": lambda: f[..., :12, :12].contiguous(),
                           "drop": lambda: None}[op]()
    return [f for f in out if f is not None]


def _info(arch: str, feats: list[torch.Tensor] | list[tuple[int, ...]]) -> NetInfo:
    shapes = tuple(tuple(f.shape[1:]) if isinstance(f, torch.Tensor) else tuple(f) for f in feats)
    return NetInfo(arch, NUM_CLASSES, shapes[-1][0], tuple(s[0] for s in shapes[1:-1]), shapes)


def _output(feat: list[torch.Tensor], logits: torch.Tensor) -> ModelOutput:
    return ModelOutput(logits, feat[-1], feat[1:-1], [], feat[0])


def _case(case: dict) -> tuple[ModelOutput, dict[str, torch.Tensor], ModelOutput, NetInfo, NetInfo]:
    """Student leaves by ModelOutput field; teacher tensors require grad so that a leak would show."""
    s, t = student_features(case["student"]), features(case["teacher"], "teacher")
    leaf = lambda f: f.detach().clone().requires_grad_(True)  # noqa: E731
    feat_s = [leaf(f) for f in transform([f.detach() for f in s["feat"]], case["transforms"].get("student", {}))]
    feat_t = [leaf(f) for f in transform(t["feat"], case["transforms"].get("teacher", {}))]
    student, teacher = _output(feat_s, s["logits"]), _output(feat_t, leaf(t["logits"]))
    leaves = {"stem": student.stem, "pooled": student.pooled}
    leaves.update({f"stages.{i}": f for i, f in enumerate(student.stages)})
    return student, leaves, teacher, _info(case["student"], feat_s), _info(case["teacher"], feat_t)


def _objective(method: str, s: NetInfo, t: NetInfo, **options: object) -> Objective:
    cfg = MethodConfig(name=method, options={method: dict(options)} if options else {})
    return Objective(cfg, s, t, CONTEXT)


def _batch() -> Batch:
    return Batch(images=torch.zeros(BATCH, 1), labels=labels(), index=torch.arange(BATCH), aug=torch.zeros(BATCH, 3),
                 epoch=0)


@pytest.mark.parametrize("method,index", CASES)
def test_loss_and_gradients_match_reference(method: str, index: int) -> None:
    case = load_fixture(method)["cases"][index]
    student, leaves, teacher, s_info, t_info = _case(case)
    objective = _objective(method, s_info, t_info, **case.get("options", {})).double()
    objective.train()  # loops.py: module_list.train(), so ConvReg's BatchNorm uses batch statistics
    term = objective.terms[method]
    fill_module(term)
    loss = term(student, teacher, _batch())
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert_summary_close({"v": loss.item()}, {"v": case["loss"]}, f"{method}.loss")
    loss.backward()
    for name, ref in case["grads"]["student"].items():
        assert (leaves[name].grad is None) == (ref is None), name
        if ref is not None:
            assert_summary_close(summarize(leaves[name].grad, name), ref, f"{method}.grad[student.{name}]")
    params = dict(term.named_parameters())
    assert set(params) == set(case["grads"]["modules"]) and all(p.requires_grad for p in params.values())
    for name, ref in case["grads"]["modules"].items():
        assert_summary_close(summarize(params[name].grad, name), ref, f"{method}.grad[{name}]")
    assert student.logits.grad is None
    assert all(f.grad is None for f in teacher.feats() + [teacher.logits])
    weighted = objective(student, teacher, _batch())[method]
    assert_summary_close({"v": weighted.item()}, {"v": WEIGHTS[method][2] * case["loss"]}, f"{method}.weighted")


@pytest.mark.parametrize("index", range(len(load_fixture("fitnet")["cases"])))
def test_fitnet_regressor_state_dict_and_init_match_conv_reg(index: int) -> None:
    case = load_fixture("fitnet")["cases"][index]
    _, _, _, s_info, t_info = _case(case)
    torch.manual_seed(0)  # as the generator built ConvReg
    term = _objective("fitnet", s_info, t_info, **case["options"]).terms["fitnet"]
    ref = case["state_dict"]["regressor"]
    assert state_shapes(term.regressor) == ref and type(term.regressor.conv).__name__ == case["conv"]
    assert set(term.state_dict()) == {f"regressor.{k}" for k in ref}  # the fixture stores keys sorted
    for key, summary in case["init"].items():
        assert_summary_close(summarize(term.state_dict()[key], key), summary, f"fitnet.init[{key}]")
    term.regressor.load_state_dict({k: torch.zeros(s) for k, s in ref.items()}, strict=True)


@pytest.mark.parametrize("index", range(len(load_fixture("fitnet")["refusals"])))
def test_fitnet_refuses_shapes_the_reference_cannot_run(index: int) -> None:
    case = load_fixture("fitnet")["refusals"][index]
    assert case["reference_error"]  # the reference fails on these too
    s, t = tuple(case["student_shape"]), tuple(case["teacher_shape"])
    s_info, t_info = _info("sarch", [(8, 32, 32), s, (64,)]), _info("tarch", [(8, 32, 32), t, (64,)])
    with pytest.raises(MethodError) as info:
        _objective("fitnet", s_info, t_info, hint_layer=1)
    message = str(info.value)
    assert "\n" not in message and message.startswith("fitnet:")
    assert f"student feat[1] {s}" in message and f"teacher feat[1] {t}" in message


@pytest.mark.parametrize("hint_layer", [-1, 5, True, "2"])
def test_fitnet_refuses_hint_layers_outside_the_feature_list(hint_layer: object) -> None:
    s, t = _info("resnet20", SHAPES["resnet20"]), _info("wrn_40_2", SHAPES["wrn_40_2"])
    with pytest.raises(MethodError, match=r"^fitnet: hint_layer .*resnet20 \(5 features\).*wrn_40_2 \(5 features\)"):
        _objective("fitnet", s, t, hint_layer=hint_layer)


def test_fitnet_hint_at_the_pooled_vector_is_refused() -> None:
    s, t = _info("resnet20", SHAPES["resnet20"]), _info("wrn_40_2", SHAPES["wrn_40_2"])
    with pytest.raises(MethodError, match=r"^fitnet: .*student feat\[4\] \(64,\) onto teacher feat\[4\] \(128,\)"):
        _objective("fitnet", s, t, hint_layer=4)


@pytest.mark.parametrize("method", ["at", "nst"])
def test_group_methods_refuse_unpairable_stages(method: str) -> None:
    for case in load_fixture(method)["refusals"]:
        assert case["reference_error"]
        s, t = tuple(case["student_shape"]), tuple(case["teacher_shape"])
        with pytest.raises(MethodError) as info:
            _objective(method, _info("sarch", [(8, 32, 32), s, (64,)]), _info("tarch", [(8, 32, 32), t, (64,)]))
        message = str(info.value)
        assert "\n" not in message and message.startswith(f"{method}:") and str(s) in message and str(t) in message
    flat = NetInfo("mlp", NUM_CLASSES, 64, (), ((64,),))
    for name in (method, "sp"):
        with pytest.raises(MethodError, match=f"^{name}: .*mlp"):
            _objective(name, flat, _info("resnet20", SHAPES["resnet20"]))


@pytest.mark.parametrize("method", list(WEIGHTS))
def test_registered_with_authors_weights_and_teacher_fields(method: str) -> None:
    spec = get_method(method)
    assert (spec.term, spec.uses_teacher, spec.default_weights) == (method, True, WEIGHTS[method])
    objective = _objective(method, _info("resnet8x4", SHAPES["resnet8x4"]), _info("resnet32x4", SHAPES["resnet32x4"]))
    assert objective.weights == {"ce": 1.0, method: WEIGHTS[method][2]}
    assert objective.teacher_fields == ("stages",) == teacher_fields_for(MethodConfig(name=method))


def test_fitnet_stem_hint_reads_the_teacher_stem_and_at_takes_p() -> None:
    s, t = _info("resnet20", SHAPES["resnet20"]), _info("wrn_40_2", SHAPES["wrn_40_2"])
    assert _objective("fitnet", s, t, hint_layer=0).teacher_fields == ("stem",)
    assert teacher_fields_for(MethodConfig(name="fitnet", options={"fitnet": {"hint_layer": 0}})) == ("stem",)
    assert _objective("at", s, t, p=4.0).terms["at"].options.p == 4.0
    with pytest.raises(MethodError, match="hint_layr"):
        _objective("fitnet", s, t, hint_layr=1)


@pytest.mark.parametrize("method", list(WEIGHTS))
def test_low_precision_features_give_a_full_precision_loss(method: str) -> None:
    case = load_fixture(method)["cases"][1]  # resnet20 / wrn_40_2: a channel change
    student, _, teacher, s_info, t_info = _case(case)
    term = _objective(method, s_info, t_info, **case.get("options", {})).terms[method]
    for out in (student, teacher):
        out.stem, out.pooled = out.stem.detach().bfloat16(), out.pooled.detach().bfloat16()
        out.stages = [f.detach().bfloat16() for f in out.stages]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = term(student, teacher, _batch())
    assert loss.dtype == torch.float32 and loss.dim() == 0 and torch.isfinite(loss)
