"""`python -m rrd_fast.bench cache-dtype` machinery on tiny synthetic Fashion-MNIST: its analysis numbers
match an independent computation from the raw shards, an fp32-cache KD run's step losses and weights equal
the online run's exactly, and an fp16 cache's run differs from its first step, in the KD term only."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from pipelines.formats import get_format
from pipelines.synthetic import write_fashion_mnist
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.models import create_model
from rrd_fast.bench.cache_dtype import Study, divergence, efolding_steps, kd_effect, run_study


def _teacher(path: Path) -> Path:
    """A resnet8 teacher with random weights and non-trivial BN statistics (training one costs seconds)."""
    fmt = get_format("fashion_mnist")
    torch.manual_seed(7)
    model = create_model("resnet8", num_classes=10, in_channels=1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    write_model_checkpoint(path, model, {"arch": "resnet8", "num_classes": 10, "in_channels": 1, "image_size": 28,
                                         "normalization": {"mean": list(fmt.mean), "std": list(fmt.std)}})
    return path


@pytest.fixture(scope="module")
def study(tmp_path_factory: pytest.TempPathFactory) -> tuple[Study, dict]:
    base = tmp_path_factory.mktemp("cache_dtype")
    write_fashion_mnist(base / "data", 96, 64, seed=5)
    st = Study(data=str(base / "data"), work=str(base / "work"), teacher=str(_teacher(base / "teacher")), seeds=1,
               epochs=1, train_limit=0, eval_limit=64, batch_size=32, modes=("online", "fp32", "fp16"),
               extra=["optim.lr=0.05"])
    return st, run_study(st, log=lambda _: None)


def _weights(st: Study, run: str) -> dict[str, torch.Tensor]:
    return load_file(str(Path(st.work) / "runs" / run / "model.safetensors"))


def _raw_rows(cache: Path) -> dict[str, torch.Tensor]:
    """All rows of a cache, view-major, read with safetensors itself (not the trainer's reader)."""
    manifest = json.loads((cache / "manifest.json").read_text())
    shards = sorted(manifest["shards"].items(), key=lambda kv: (kv[1]["view"], kv[1]["start"]))
    out: dict[str, list[torch.Tensor]] = {"logits": [], "pooled": []}
    for name, _ in shards:
        with safe_open(str(cache / name), framework="pt") as fh:
            for field in out:
                out[field].append(fh.get_tensor(field))
    return {field: torch.cat(parts) for field, parts in out.items()}


def test_fp32_cache_run_has_the_online_run_s_step_losses_exactly(study):
    st, result = study
    online, fp32 = result["runs"]["online"]["0"], result["runs"]["fp32"]["0"]
    assert len(fp32["trace"]["total"]) == 3 and set(fp32["trace"]) == {"total", "ce", "kd"}  # 96 samples / batch 32
    assert online["trace"] == fp32["trace"] and online["top1_by_epoch"] == fp32["top1_by_epoch"]
    assert result["summary"]["divergence"]["online"]["0"]["identical"] is True
    a, b = _weights(st, "seed0-online"), _weights(st, "seed0-fp32")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fp16_cache_run_parts_from_the_first_step_through_the_kd_term_only(study):
    st, result = study
    d = result["summary"]["divergence"]["fp16"]["0"]
    assert not d["identical"] and d["first_diff_step"] == 1
    fp16, fp32 = result["runs"]["fp16"]["0"]["trace"], result["runs"]["fp32"]["0"]["trace"]
    assert fp16["ce"][0] == fp32["ce"][0] and fp16["kd"][0] != fp32["kd"][0]  # same student, rounded targets
    assert d["rel_at"]["1"] == pytest.approx(abs(fp16["total"][0] - fp32["total"][0]) / abs(fp32["total"][0]))
    a, b = _weights(st, "seed0-fp16"), _weights(st, "seed0-fp32")
    assert any(not torch.equal(a[k], b[k]) for k in a)  # the rounded targets moved the student


def test_analysis_matches_an_independent_computation_from_the_shards(study):
    st, result = study
    a = result["analysis"]
    raw32 = _raw_rows(Path(st.work) / "cache" / "seed0-fp32")
    raw16 = _raw_rows(Path(st.work) / "cache" / "seed0-fp16")
    assert raw32["logits"].dtype == torch.float32 and raw16["logits"].dtype == torch.float16
    assert a["views"] == 1 and a["num_samples"] == 96 and raw32["logits"].shape == (96, 10)
    mine = raw32["logits"].half()  # the rounding done here, by torch, from the fp32 shard
    assert torch.equal(mine, raw16["logits"]) and torch.equal(raw32["pooled"].half(), raw16["pooled"])
    e = a["dtypes"]["fp16"]
    assert e["equals_own_rounding"] is True
    assert a["logits"]["abs_max"] == pytest.approx(raw32["logits"].abs().max().item(), rel=1e-6)
    err = (raw16["logits"].double() - raw32["logits"].double()).abs()
    assert e["logits"]["max_abs_err"] == pytest.approx(err.max().item(), rel=1e-6)
    assert e["logits"]["mean_abs_err"] == pytest.approx(err.mean().item(), rel=1e-5)
    nz = raw32["logits"].abs() >= 2.0**-14
    assert e["logits"]["max_rel_err"] == pytest.approx((err[nz] / raw32["logits"].double().abs()[nz]).max().item(), rel=1e-5)
    assert 0 < e["logits"]["max_rel_err"] <= 2.0**-11 and e["logits"]["within_bound"]
    p = torch.softmax(raw32["logits"].double() / 4, 1)
    q = torch.softmax(raw16["logits"].double() / 4, 1)
    assert e["softmax_T4"]["max_abs_dp"] == pytest.approx((p - q).abs().max().item(), rel=1e-6)
    kl = (p * (p.log() - q.log())).sum(1)
    assert e["softmax_T4"]["kl_mean"] == pytest.approx(kl.mean().item(), rel=1e-4, abs=1e-15)
    assert e["softmax_T4"]["kl_max"] == pytest.approx(kl.max().item(), rel=1e-4, abs=1e-15)
    assert set(e["kd"]) == {"fresh", "trained"} and e["kd"]["fresh"]["batches"] == 3


def test_kd_effect_matches_the_closed_form_of_kd_and_its_gradient():
    """KD = T^2/B sum p_t log(p_t/p_s); its gradient w.r.t. the student logits is T/B (p_s - p_t)."""
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 10, generator=g) * 3, torch.randn(16, 10, generator=g) * 8
    t16 = t.half().float()
    got = kd_effect([s], [t], [t16])
    T = 4.0

    def kd(t_: torch.Tensor) -> float:
        pt, ps = torch.softmax(t_.double() / T, 1), torch.softmax(s.double() / T, 1)
        return float((pt * (pt.log() - ps.log())).sum() * T * T / len(s))

    ps = torch.softmax(s.double() / T, 1)
    g32, g16 = ps - torch.softmax(t.double() / T, 1), ps - torch.softmax(t16.double() / T, 1)
    assert got["loss_rel_max"] == pytest.approx(abs(kd(t16) - kd(t)) / kd(t), rel=1e-2)
    assert got["grad_rel_max"] == pytest.approx(float((g16 - g32).norm() / g32.norm()), rel=1e-2)
    assert got["loss_rel_max"] > 0 and got["grad_rel_max"] > 0


def test_divergence_reads_first_step_and_e_folding_time_of_a_growing_difference():
    steps = np.arange(1, 201)
    ref = list(np.full(200, 2.0))
    run = list(2.0 * (1 + 1e-7 * np.exp(steps / 10.0)))  # relative difference 1e-7 e^(k/10): e-folds every 10 steps
    d = divergence(run, ref)
    assert d["first_diff_step"] == 1 and not d["identical"]
    assert d["efold_steps"] == pytest.approx(10.0, rel=1e-3)
    assert d["steps_to_macroscopic"] == math.ceil(10 * math.log(1e-2 / 1e-7))  # 1e-7 e^(k/10) >= 1e-2
    flat = divergence(ref, ref, ref, ref)
    assert flat["identical"] and flat["first_diff_step"] is None and flat["efold_steps"] is None
    assert efolding_steps(np.full(50, 1e-6)) is None  # a constant offset does not grow


@pytest.mark.parametrize("args, message", [
    (["--seeds", "0"], "--seeds: expected a positive integer, got 0"),
    (["--modes", "online,fp8"], "--modes: ['fp8'] not among online, fp32, fp16, bf16, fp32+noise"),
    (["--modes", "online,fp16"], "--modes: must include fp32, the run every other mode is compared with"),
])
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    from rrd_fast.bench.__main__ import main
    from rrd_fast.cli import run_cli

    data = write_fashion_mnist(tmp_path / "data", 8, 8)
    assert run_cli(lambda: main(["cache-dtype", "--data", str(data), "--work", str(tmp_path / "w"), *args])) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {message}"]
    assert not (tmp_path / "w").exists()  # refused before any run
