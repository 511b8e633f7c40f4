"""RRD loss, queue and KD checks against hand computation and direct loop implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.batch import Batch
from rrd_fast.config import MethodConfig
from rrd_fast.memory import FifoQueue, soft_target_cross_entropy
from rrd_fast.methods import MethodError, NetInfo, Objective, TermContext
from rrd_fast.methods.kd import kd_loss
from rrd_fast.methods.rrd import PRESETS, RRDOptions
from rrd_fast.models import ModelOutput


def test_soft_cross_entropy_matches_hand_computation() -> None:
    # One sample, a queue of three 2-d keys; every number can be checked on paper.
    z_s = torch.tensor([[1.0, 0.0]])
    z_t = torch.tensor([[0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
    tau_s, tau_t = 0.5, 0.25
    s = [1.0 / tau_s, 0.0, -1.0 / tau_s]  # z_s·k / tau_s
    t = [0.0, 1.0 / tau_t, 0.0]  # z_t·k / tau_t
    p_t = [math.exp(v) / sum(math.exp(u) for u in t) for v in t]
    log_q = [v - math.log(sum(math.exp(u) for u in s)) for v in s]
    expected = -sum(p * q for p, q in zip(p_t, log_q))
    got = soft_target_cross_entropy(z_s, z_t, keys, tau_s, tau_t)
    assert got.shape == (1,)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def _loop_loss(z_s: torch.Tensor, z_t: torch.Tensor, queue: torch.Tensor, tau_s: float, tau_t: float) -> torch.Tensor:
    """Direct, unoptimised definition: explicit sums over samples and queue entries."""
    total = z_s.new_zeros(())
    for i in range(z_s.shape[0]):
        s = [torch.dot(z_s[i], queue[k]) / tau_s for k in range(queue.shape[0])]
        t = [torch.dot(z_t[i], queue[k]).detach() / tau_t for k in range(queue.shape[0])]
        t_norm = torch.logsumexp(torch.stack(t), 0)
        s_norm = torch.logsumexp(torch.stack(s), 0)
        total = total - sum(torch.exp(t[k] - t_norm) * (s[k] - s_norm) for k in range(queue.shape[0]))
    return total / z_s.shape[0]


def _rrd_objective(preset: str, queue_size: int = 16, s_dim: int = 6, t_dim: int = 10) -> Objective:
    cfg = MethodConfig(name="rrd", gamma=0.0, alpha=0.0, beta=1.0,
                       options={"rrd": {"preset": preset, "queue_size": queue_size, "feat_dim": 4}})
    student = NetInfo("s", 5, s_dim, (8,))
    teacher = NetInfo("t", 5, t_dim, (8,))
    torch.manual_seed(0)
    return Objective(cfg, student, teacher, TermContext(num_train_samples=100, seed=3))


def _outputs(b: int, s_dim: int = 6, t_dim: int = 10, seed: int = 1) -> tuple[ModelOutput, ModelOutput, Batch]:
    g = torch.Generator().manual_seed(seed)
    student = ModelOutput(logits=torch.randn(b, 5, generator=g), pooled=torch.randn(b, s_dim, generator=g, requires_grad=True))
    teacher = ModelOutput(logits=torch.randn(b, 5, generator=g), pooled=torch.randn(b, t_dim, generator=g))
    batch = Batch(images=torch.zeros(b, 1), labels=torch.zeros(b, dtype=torch.long), index=torch.arange(b),
                  aug=torch.zeros(b, 3), epoch=0)
    return student, teacher, batch


@pytest.mark.parametrize("preset", ["paper", "2025"])
def test_rrd_term_matches_loop_implementation_with_gradients(preset: str) -> None:
    objective = _rrd_objective(preset)
    term = objective.terms["rrd"]
    tau_s, tau_t = PRESETS[preset]["tau_s"], PRESETS[preset]["tau_t"]
    assert (term.tau_s, term.tau_t) == (tau_s, tau_t)
    student, teacher, batch = _outputs(5)
    queue_before = term.queue.clone()

    loss = objective(student, teacher, batch)["rrd"]
    loss.backward()
    grad_w, grad_h = term.embed_s.weight.grad.clone(), student.pooled.grad.clone()

    # Reference: same embeddings, the queue the preset says the loss must see.
    w = term.embed_s.weight.detach().clone().requires_grad_(True)
    h = student.pooled.detach().clone().requires_grad_(True)
    z_s = F.normalize(h @ w.t() + term.embed_s.bias.detach(), dim=1)
    z_t = F.normalize(teacher.pooled @ term.embed_t.weight.t() + term.embed_t.bias, dim=1)
    queue = queue_before.clone()
    if preset == "2025":  # own keys enqueued before the loss
        queue[:5] = z_t
    ref = _loop_loss(z_s, z_t, queue, tau_s, tau_t)
    ref.backward()
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    torch.testing.assert_close(grad_w, w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad_h, h.grad, rtol=1e-4, atol=1e-6)
    # Either way, the batch's keys end up at the head of the queue afterwards.
    torch.testing.assert_close(term.queue[:5], z_t)
    assert int(term.memory.ptr) == 5
    assert term.embed_t.weight.grad is None  # fixed projection: no gradient ever reaches it


def test_paper_preset_excludes_own_key_2025_includes_it() -> None:
    for preset in ("paper", "2025"):
        objective = _rrd_objective(preset, queue_size=8)
        student, teacher, batch = _outputs(3)
        term = objective.terms["rrd"]
        z_s, z_t = term.embed(student.pooled, teacher.pooled)
        old = term.queue.clone()
        with_own = torch.cat([z_t, old[3:]])
        want = _loop_loss(z_s, z_t, old if preset == "paper" else with_own, term.tau_s, term.tau_t).item()
        other = _loop_loss(z_s, z_t, with_own if preset == "paper" else old, term.tau_s, term.tau_t).item()
        got = objective(student, teacher, batch)["rrd"].item()
        assert got == pytest.approx(want, rel=1e-5)
        assert abs(got - other) > 1e-3  # the two enqueue orders are distinguishable


def test_queue_wraps_around_in_fifo_order_for_any_batch_size() -> None:
    queue = FifoQueue(size=10, dim=3, seed=0)
    norms = queue.queue.norm(dim=1)
    torch.testing.assert_close(norms, torch.ones(10))
    written = []
    for step, b in enumerate([4, 4, 4, 7]):  # 10 % 4 != 0: wraps mid-batch
        keys = F.normalize(torch.randn(b, 3), dim=1)
        queue.enqueue(keys)
        written.extend(keys)
    expected_ptr = (4 + 4 + 4 + 7) % 10
    assert int(queue.ptr) == expected_ptr
    # The queue holds exactly the newest 10 keys, the oldest overwritten first.
    newest = torch.stack(written[-10:])
    order = [(expected_ptr + j) % 10 for j in range(10)]  # oldest → newest positions
    torch.testing.assert_close(queue.queue[order], newest)
    torch.testing.assert_close(queue.queue.norm(dim=1), torch.ones(10))


def test_queue_batch_larger_than_queue_keeps_newest_keys() -> None:
    queue = FifoQueue(size=4, dim=2, seed=0)
    queue.enqueue(torch.eye(2)[[0]])  # ptr 1
    keys = torch.arange(12, dtype=torch.float32).view(6, 2)
    queue.enqueue(keys)
    # Sequential writes of 6 keys from position 1 end at position 3; the last 4 keys survive.
    assert int(queue.ptr) == (1 + 6) % 4
    expected = torch.empty(4, 2)
    for j, key in enumerate(keys):
        expected[(1 + j) % 4] = key
    torch.testing.assert_close(queue.queue, expected)


def test_rrd_accepts_batch_sizes_that_do_not_divide_the_queue() -> None:
    objective = _rrd_objective("paper", queue_size=10)
    for b in (3, 7, 11):
        student, teacher, batch = _outputs(b, seed=b)
        loss = objective(student, teacher, batch)["rrd"]
        assert torch.isfinite(loss)
    assert int(objective.terms["rrd"].memory.ptr) == (3 + 7 + 11) % 10


def test_kd_formula_matches_explicit_sum() -> None:
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    T = 4.0
    expected = 0.0
    for i in range(4):
        p = torch.softmax(t[i] / T, 0)
        log_q = torch.log_softmax(s[i] / T, 0)
        expected += float((p * (torch.log(p) - log_q)).sum())
    expected = expected / 4 * T * T
    assert kd_loss(s, t, T).item() == pytest.approx(expected, rel=1e-5)
    assert kd_loss(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_objective_weights_and_terms() -> None:
    student, teacher = NetInfo("s", 5, 6, (8,)), NetInfo("t", 5, 10, (8,))
    ctx = TermContext(100, 0)
    rrd_kd = Objective(MethodConfig("rrd", gamma=1.0, alpha=0.9, beta=1.0), student, teacher, ctx)
    assert rrd_kd.weights == {"ce": 1.0, "kd": 0.9, "rrd": 1.0}
    assert rrd_kd.teacher_fields == ("logits", "pooled")
    s_out, t_out, batch = _outputs(4)
    terms = rrd_kd(s_out, t_out, batch)
    torch.testing.assert_close(terms["kd"], 0.9 * kd_loss(s_out.logits, t_out.logits, 4.0))
    vanilla = Objective(MethodConfig("vanilla"), student, None, ctx)
    assert list(vanilla.terms) == ["ce"] and vanilla.teacher_fields == ()


@pytest.mark.parametrize("cfg, message", [
    (MethodConfig("vanilla", alpha=0.5), "trains without a teacher"),
    (MethodConfig("kd", beta=1.0), "no term for beta"),
    (MethodConfig("rdr"), "did you mean 'rrd'"),
    (MethodConfig("rrd", beta=1.0, options={"rrd": {"tau": 0.1}}), "did you mean 'tau_"),
    (MethodConfig("rrd", beta=1.0, options={"rrd": {"preset": "2026"}}), "not one of"),
    (MethodConfig("rrd", beta=1.0, options={"crd": {}}), "no term"),
])
def test_objective_refuses_bad_method_configs(cfg: MethodConfig, message: str) -> None:
    with pytest.raises(MethodError, match=message):
        Objective(cfg, NetInfo("s", 5, 6, (8,)), NetInfo("t", 5, 10, (8,)), TermContext(100, 0))


def test_kd_refuses_class_count_mismatch() -> None:
    with pytest.raises(MethodError, match="classes"):
        Objective(MethodConfig("kd", gamma=0.1, alpha=0.9), NetInfo("s", 10, 6, (8,)), NetInfo("t", 100, 10, (8,)),
                  TermContext(100, 0))


def test_options_override_preset_values() -> None:
    assert RRDOptions(preset="2025", tau_s=0.2).resolved() == (0.2, 0.02, "before")
    assert RRDOptions().resolved() == (0.04, 0.10, "after")
    assert np.isclose(PRESETS["2025"]["tau_t"], 0.02)
