"""CC, RKD, PKT and VID against RepDistiller (fixtures from scripts/reference_fixtures/relational.py).

Prefix mapping: a reference module's state_dict loads into our term under `<name>.`, where the
fixture's `state_dict` names the modules (cc: embed_s/embed_t hold models/util.py LinearEmbed's
keys; vid: `heads` holds the keys of train_student.py's nn.ModuleList of VIDLoss).
"""

from __future__ import annotations

import pytest
import torch
from reference_inputs import (BATCH, NUM_CLASSES, SHAPES, assert_summary_close, features, fill_module, labels,
                              load_fixture, state_shapes, student_features, summarize)

from pipelines.batch import Batch
from rrd_fast.config import MethodConfig
from rrd_fast.methods import MethodError, NetInfo, Objective, TermContext, get_method
from rrd_fast.methods.base import get_term, parse_options
from rrd_fast.models import ModelOutput

METHODS = {"cc": ((1.0, 0.0, 0.02), ("pooled",)), "rkd": ((1.0, 0.0, 1.0), ("pooled",)),
           "pkt": ((1.0, 0.0, 30000.0), ("pooled",)), "vid": ((1.0, 0.0, 1.0), ("stages",))}
CASES = [(m, i) for m in METHODS for i in range(len(load_fixture(m)["cases"]))]
CONTEXT = TermContext(num_train_samples=10, seed=0)


def _order(case: dict, n: int) -> list[int]:
    return case["teacher_stage_order"] or list(range(n))


def _infos(case: dict) -> tuple[NetInfo, NetInfo]:
    s, t = SHAPES[case["student"]], SHAPES[case["teacher"]]
    t_stages = [t[1:-1][i][0] for i in _order(case, len(t) - 2)]
    return (NetInfo(case["student"], NUM_CLASSES, s[-1][0], tuple(c[0] for c in s[1:-1]), tuple(s)),
            NetInfo(case["teacher"], NUM_CLASSES, t[-1][0], tuple(t_stages), tuple(t)))


def _outputs(case: dict) -> tuple[ModelOutput, ModelOutput, Batch]:
    s = student_features(case["student"])
    t = features(case["teacher"], "teacher")
    feat_t = [f.clone().requires_grad_(True) for f in t["feat"]]  # must receive no gradient
    t_stages = [feat_t[1:-1][i] for i in _order(case, len(feat_t) - 2)]
    student = ModelOutput(s["logits"], s["feat"][-1], s["feat"][1:-1], s["preact"][1:-1], s["feat"][0])
    teacher = ModelOutput(t["logits"], feat_t[-1], t_stages, [], feat_t[0])
    batch = Batch(images=torch.zeros(BATCH, 1), labels=labels(), index=torch.arange(BATCH), aug=torch.zeros(BATCH, 3),
                  epoch=0)
    return student, teacher, batch


def _objective(method: str, case: dict, **options: object) -> Objective:
    cfg = MethodConfig(name=method, options={method: dict(options)} if options else {})
    return Objective(cfg, *_infos(case), CONTEXT)


@pytest.mark.parametrize("method,index", CASES)
def test_loss_and_gradients_match_reference(method: str, index: int) -> None:
    case = load_fixture(method)["cases"][index]
    term = _objective(method, case).terms[method].double()
    fill_module(term)
    student, teacher, batch = _outputs(case)
    loss = term(student, teacher, batch)
    loss.backward()
    assert loss.dtype == torch.float64
    assert_summary_close({"v": float(loss.detach())}, {"v": case["loss"]}, f"{method}.loss")
    used = {"pooled": student.pooled, **{f"stages.{i}": f for i, f in enumerate(student.stages)}}
    params = dict(term.named_parameters())
    assert all(p.requires_grad for p in params.values())  # every head is trained, cc's embed_t included
    assert set(case["grads"]) - set(used) == set(params)
    for name, ref in case["grads"].items():
        grad = (used[name] if name in used else params[name]).grad
        assert grad is not None, name
        assert_summary_close(summarize(grad, name), ref, f"{method}.grad[{name}]")
    unused = [t for n, t in used.items() if n not in case["grads"]] + [student.stem, student.logits]
    assert all(t.grad is None for t in unused)
    assert all(t.grad is None for t in [teacher.pooled, teacher.stem, *teacher.stages])


def _fresh_term(method: str, case: dict) -> torch.nn.Module:
    """Built under seed 0, as the generator built the reference's modules (in the trainer's order)."""
    torch.manual_seed(0)
    cls = get_term(method)
    return cls(parse_options(cls, None), *_infos(case), CONTEXT)


@pytest.mark.parametrize("method,index", CASES)
def test_state_dict_and_default_init_match_reference(method: str, index: int) -> None:
    case = load_fixture(method)["cases"][index]
    term = _fresh_term(method, case)
    for name, shapes in case["state_dict"].items():
        assert state_shapes(getattr(term, name)) == shapes
    reference_state = {f"{name}.{k}": torch.zeros(s) for name, sd in case["state_dict"].items() for k, s in sd.items()}
    assert set(term.state_dict()) == set(reference_state)
    for key, ref in case["init"].items():
        assert_summary_close(summarize(term.state_dict()[key], key), ref, f"{method}.init[{key}]")
    term.load_state_dict(reference_state, strict=True)  # the stated prefix mapping is all it takes


@pytest.mark.parametrize("method", METHODS)
def test_registered_with_authors_weights_and_teacher_fields(method: str) -> None:
    weights, fields = METHODS[method]
    spec = get_method(method)
    assert (spec.term, spec.uses_teacher, spec.default_weights) == (method, True, weights)
    objective = _objective(method, load_fixture(method)["cases"][0])
    assert objective.weights == {"ce": weights[0], method: weights[2]}
    assert objective.teacher_fields == fields


def test_options_reach_the_terms() -> None:
    case = load_fixture("cc")["cases"][1]
    assert _objective("cc", case, feat_dim=16).terms["cc"].embed_t.linear.weight.shape == (16, 128)
    assert _objective("rkd", case, w_d=1.0, w_a=0.0).terms["rkd"].options.w_a == 0.0
    vid = _objective("vid", case, init_pred_var=2.0).terms["vid"]
    torch.testing.assert_close(torch.nn.functional.softplus(vid.heads[0].log_scale) + 1e-5, torch.full((32,), 2.0))
    with pytest.raises(MethodError, match="feat_dimm"):
        _objective("cc", case, feat_dimm=16)


def test_vid_without_stage_features_is_a_method_error() -> None:
    s, t = _infos(load_fixture("vid")["cases"][0])
    flat = NetInfo("mlp", NUM_CLASSES, 256, ())
    with pytest.raises(MethodError, match="vid: .*mlp"):
        Objective(MethodConfig(name="vid"), flat, t, CONTEXT)


@pytest.mark.parametrize("method", METHODS)
def test_half_precision_features_give_a_full_precision_loss(method: str) -> None:
    case = load_fixture(method)["cases"][1]
    term = _objective(method, case).terms[method]
    student, teacher, batch = _outputs(case)
    for out in (student, teacher):
        out.pooled, out.stages = out.pooled.detach().bfloat16(), [f.detach().bfloat16() for f in out.stages]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = term(student, teacher, batch)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
