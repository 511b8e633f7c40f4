"""Pin KD, DKD and RRD to their reference code: run it on tests/reference_inputs.py's float64 inputs
and write tests/fixtures/reference/{kd,dkd,rrd_paper,rrd_2025}.json.

- kd: RepDistiller distiller_zoo/KD.py DistillKL(T=4).
- dkd: mdistiller distillers/DKD.py, the distiller's own forward_train (CE + warmed-up DKD) with
  the defaults of engine/cfg.py (read from its source, as yacs may be absent) and the per-pair
  DKD.BETA of configs/cifar100/dkd/*.yaml; its student and teacher are stand-ins returning fixed logits.
- rrd_*: the RRD authors' RRDLoss (giakoumoglou/distillers) at two commits, materialised with
  `git show` when the work tree is at another one: the July 2024 upload (tau 0.04/0.10, enqueue
  after the loss) and the Feb 2025 rewrite (tau 0.1/0.02, enqueue before). Temperatures are the
  argparse defaults of that commit's train_student.py. Quirk we fix, aligned here: the reference
  queue starts with unit-norm columns, ours with unit-norm rows, so the reference's queue is set to
  our initial queue (rrd_fast.memory.unit_rows, TermContext seed 0) before the first step. Two
  steps (inputs seed 0, then 1, same parameters) pin the enqueue order; B divides K (its assert).

    python scripts/reference_fixtures/logits_and_rrd.py [--repdistiller ...] [--mdistiller ...] [--distillers ...]
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import reference_inputs as ri  # noqa: E402

from rrd_fast.memory import unit_rows  # noqa: E402
from rrd_fast.models import list_models  # noqa: E402

PAIRS = [("resnet8x4", "resnet32x4"), ("resnet20", "wrn_40_2")]  # (student, teacher)
DKD_EPOCHS = [1, 10, 20, 26]  # mdistiller's 1-based epochs = our main-stage epochs 0, 9, 19, 25
DKD_BATCH = 8
RRD = {"batch": 16, "queue_size": 64, "feat_dim": 128, "queue_seed": 0, "step_seeds": [0, 1]}
DISTILLERS = {"repo": "giakoumoglou/distillers"}
RRD_VERSIONS = {  # preset -> (commit, RRD file, train_student.py) in giakoumoglou/distillers
    "paper": ("ee559b33a79e8227b0215cb7da06e67f6dd83aa7", "distillers/RRD.py", "train_student.py"),
    "2025": ("1c0e48db8592a75ab9350d9a67f2e3d92a925197", "cifar/distillers/RRD.py", "cifar/train_student.py"),
}


def kd_fixture(repdistiller: Path) -> dict[str, Any]:
    sys.path.insert(0, str(repdistiller))
    from distiller_zoo.KD import DistillKL

    cases = []
    for s_arch, t_arch in PAIRS:
        y_s = ri.student_features(s_arch)["logits"]
        y_t = ri.features(t_arch, "teacher")["logits"]
        loss = DistillKL(4.0)(y_s, y_t)
        loss.backward()
        cases.append({"student": s_arch, "teacher": t_arch, "loss": float(loss.detach()),
                      "grads": {"logits": ri.summarize(y_s.grad, "logits")}})
    return {"method": "kd", "reference": {**ri.REPDISTILLER, "file": "distiller_zoo/KD.py"}, "options": {"T": 4.0},
            "inputs": {"batch": ri.BATCH, "seed": 0, "dtype": "float64",
                       "student": "student_features(student)['logits']",
                       "teacher": "features(teacher, 'teacher')['logits']"}, "cases": cases}


def _dkd_defaults(mdistiller: Path) -> dict[str, float]:
    """CFG.DKD.* = <number> assignments of engine/cfg.py."""
    out = {}
    for node in ast.walk(ast.parse((mdistiller / "mdistiller/engine/cfg.py").read_text())):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            name = ast.unparse(node.targets[0])
            if name.startswith("CFG.DKD."):
                out[name.removeprefix("CFG.DKD.")] = node.value.value
    return out


class _Fixed(nn.Module):
    """Stand-in network: returns the given logits, as mdistiller models return (logits, feats)."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, dict]:
        return self.logits, {}


def dkd_fixture(mdistiller: Path) -> dict[str, Any]:
    pkg = types.ModuleType("mdistiller.distillers")  # its __init__ imports every distiller (OFD needs scipy)
    pkg.__path__ = [str(mdistiller / "mdistiller/distillers")]
    sys.path.insert(0, str(mdistiller))
    sys.modules["mdistiller.distillers"] = pkg
    DKD = importlib.import_module("mdistiller.distillers.DKD").DKD
    defaults = _dkd_defaults(mdistiller)
    pair_betas = []
    for path in sorted((mdistiller / "configs/cifar100/dkd").glob("*.yaml")):
        cfg = yaml.safe_load(path.read_text())
        teacher, student = cfg["DISTILLER"]["TEACHER"], cfg["DISTILLER"]["STUDENT"]
        assert {teacher, student} <= set(list_models()), (path, teacher, student)
        beta = (cfg.get("DKD") or {}).get("BETA", defaults["BETA"])
        pair_betas.append({"teacher": teacher, "student": student, "beta": float(beta),
                           "file": f"configs/cifar100/dkd/{path.name}",
                           "set_in_file": "BETA" in (cfg.get("DKD") or {})})
    cases = []
    for s_arch, t_arch in PAIRS:
        for beta, epochs in ((None, DKD_EPOCHS), (2.0, [5])):
            for epoch in epochs:
                y_s = ri.student_features(s_arch, DKD_BATCH)["logits"]
                y_t = ri.features(t_arch, "teacher", DKD_BATCH)["logits"]
                target = ri.labels(DKD_BATCH)
                dkd_cfg = types.SimpleNamespace(**{**defaults, **({} if beta is None else {"BETA": beta})})
                distiller = DKD(_Fixed(y_s), _Fixed(y_t), types.SimpleNamespace(DKD=dkd_cfg)).train()
                _, losses = distiller(image=torch.zeros(DKD_BATCH, 1), target=target, epoch=epoch)
                (grad,) = torch.autograd.grad(losses["loss_kd"], y_s)
                cases.append({"student": s_arch, "teacher": t_arch, "mdistiller_epoch": epoch, "main_epoch": epoch - 1,
                              "options": {} if beta is None else {"beta": beta}, "loss_ce": float(losses["loss_ce"]),
                              "loss_dkd": float(losses["loss_kd"]), "grads": {"logits": ri.summarize(grad, "logits")}})
    return {"method": "dkd", "reference": {**ri.MDISTILLER, "file": "mdistiller/distillers/DKD.py",
                                           "files": ["mdistiller/distillers/DKD.py", "mdistiller/engine/cfg.py"]},
            "defaults": defaults, "pair_betas": pair_betas,
            "inputs": {"batch": DKD_BATCH, "seed": 0, "dtype": "float64", "labels": "labels(batch)",
                       "student": "student_features(student, batch)['logits']",
                       "teacher": "features(teacher, 'teacher', batch)['logits']"}, "cases": cases}


def _git(git_dir: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(git_dir), *args], check=True, capture_output=True, text=True).stdout


def _materialise(tree: Path, git_dir: Path, commit: str, path: str, tmp: Path) -> Path:
    """The file as of `commit`: the work tree's if it is that blob, else written out with `git show`."""
    local = tree / path
    wanted = _git(git_dir, "rev-parse", f"{commit}:{path}").strip()
    if local.exists() and _git(git_dir, "hash-object", str(local)).strip() == wanted:
        return local
    out = tmp / commit / path
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(_git(git_dir, "show", f"{commit}:{path}"))
    return out


def rrd_fixture(preset: str, tree: Path, git_dir: Path, tmp: Path) -> dict[str, Any]:
    commit, rrd_path, train_path = RRD_VERSIONS[preset]
    source = _materialise(tree, git_dir, commit, rrd_path, tmp)
    spec = importlib.util.spec_from_file_location(f"ref_rrd_{preset}", source)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    train = _materialise(tree, git_dir, commit, train_path, tmp).read_text()
    taus = {k: float(re.search(rf"'--{k}', default=([0-9.]+)", train).group(1)) for k in ("nce_t_s", "nce_t_t")}
    b, k, d = RRD["batch"], RRD["queue_size"], RRD["feat_dim"]
    cases = []
    for s_arch, t_arch in PAIRS:
        s_dim, t_dim = ri.SHAPES[s_arch][-1][0], ri.SHAPES[t_arch][-1][0]
        opt = types.SimpleNamespace(s_dim=s_dim, t_dim=t_dim, feat_dim=d, nce_k=k, memory_type="fifo", **taus)
        ref = module.RRDLoss(opt).double()
        ours = nn.ModuleDict({"embed_s": nn.Linear(s_dim, d), "embed_t": nn.Linear(t_dim, d)}).double()
        ri.fill_module(ours)
        state = {key: ours.state_dict()[key.replace(".linear.", ".").replace("memory.", "")]
                 for key in ref.state_dict() if "embed" in key}
        ref.load_state_dict({**ref.state_dict(), **state})
        queue = unit_rows(RRD["queue_seed"], 0, k, d).double()
        with torch.no_grad():
            (ref.memory if hasattr(ref, "memory") else ref).queue.copy_(queue)
        steps = []
        for seed in RRD["step_seeds"]:
            h_s = ri.student_features(s_arch, b, seed)["feat"][-1]
            h_t = ri.features(t_arch, "teacher", b, seed)["feat"][-1]
            loss = ref(h_s, h_t)
            params = dict(ref.embed_s.named_parameters())
            grads = torch.autograd.grad(loss, [h_s, *params.values()])
            memory = ref.memory if hasattr(ref, "memory") else ref
            steps.append({"seed": seed, "loss": float(loss.detach()),
                          "grads": {"pooled": ri.summarize(grads[0], "pooled"),
                                    **{f"embed_s.{n.split('.')[-1]}": ri.summarize(g, f"embed_s.{n.split('.')[-1]}")
                                       for n, g in zip(params, grads[1:])}},
                          "queue": ri.summarize(memory.queue, "queue"), "ptr": int(memory.queue_ptr)})
        cases.append({"student": s_arch, "teacher": t_arch, "queue_init": ri.summarize(queue, "queue"), "steps": steps,
                      "state_dict": ri.state_shapes(ref)})
    return {"method": "rrd", "preset": preset,
            "reference": {**DISTILLERS, "commit": commit, "file": rrd_path, "files": [rrd_path, train_path]},
            "reference_defaults": taus, "options": {"queue_size": k, "feat_dim": d},
            "inputs": {**RRD, "dtype": "float64", "student": "student_features(student, batch, seed)['feat'][-1]",
                       "teacher": "features(teacher, 'teacher', batch, seed)['feat'][-1]",
                       "params": "fill_module(ModuleDict(embed_s=Linear, embed_t=Linear)); reference keys "
                                 "embed_*.linear.* (2024) / memory.embed_* (2025) map to ours",
                       "queue": "rrd_fast.memory.unit_rows(queue_seed, 0, queue_size, feat_dim), float64"},
            "cases": cases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", type=Path, default=Path("/tmp/ref/RepDistiller"))
    parser.add_argument("--mdistiller", type=Path, default=Path("/tmp/ref/mdistiller"))
    parser.add_argument("--distillers", type=Path, default=Path("/tmp/ref/distillers"), help="work tree")
    parser.add_argument("--distillers-git", type=Path, default=Path("/work/.mirror/giakoumoglou+distillers/repo"))
    parser.add_argument("--rrd-paper-commit", default=RRD_VERSIONS["paper"][0])
    parser.add_argument("--rrd-2025-commit", default=RRD_VERSIONS["2025"][0])
    args = parser.parse_args()
    for preset, commit in (("paper", args.rrd_paper_commit), ("2025", args.rrd_2025_commit)):
        RRD_VERSIONS[preset] = (commit, *RRD_VERSIONS[preset][1:])
    print(ri.write_fixture("kd", kd_fixture(args.repdistiller)))
    print(ri.write_fixture("dkd", dkd_fixture(args.mdistiller)))
    with tempfile.TemporaryDirectory() as tmp:
        for preset in RRD_VERSIONS:
            payload = rrd_fixture(preset, args.distillers, args.distillers_git, Path(tmp))
            print(ri.write_fixture(f"rrd_{preset}", payload))


if __name__ == "__main__":
    main()
