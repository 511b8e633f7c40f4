"""Pin FitNet, AT, SP and NST to RepDistiller: run the reference modules on tests/reference_inputs.py's
float64 inputs and write tests/fixtures/reference/{fitnet,at,sp,nst}.json.

Each case names a student/teacher pair and, optionally, `transforms` applied to single entries
of the feature lists before they become leaves (`pool2`: 2x2 average pooling, `crop12`: the
top-left 12x12, `drop`: removed from the list); the tests apply the same ones. They give the
spatial mismatches (and, for AT/NST, unequal stage counts) that the reference's pooling, zip
and ConvReg branches handle. Losses are combined as helper/loops.py does (Python sum over the
groups), with the teacher's features detached. FitNet's ConvReg is held in an nn.ModuleDict
under `regressor`, our term's attribute, built under seed 0 (its default init is pinned), then
cast to float64, filled with reference_inputs.fill_module and run in train mode (module_list.train()).
FitNet's `refusals` record how the reference fails on shapes it cannot handle.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/reference_fixtures/simple_features.py [--repdistiller DIR]
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
import reference_inputs as ri  # noqa: E402

PAIRS = [("resnet8x4", "resnet32x4"), ("resnet20", "wrn_40_2")]
R20_W40 = ("resnet20", "wrn_40_2")
GROUP_CASES = [  # AT, NST (and SP, which ignores the stage count): both pooling branches, then zip's cut
    (*R20_W40, {"student": {"2": "pool2"}, "teacher": {"3": "pool2"}}),
    (*R20_W40, {"student": {"3": "drop"}}),
]
FITNET_CASES = [  # (student, teacher, hint_layer, transforms): every ConvReg branch
    (*PAIRS[0], 2, {}), (*PAIRS[1], 2, {}), (*PAIRS[1], 0, {}), (*PAIRS[0], 3, {}),
    (*R20_W40, 2, {"student": {"2": "pool2"}}),   # teacher twice the student: ConvTranspose2d
    (*R20_W40, 2, {"teacher": {"2": "pool2"}}),   # student twice the teacher: stride-2 conv
    (*R20_W40, 2, {"teacher": {"2": "crop12"}}),  # student larger by 4: 5x5 valid conv
]
FITNET_REFUSALS = [  # (student shape, teacher shape) at the hint layer, per sample
    ((16, 8, 8), (32, 32, 32)),     # teacher larger, 4x
    ((32, 12, 12), (64, 16, 16)),   # teacher larger, not 2x
    ((64,), (128,)),                # a pooled vector (hint_layer = last index)
    ((16, 16, 16), (32, 8, 4)),     # heights 2x, widths not: the conv gives 8 x 8
]
GROUP_REFUSALS = [((16, 8, 8), (32, 8, 4))]  # AT/NST: one stage pair, equal heights, unequal widths
FILES = {"fitnet": ["distiller_zoo/FitNet.py", "models/util.py"], "at": ["distiller_zoo/AT.py"],
         "sp": ["distiller_zoo/SP.py"], "nst": ["distiller_zoo/NST.py"]}
COMBINED_AS = ["train_student.py", "helper/loops.py"]


def transform(feats: list[torch.Tensor], ops: dict[str, str]) -> list[torch.Tensor]:
    """Apply `ops` ({feat index: op}) to a feature list; the tests use the same definition."""
    out: list[torch.Tensor | None] = list(feats)
    for index, op in ops.items():
        f = feats[int(index)]
        out[int(index)] = {"pool2": lambda: F.avg_pool2d(f, 2), "crop12": lambda: f[..., :12, :12].contiguous(),
                           "drop": lambda: None}[op]()
    return [f for f in out if f is not None]


def inputs(s_arch: str, t_arch: str, transforms: dict[str, dict[str, str]]) -> tuple[list[torch.Tensor], ...]:
    s = transform([f.detach() for f in ri.student_features(s_arch)["feat"]], transforms.get("student", {}))
    t = transform(ri.features(t_arch, "teacher")["feat"], transforms.get("teacher", {}))
    return [f.clone().requires_grad_(True) for f in s], [f.detach() for f in t]


def student_grads(feat_s: list[torch.Tensor]) -> dict[str, Any]:
    named = {"stem": feat_s[0], "pooled": feat_s[-1], **{f"stages.{i}": f for i, f in enumerate(feat_s[1:-1])}}
    return {k: None if t.grad is None else ri.summarize(t.grad, k) for k, t in named.items()}


def group_losses() -> dict[str, Callable[[list[torch.Tensor], list[torch.Tensor]], torch.Tensor]]:
    """loops.py: attention and nst read feat[1:-1], similarity [feat[-2]]; loss_kd = sum(loss_group)."""
    from distiller_zoo.AT import Attention
    from distiller_zoo.NST import NSTLoss
    from distiller_zoo.SP import Similarity

    return {"at": lambda fs, ft: sum(Attention(p=2)(fs[1:-1], ft[1:-1])),
            "sp": lambda fs, ft: sum(Similarity()([fs[-2]], [ft[-2]])),
            "nst": lambda fs, ft: sum(NSTLoss()(fs[1:-1], ft[1:-1]))}


def group_case(method: str, s_arch: str, t_arch: str, transforms: dict[str, dict[str, str]]) -> dict[str, Any]:
    feat_s, feat_t = inputs(s_arch, t_arch, transforms)
    loss = group_losses()[method](feat_s, feat_t)
    loss.backward()
    return {"student": s_arch, "teacher": t_arch, "transforms": transforms, "loss": float(loss.detach().sum()),
            "loss_shape": list(loss.shape), "grads": {"student": student_grads(feat_s), "modules": {}}}


def fitnet_case(s_arch: str, t_arch: str, hint: int, transforms: dict[str, dict[str, str]]) -> dict[str, Any]:
    from distiller_zoo.FitNet import HintLoss
    from models.util import ConvReg

    feat_s, feat_t = inputs(s_arch, t_arch, transforms)
    torch.manual_seed(0)  # train_student.py builds ConvReg from the batch-2 dummy forward's shapes
    modules = nn.ModuleDict({"regressor": ConvReg((2, *feat_s[hint].shape[1:]), (2, *feat_t[hint].shape[1:]))})
    init = {k: ri.summarize(v, k) for k, v in modules.state_dict().items()}
    modules.double()
    ri.fill_module(modules)
    modules.train()
    loss = HintLoss()(modules["regressor"](feat_s[hint]), feat_t[hint])
    loss.backward()
    grads = {k: ri.summarize(p.grad, k) for k, p in modules.named_parameters()}
    return {"student": s_arch, "teacher": t_arch, "transforms": transforms, "options": {"hint_layer": hint},
            "conv": type(modules["regressor"].conv).__name__, "loss": float(loss.detach()),
            "loss_shape": list(loss.shape),
            "grads": {"student": student_grads(feat_s), "modules": grads},
            "state_dict": {"regressor": ri.state_shapes(modules["regressor"])}, "init": init}


def fitnet_refusal(s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> dict[str, Any]:
    """The reference's failure: building ConvReg, or (widths) the MSE of its output against the teacher's."""
    from distiller_zoo.FitNet import HintLoss
    from models.util import ConvReg

    def run() -> None:
        reg = ConvReg((2, *s_shape), (2, *t_shape)).double()
        HintLoss()(reg(torch.ones(2, *s_shape, dtype=torch.float64)), torch.ones(2, *t_shape, dtype=torch.float64))

    return refusal(run, s_shape, t_shape)


def refusal(run: Callable[[], Any], s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> dict[str, Any]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MSELoss warns before it fails to broadcast
            run()
    except Exception as exc:  # noqa: BLE001 - recorded, not handled
        return {"student_shape": list(s_shape), "teacher_shape": list(t_shape),
                "reference_error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    raise AssertionError(f"the reference accepted {s_shape} -> {t_shape}")


def group_refusal(method: str, s_shape: tuple[int, ...], t_shape: tuple[int, ...]) -> dict[str, Any]:
    """The reference's failure on one stage pair (between a stem and a pooled vector) it cannot compare."""
    fs = [torch.ones(2, 8, 32, 32), torch.ones(2, *s_shape), torch.ones(2, 64)]
    ft = [torch.ones(2, 8, 32, 32), torch.ones(2, *t_shape), torch.ones(2, 64)]
    return refusal(lambda: group_losses()[method](fs, ft), s_shape, t_shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", default="/tmp/ref/RepDistiller", help="RepDistiller work tree")
    args = parser.parse_args()
    sys.path.insert(0, args.repdistiller)
    for method, files in FILES.items():
        payload: dict[str, Any] = {
            "method": method,
            "reference": {**ri.REPDISTILLER, "file": files[0], "files": files, "combined_as": COMBINED_AS},
            "inputs": {"batch": ri.BATCH, "seed": 0, "dtype": "float64", "fill_module_seed": 0, "init_seed": 0,
                       "student": "reference_inputs.student_features(student)['feat'], transformed, as leaves",
                       "teacher": "reference_inputs.features(teacher, 'teacher')['feat'], transformed, detached"},
        }
        if method == "fitnet":
            payload["cases"] = [fitnet_case(*case) for case in FITNET_CASES]
            payload["refusals"] = [fitnet_refusal(*case) for case in FITNET_REFUSALS]
        else:
            payload["cases"] = [group_case(method, s, t, {}) for s, t in PAIRS]
            payload["cases"] += [group_case(method, *case) for case in GROUP_CASES]
            if method != "sp":
                payload["refusals"] = [group_refusal(method, *case) for case in GROUP_REFUSALS]
        print(ri.write_fixture(method, payload))


if __name__ == "__main__":
    main()
