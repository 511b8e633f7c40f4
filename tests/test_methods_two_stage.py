"""AB, FT and FSP against RepDistiller (fixtures from scripts/reference_fixtures/two_stage.py).

Prefix mapping: a reference module's state_dict loads unchanged into the term's attribute of
the same name: `connector` (models/util.py Connector), `paraphraser` (Paraphraser) and
`translator` (Translator). Fixture gradient names are `student.<ModelOutput field>[.i]` and
`<attribute>.<parameter key>`.
"""

from __future__ import annotations

import pytest
import torch
from reference_inputs import (BATCH, NUM_CLASSES, SHAPES, assert_summary_close, features, fill_module, labels,
                              load_fixture, state_shapes, student_features, summarize)

from pipelines.batch import Batch
from rrd_fast.config import MethodConfig
from rrd_fast.methods import InitStage, MethodError, NetInfo, Objective, TermContext, get_method
from rrd_fast.methods.objective import teacher_fields_for
from rrd_fast.models import ModelOutput, create_model, feat_shapes

WEIGHTS = {"ab": (1.0, 0.0, 1.0), "ft": (1.0, 0.0, 200.0), "fsp": (1.0, 0.0, 50.0)}
MODULES = {"ab": ("connector",), "ft": ("paraphraser", "translator"), "fsp": ()}
CASES = [(m, p) for m in WEIGHTS for p, case in load_fixture(m)["pairs"].items() if "init" in case]


def _info(arch: str) -> NetInfo:
    s = SHAPES[arch]
    return NetInfo(arch, NUM_CLASSES, s[-1][0], tuple(c[0] for c in s[1:-1]), tuple(s))


def _objective(method: str, student: str, teacher: str, **options: object) -> Objective:
    cfg = MethodConfig(name=method, options={method: dict(options)} if options else {})
    return Objective(cfg, _info(student), _info(teacher), TermContext(num_train_samples=8, seed=0))


def _outputs(student: str, teacher: str) -> tuple[ModelOutput, dict[str, torch.Tensor], ModelOutput, Batch]:
    s, t = student_features(student), features(teacher, "teacher")
    t = {k: [f.clone().requires_grad_(True) for f in v] if isinstance(v, list) else v for k, v in t.items()}
    out_s = ModelOutput(s["logits"], s["feat"][-1], s["feat"][1:-1], s["preact"][1:-1], s["feat"][0])
    out_t = ModelOutput(t["logits"], t["feat"][-1], t["feat"][1:-1], t["preact"][1:-1], t["feat"][0])
    leaves = {"stem": out_s.stem, "pooled": out_s.pooled, "logits": out_s.logits,
              **{f"stages.{i}": f for i, f in enumerate(out_s.stages)},
              **{f"pre_relu.{i}": f for i, f in enumerate(out_s.pre_relu)}}
    batch = Batch(images=torch.zeros(BATCH, 1), labels=labels(), index=torch.arange(BATCH), aug=torch.zeros(BATCH, 3),
                  epoch=0)
    return out_s, leaves, out_t, batch


def _check(stage: dict, loss: torch.Tensor, leaves: dict, modules: dict, teacher: ModelOutput, what: str) -> None:
    assert loss.dtype == torch.float64 and loss.dim() == 0
    assert_summary_close({"v": loss.item()}, {"v": stage["loss"]}, f"{what}.loss")
    reads_student = any(k.startswith("student.") for k in stage["grads"])
    ours = {f"student.{k}": t.grad for k, t in leaves.items()} if reads_student else {}
    ours.update({f"{p}.{k}": v.grad for p, m in modules.items() for k, v in m.named_parameters()})
    assert set(ours) == set(stage["grads"])
    for name, ref in stage["grads"].items():
        assert (ours[name] is None) == (ref is None), name
        if ref is not None:
            assert_summary_close(summarize(ours[name], name), ref, f"{what}.grad[{name}]")
    assert all(f.grad is None for f in [teacher.stem, *teacher.stages, *teacher.pre_relu])


@pytest.mark.parametrize("method,pair", CASES)
def test_losses_and_gradients_match_reference(method: str, pair: str) -> None:
    case = load_fixture(method)["pairs"][pair]
    objective = _objective(method, case["student"], case["teacher"]).double()
    term = objective.terms[method]
    modules = {name: getattr(term, name) for name in MODULES[method]}
    for module in modules.values():
        fill_module(module)
    stage = term.init_stage()
    assert isinstance(stage, InitStage)
    objective.train()  # as the trainer: everything in train mode, then the init modules (again) in train mode
    for module in stage.modules:
        module.train()
        module.requires_grad_(True)  # the trainer enables them for the init stage only
    assert all(m.training for m in term.modules())
    student, leaves, teacher, batch = _outputs(case["student"], case["teacher"])
    init_modules = {n: m for n, m in modules.items() if any(m is x for x in stage.modules)}
    loss = term.init_loss(student if stage.student_features else None, teacher, batch)
    loss.backward()
    _check(case["init"], loss, leaves, init_modules, teacher, f"{method}.init")
    for module in stage.modules:
        module.requires_grad_(False)
    objective.train()
    student, leaves, teacher, batch = _outputs(case["student"], case["teacher"])
    losses = objective(student, teacher, batch)
    if "main" in case:  # ft: the translator is trained, the paraphraser is fixed and in eval mode (loops.py)
        assert not term.paraphraser.training and term.translator.training
        main = losses[method] / WEIGHTS[method][2]  # the objective weighs it by beta
        main.backward()
        _check(case["main"], main, leaves, {"translator": term.translator}, teacher, f"{method}.main")
    else:  # ab, fsp: loops.py adds no distillation loss in the main stage
        assert losses[method].item() == 0.0 and losses[method].dtype == torch.float64
        assert not losses[method].requires_grad


@pytest.mark.parametrize("method,pair", CASES)
def test_state_dicts_equal_reference_modules(method: str, pair: str) -> None:
    case = load_fixture(method)["pairs"][pair]
    term = _objective(method, case["student"], case["teacher"]).terms[method]
    assert set(case["state_shapes"]) == set(MODULES[method])
    for name, shapes in case["state_shapes"].items():
        module = getattr(term, name)
        assert state_shapes(module) == shapes
        module.load_state_dict({k: torch.zeros(s) for k, s in shapes.items()}, strict=True)
    if method == "ft":  # the paraphraser has no BatchNorm, so its main-stage eval mode changes nothing
        assert not any("running" in k for k in case["state_shapes"]["paraphraser"])


@pytest.mark.parametrize("method", list(WEIGHTS))
def test_registration_and_init_stage_fields(method: str) -> None:
    spec = get_method(method)
    assert (spec.term, spec.uses_teacher, spec.default_weights) == (method, True, WEIGHTS[method])
    objective = _objective(method, "resnet8x4", "resnet32x4")
    assert objective.weights == {"ce": 1.0, method: WEIGHTS[method][2]}
    term = objective.terms[method]
    stage = term.init_stage()
    names, *fields = {"ab": (("connector",), True, ("pre_relu",), None),
                      "ft": (("paraphraser",), False, ("stages",), 0.01),
                      "fsp": ((), True, ("stem", "stages"), None)}[method]
    assert stage is not None and stage.epochs == 30
    assert stage.modules == tuple(getattr(term, n) for n in names)
    assert [stage.student_features, stage.teacher_fields, stage.lr] == fields
    assert objective.teacher_fields == (("stages",) if method == "ft" else ())
    cfg = MethodConfig(name=method)
    assert set(teacher_fields_for(cfg)) == set(objective.teacher_fields) | set(stage.teacher_fields)
    for module in stage.modules:  # not in the main optimizer
        assert not any(p.requires_grad for p in module.parameters())
    assert _objective(method, "resnet8x4", "resnet32x4", init_epochs=0).terms[method].init_stage() is None
    assert _objective(method, "resnet8x4", "resnet32x4", init_epochs=2).terms[method].init_stage().epochs == 2


def test_ft_init_lr_follows_pretrain_student_list() -> None:
    assert _objective("ft", "resnet20", "wrn_40_2").terms["ft"].init_stage().lr == 0.01
    vgg = NetInfo("vgg8", NUM_CLASSES, 512, (), feat_shapes(create_model("vgg8"), 3, 32))
    cfg = MethodConfig(name="ft")
    term = Objective(cfg, vgg, _info("resnet32x4"), TermContext(num_train_samples=8, seed=0)).terms["ft"]
    assert term.init_stage().lr is None


def test_fsp_refuses_mismatched_channels_like_reference() -> None:
    case = load_fixture("fsp")["pairs"]["resnet20/wrn_40_2"]
    assert "channels not equal" in case["reference_error"]
    with pytest.raises(MethodError) as info:
        _objective("fsp", "resnet20", "wrn_40_2")
    message = str(info.value)
    assert "\n" not in message and message.startswith("fsp:") and "resnet20" in message and "wrn_40_2" in message
    s, t = SHAPES["resnet20"], SHAPES["wrn_40_2"]
    names = ["stem", "stage1", "stage2", "stage3"]
    for name, a, b in zip(names, s, t):
        assert (f"{name}: student {a} vs teacher {b}" in message) == (a[0] != b[0])


@pytest.mark.parametrize("method", ["ab", "fsp"])
def test_zero_main_loss_is_full_precision_on_logits_device(method: str) -> None:
    term = _objective(method, "resnet8x4", "resnet32x4").terms[method]
    student, _, _, batch = _outputs("resnet8x4", "resnet32x4")
    student.logits = student.logits.detach().bfloat16()
    zero = term(student, None, batch)
    assert zero.dtype == torch.float32 and zero.device == student.logits.device and zero.item() == 0.0


@pytest.mark.parametrize("method", list(WEIGHTS))
def test_low_precision_features_give_full_precision_losses(method: str) -> None:
    pair = ("resnet8x4", "resnet32x4") if method == "fsp" else ("resnet20", "wrn_40_2")  # ab: with connector convs
    term = _objective(method, *pair).terms[method]  # float32 modules, bf16 features under autocast
    stage = term.init_stage()
    student, _, teacher, batch = _outputs(*pair)
    low = lambda f: f.detach().bfloat16()  # noqa: E731
    for out in (student, teacher):
        out.logits, out.pooled, out.stem = low(out.logits), low(out.pooled), low(out.stem)
        out.stages, out.pre_relu = [low(f) for f in out.stages], [low(f) for f in out.pre_relu]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        init = term.init_loss(student if stage.student_features else None, teacher, batch)
        main = term(student, teacher, batch)
    assert all(loss.dtype == torch.float32 and torch.isfinite(loss) for loss in (init, main))
