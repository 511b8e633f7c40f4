"""Pin RepDistiller's two-stage baselines (AB, FT, FSP) on the shared inputs of tests/reference_inputs.py.

Runs the reference modules (models/util.py Connector, Paraphraser, Translator; distiller_zoo
AB.py, FT.py, FSP.py) in float64, in the modes helper/pretrain.py and helper/loops.py put them
in, and writes tests/fixtures/reference/{ab,ft,fsp}.json: each stage's loss, summaries of the
gradients w.r.t. every student input and every parameter the stage trains, and the reference
modules' state_dict shapes. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/reference_fixtures/two_stage.py [--repdistiller DIR]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference_inputs import (BATCH, REPDISTILLER, SHAPES, features, fill_module, state_shapes,  # noqa: E402
                              student_features, summarize, write_fixture)

PAIRS = [("resnet8x4", "resnet32x4"), ("resnet20", "wrn_40_2")]
SEED = 0


def student_leaves(s: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The student's inputs under the names of ModelOutput's fields."""
    feat, preact = s["feat"], s["preact"]
    named = {"stem": feat[0], "pooled": feat[-1], "logits": s["logits"]}
    named.update({f"stages.{i}": f for i, f in enumerate(feat[1:-1])})
    named.update({f"pre_relu.{i}": f for i, f in enumerate(preact[1:-1])})
    return named


def grads(leaves: dict[str, torch.Tensor], modules: dict[str, nn.Module]) -> dict[str, Any]:
    out: dict[str, Any] = {f"student.{k}": None if t.grad is None else summarize(t.grad, f"student.{k}")
                           for k, t in leaves.items()}
    for prefix, module in modules.items():
        for key, p in module.named_parameters():
            out[f"{prefix}.{key}"] = summarize(p.grad, f"{prefix}.{key}")
    return out


def batched(shapes: list[tuple[int, ...]]) -> list[torch.Size]:
    return [torch.Size((BATCH, *shape)) for shape in shapes]


def prepare(module: nn.Module) -> nn.Module:
    module.double()
    fill_module(module, SEED)
    return module


def ab_pair(student: str, teacher: str) -> dict[str, Any]:
    from distiller_zoo.AB import ABLoss
    from models.util import Connector

    s, t = student_features(student, seed=SEED), features(teacher, "teacher", seed=SEED)
    connector = prepare(Connector(batched(SHAPES[student][1:-1]), batched(SHAPES[teacher][1:-1]))).train()
    loss = sum(ABLoss(len(s["preact"][1:-1]))(connector(s["preact"][1:-1]), t["preact"][1:-1]))
    loss.backward()
    return {"state_shapes": {"connector": state_shapes(connector)},
            "init": {"loss": loss.item(), "grads": grads(student_leaves(s), {"connector": connector})}}


def ft_pair(student: str, teacher: str) -> dict[str, Any]:
    from distiller_zoo.FT import FactorTransfer
    from models.util import Paraphraser, Translator

    s, t = student_features(student, seed=SEED), features(teacher, "teacher", seed=SEED)
    s_shape, t_shape = batched(SHAPES[student])[-2], batched(SHAPES[teacher])[-2]
    paraphraser, translator = prepare(Paraphraser(t_shape)), prepare(Translator(s_shape, t_shape))
    paraphraser.train()  # pretrain.py: init_modules.train()
    _, rec = paraphraser(t["feat"][-2])
    init_loss = nn.MSELoss()(rec, t["feat"][-2])
    init_loss.backward()
    init_grads = grads({}, {"paraphraser": paraphraser})
    translator.train()
    paraphraser.eval()  # loops.py: module_list[2].eval()
    main_loss = FactorTransfer()(translator(s["feat"][-2]), paraphraser(t["feat"][-2], is_factor=True))
    main_loss.backward()
    return {"state_shapes": {"paraphraser": state_shapes(paraphraser), "translator": state_shapes(translator)},
            "init": {"loss": init_loss.item(), "grads": init_grads},
            "main": {"loss": main_loss.item(), "grads": grads(student_leaves(s), {"translator": translator})}}


def fsp_pair(student: str, teacher: str) -> dict[str, Any]:
    from distiller_zoo.FSP import FSP

    try:
        criterion = FSP(batched(SHAPES[student][:-1]), batched(SHAPES[teacher][:-1]))
    except ValueError as exc:
        return {"reference_error": str(exc)}
    s, t = student_features(student, seed=SEED), features(teacher, "teacher", seed=SEED)
    loss = sum(criterion(s["feat"][:-1], t["feat"][:-1]))
    loss.backward()
    return {"state_shapes": {}, "init": {"loss": loss.item(), "grads": grads(student_leaves(s), {})}}


METHODS = {
    "ab": (ab_pair, ["distiller_zoo/AB.py", "models/util.py", "helper/pretrain.py", "train_student.py"]),
    "ft": (ft_pair, ["distiller_zoo/FT.py", "models/util.py", "helper/pretrain.py", "helper/loops.py",
                     "train_student.py"]),
    "fsp": (fsp_pair, ["distiller_zoo/FSP.py", "helper/pretrain.py", "train_student.py"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", default="/tmp/ref/RepDistiller", help="RepDistiller work tree")
    args = parser.parse_args()
    sys.path.insert(0, args.repdistiller)
    for method, (run, files) in METHODS.items():
        payload = {"reference": {**REPDISTILLER, "files": files},
                   "inputs": {"module": "tests/reference_inputs.py", "batch": BATCH, "seed": SEED, "fill_seed": SEED,
                              "dtype": "float64"},
                   "pairs": {f"{s}/{t}": {"student": s, "teacher": t, **run(s, t)} for s, t in PAIRS}}
        print(write_fixture(method, payload))


if __name__ == "__main__":
    main()
