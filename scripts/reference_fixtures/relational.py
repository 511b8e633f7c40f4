"""Pin CC, RKD, PKT and VID to RepDistiller: run the reference losses on tests/reference_inputs.py's
float64 inputs and write tests/fixtures/reference/{cc,rkd,pkt,vid}.json.

Each method's trainable modules are held in an nn.ModuleDict under the attribute names our term
uses (cc: embed_s, embed_t; vid: heads), so `fill_module` gives both sides the same values and a
reference state_dict loads into ours with the prefix `<name>.`. Losses are combined as
helper/loops.py does (VID: Python sum over the stage pairs), with the teacher's features detached.

    python scripts/reference_fixtures/relational.py [--repdistiller /tmp/ref/RepDistiller]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import reference_inputs as ri  # noqa: E402

PAIRS = [("resnet8x4", "resnet32x4", None), ("resnet20", "wrn_40_2", None)]
# VID only: the teacher's stages reordered so that every stage pair has different heights, in both
# directions (student larger, then smaller), which exercises the reference's pooling branches.
VID_EXTRA = [("resnet8x4", "wrn_40_2", [2, 0, 1])]
FILES = {"cc": ["distiller_zoo/CC.py", "models/util.py"], "rkd": ["distiller_zoo/RKD.py"],
         "pkt": ["distiller_zoo/PKT.py"], "vid": ["distiller_zoo/VID.py"]}
OPTIONS: dict[str, dict[str, Any]] = {"cc": {"feat_dim": 128}, "rkd": {"w_d": 25, "w_a": 50}, "pkt": {},
                                      "vid": {"init_pred_var": 5.0, "eps": 1e-5}}


def builders() -> dict[str, Callable[..., tuple[nn.ModuleDict, Callable[..., torch.Tensor]]]]:
    """Per method: (modules keyed by our attribute names, loss of (modules, student feat, teacher stages, teacher feat))."""
    from distiller_zoo.CC import Correlation
    from distiller_zoo.PKT import PKT
    from distiller_zoo.RKD import RKDLoss
    from distiller_zoo.VID import VIDLoss
    from models.util import LinearEmbed

    def cc(fs, ts):
        mods = nn.ModuleDict({"embed_s": LinearEmbed(fs[-1].shape[1], 128), "embed_t": LinearEmbed(ts[-1].shape[1], 128)})
        return mods, lambda m, fs, tst, ft: Correlation()(m["embed_s"](fs[-1]), m["embed_t"](ft[-1]))

    def rkd(fs, ts):
        return nn.ModuleDict(), lambda m, fs, tst, ft: RKDLoss(w_d=25, w_a=50)(fs[-1], ft[-1])

    def pkt(fs, ts):
        return nn.ModuleDict(), lambda m, fs, tst, ft: PKT()(fs[-1], ft[-1])

    def vid(fs, tst):
        heads = nn.ModuleList([VIDLoss(f.shape[1], t.shape[1], t.shape[1]) for f, t in zip(fs[1:-1], tst)])
        return nn.ModuleDict({"heads": heads}), lambda m, fs, tst, ft: sum(
            [c(f_s, f_t) for f_s, f_t, c in zip(fs[1:-1], tst, m["heads"])])

    return {"cc": cc, "rkd": rkd, "pkt": pkt, "vid": vid}


def run_case(method: str, build: Callable, s_arch: str, t_arch: str, order: list[int] | None) -> dict[str, Any]:
    s = ri.student_features(s_arch)
    feat_t = [f.detach() for f in ri.features(t_arch, "teacher")["feat"]]
    stages_t = feat_t[1:-1] if order is None else [feat_t[1:-1][i] for i in order]
    torch.manual_seed(0)
    modules, loss_fn = build(s["feat"], stages_t if method == "vid" else feat_t)
    init = {k: ri.summarize(v, k) for k, v in modules.state_dict().items()}  # default init under seed 0, float32
    modules.double()
    ri.fill_module(modules)
    loss = loss_fn(modules, s["feat"], stages_t, feat_t)
    loss.backward()
    used = {"pooled": s["feat"][-1]} if method != "vid" else {f"stages.{i}": f for i, f in enumerate(s["feat"][1:-1])}
    grads = {name: ri.summarize(t.grad, name) for name, t in used.items()}
    grads.update({name: ri.summarize(p.grad, name) for name, p in modules.named_parameters()})
    return {"student": s_arch, "teacher": t_arch, "teacher_stage_order": order, "loss": float(loss.detach()), "grads": grads,
            "state_dict": {name: ri.state_shapes(mod) for name, mod in modules.items()}, "init": init}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", default="/tmp/ref/RepDistiller", help="RepDistiller work tree")
    args = parser.parse_args()
    sys.path.insert(0, args.repdistiller)
    for method, build in builders().items():
        cases = PAIRS + (VID_EXTRA if method == "vid" else [])
        payload = {
            "method": method, "reference": {**ri.REPDISTILLER, "file": FILES[method][0], "files": FILES[method],
                                            "combined_as": ["train_student.py", "helper/loops.py"]},
            "inputs": {"batch": ri.BATCH, "seed": 0, "dtype": "float64", "fill_module_seed": 0, "init_seed": 0,
                       "student": "reference_inputs.student_features(student)",
                       "teacher": "reference_inputs.features(teacher, 'teacher'), stages in teacher_stage_order"},
            "options": OPTIONS[method],
            "cases": [run_case(method, build, *case) for case in cases],
        }
        print(ri.write_fixture(method, payload))


if __name__ == "__main__":
    main()
