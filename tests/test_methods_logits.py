"""KD, DKD and RRD against their reference code (fixtures from scripts/reference_fixtures/logits_and_rrd.py).

KD: RepDistiller DistillKL; DKD: mdistiller's DKD distiller (CE + warmed-up DKD, per-pair beta);
RRD: the authors' RRDLoss at the July 2024 and Feb 2025 commits, over two steps so that the enqueue
order is pinned. The reference's embed_*.linear.* (2024) or memory.embed_* (2025) keys load into
ours as embed_*.*; its queue was set to our initial queue (it initialises unit-norm columns).
"""

from __future__ import annotations

import pytest
import torch
from reference_inputs import NUM_CLASSES, SHAPES, assert_summary_close, features, fill_module, labels, load_fixture
from reference_inputs import student_features, summarize
from torch import nn

from pipelines.batch import Batch
from rrd_fast.config import MethodConfig
from rrd_fast.methods import MethodError, MethodSpec, NetInfo, Objective, TermContext, get_method
from rrd_fast.methods.dkd import DEFAULT_BETA, PAIR_BETA, DKDOptions
from rrd_fast.methods.rrd import PRESETS
from rrd_fast.models import ModelOutput

CONTEXT = TermContext(num_train_samples=10, seed=0)
KD, DKD = load_fixture("kd"), load_fixture("dkd")
RRD = {preset: load_fixture(f"rrd_{preset}") for preset in PRESETS}


def _info(arch: str) -> NetInfo:
    s = SHAPES.get(arch, SHAPES["resnet20"])
    return NetInfo(arch, NUM_CLASSES, s[-1][0], tuple(c[0] for c in s[1:-1]), tuple(s))


def _outputs(s_arch: str, t_arch: str, batch: int, seed: int = 0) -> tuple[ModelOutput, ModelOutput, Batch]:
    s, t = student_features(s_arch, batch, seed), features(t_arch, "teacher", batch, seed)
    student = ModelOutput(s["logits"], s["feat"][-1])
    # Leaves that require grad, so that a test can check the term sends them none.
    teacher = ModelOutput(t["logits"].requires_grad_(True), t["feat"][-1].requires_grad_(True))
    b = Batch(images=torch.zeros(batch, 1), labels=labels(batch, seed), index=torch.arange(batch),
              aug=torch.zeros(batch, 3), epoch=0)
    return student, teacher, b


def _objective(name: str, s_arch: str, t_arch: str, **kw: object) -> Objective:
    return Objective(MethodConfig(name=name, **kw), _info(s_arch), _info(t_arch), CONTEXT)


@pytest.mark.parametrize("case", KD["cases"], ids=lambda c: f"{c['teacher']}-{c['student']}")
def test_kd_matches_repdistiller(case: dict) -> None:
    term = _objective("kd", case["student"], case["teacher"]).terms["kd"]
    assert term.options.T == KD["options"]["T"]
    student, teacher, batch = _outputs(case["student"], case["teacher"], KD["inputs"]["batch"])
    loss = term(student, teacher, batch)
    (grad,) = torch.autograd.grad(loss, student.logits)
    assert_summary_close({"v": loss.item()}, {"v": case["loss"]}, "kd.loss")
    assert_summary_close(summarize(grad, "logits"), case["grads"]["logits"], "kd.grad.logits")


@pytest.mark.parametrize("case", DKD["cases"], ids=lambda c: f"{c['teacher']}-{c['student']}-e{c['main_epoch']}"
                         f"{'-beta' if c['options'] else ''}")
def test_dkd_objective_matches_mdistiller(case: dict) -> None:
    objective = _objective("dkd", case["student"], case["teacher"], options={"dkd": case["options"]})
    objective.start_epoch(case["main_epoch"])
    student, teacher, batch = _outputs(case["student"], case["teacher"], DKD["inputs"]["batch"])
    out = objective(student, teacher, batch)
    assert_summary_close({"v": out["dkd"].item()}, {"v": case["loss_dkd"]}, "dkd.loss")
    assert_summary_close({"v": out["ce"].item()}, {"v": case["loss_ce"]}, "ce.loss")
    grad, grad_t = torch.autograd.grad(out["dkd"], [student.logits, teacher.logits], allow_unused=True)
    assert_summary_close(summarize(grad, "logits"), case["grads"]["logits"], "dkd.grad.logits")
    assert grad_t is None  # the teacher's logits are a fixed target


@pytest.mark.parametrize("epoch", [0, 9, 19, 25])
def test_dkd_warmup_is_mdistillers_formula_at_its_one_based_epoch(epoch: int) -> None:
    term = _objective("dkd", "resnet8x4", "resnet32x4").terms["dkd"]
    term.start_epoch(epoch)
    assert term.factor == min((epoch + 1) / DKD["defaults"]["WARMUP"], 1.0)
    assert term.factor == {0: 0.05, 9: 0.5, 19: 1.0, 25: 1.0}[epoch]


def test_dkd_defaults_and_pair_betas_are_mdistillers() -> None:
    d = DKD["defaults"]
    ours = (DKDOptions().alpha, DKDOptions().T, DKDOptions().warmup, DEFAULT_BETA)
    assert ours == (d["ALPHA"], d["T"], d["WARMUP"], d["BETA"])
    assert PAIR_BETA == {(p["teacher"], p["student"]): p["beta"] for p in DKD["pair_betas"]}
    assert _objective("dkd", "wrn_16_2", "wrn_40_2").terms["dkd"].beta == 6.0
    assert _objective("dkd", "resnet20", "resnet56").terms["dkd"].beta == 2.0
    assert _objective("dkd", "resnet20", "wrn_40_2").terms["dkd"].beta == 8.0  # pair not in mdistiller: cfg default
    assert _objective("dkd", "wrn_16_2", "wrn_40_2", options={"dkd": {"beta": 3.0}}).terms["dkd"].beta == 3.0


def test_dkd_registration_and_weights() -> None:
    assert get_method("dkd") == MethodSpec("dkd", term="dkd", uses_teacher=True, default_weights=(1.0, 0.0, 1.0))
    objective = _objective("dkd", "resnet8x4", "resnet32x4")
    assert objective.weights == {"ce": 1.0, "dkd": 1.0} and objective.teacher_fields == ("logits",)
    with pytest.raises(MethodError, match="dkd: student .* classes"):
        Objective(MethodConfig("dkd"), NetInfo("s", 10, 6, (8,)), _info("resnet32x4"), CONTEXT)


@pytest.mark.parametrize("preset,index", [(p, i) for p in PRESETS for i in range(len(RRD[p]["cases"]))])
def test_rrd_matches_authors_code_over_two_steps(preset: str, index: int) -> None:
    fixture = RRD[preset]
    case = fixture["cases"][index]
    refs = fixture["reference_defaults"]
    options = {"preset": preset, **fixture["options"]}
    term = _objective("rrd", case["student"], case["teacher"], gamma=0.0, options={"rrd": options}).terms["rrd"]
    assert (term.tau_s, term.tau_t) == (refs["nce_t_s"], refs["nce_t_t"])
    term.double()
    fill_module(nn.ModuleDict({"embed_s": term.embed_s, "embed_t": term.embed_t}))
    assert_summary_close(summarize(term.queue, "queue"), case["queue_init"], "rrd.queue_init")
    for step in case["steps"]:
        student, teacher, batch = _outputs(case["student"], case["teacher"], fixture["inputs"]["batch"], step["seed"])
        loss = term(student, teacher, batch)
        *grads, grad_t = torch.autograd.grad(loss, [student.pooled, term.embed_s.weight, term.embed_s.bias,
                                                    teacher.pooled], allow_unused=True)
        what = f"rrd_{preset}.step{step['seed']}"
        assert_summary_close({"v": loss.item()}, {"v": step["loss"]}, f"{what}.loss")
        assert grad_t is None and not term.embed_t.weight.requires_grad
        for name, grad in zip(["pooled", "embed_s.weight", "embed_s.bias"], grads):
            assert_summary_close(summarize(grad, name), step["grads"][name], f"{what}.grad.{name}")
        assert_summary_close(summarize(term.queue, "queue"), step["queue"], f"{what}.queue")
        assert int(term.memory.ptr) == step["ptr"]
