"""Pin CRD to RepDistiller's crd/criterion.py CRDLoss (with crd/memory.py ContrastMemory): run it in
float64 over two consecutive steps and write tests/fixtures/reference/crd.json.

Aligned with ours before the first step, since both are free choices of an implementation and not
the method: the reference's banks (memory_v1: student, memory_v2: teacher) are set to our initial
rows (rrd_fast.memory.contrast.ContrastMemory.initial_rows, seed 0; the reference draws them
from torch's global RNG), and the reference is fed the negatives our NegativeSampler draws (its
contrast_idx argument; its own data loader draws them with numpy). Its `params` buffer is set to
exact float64 values (it is created in float32, which rounds T = 0.07). The embeddings are filled
with reference_inputs.fill_module under the keys embed_s.*, embed_t.* that both sides use.

Two steps with the same parameters (inputs seed 0, then 1; the second batch shares four samples
with the first): step 0 sets Z from its own scores, step 1 uses that Z and the banks the momentum
update left. After each step the loss, the gradients w.r.t. the student's pooled features and all
four embedding parameters, Z and both banks are summarised. ContrastMemory's constructor moves its
(unused here) alias sampler to CUDA; that call is made a no-op so the reference runs on CPU.

    python scripts/reference_fixtures/crd.py [--repdistiller /tmp/ref/RepDistiller]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))
import reference_inputs as ri  # noqa: E402

from rrd_fast.memory.contrast import ContrastMemory  # noqa: E402
from rrd_fast.memory.momentum import NegativeSampler  # noqa: E402

PAIRS = [("resnet8x4", "resnet32x4"), ("resnet20", "wrn_40_2")]  # (student, teacher): pooled 256/256, 64/128
SETUP = {"num_samples": 64, "num_classes": 10, "batch": 8, "seed": 0, "step_seeds": [0, 1],
         "options": {"feat_dim": 128, "nce_k": 16, "nce_t": 0.07, "nce_m": 0.5}}


def train_labels() -> list[int]:
    return [(7 * i + 3) % SETUP["num_classes"] for i in range(SETUP["num_samples"])]


def step_indices() -> list[list[int]]:
    """Sample indices of the two steps: a fixed permutation's [0, 8) and [4, 12)."""
    perm = torch.randperm(SETUP["num_samples"], generator=torch.Generator().manual_seed(1234)).tolist()
    return [perm[0:8], perm[4:12]]


def run_case(s_arch: str, t_arch: str) -> dict[str, Any]:
    from crd.criterion import CRDLoss

    o, n, seed = SETUP["options"], SETUP["num_samples"], SETUP["seed"]
    s_dim, t_dim = ri.SHAPES[s_arch][-1][0], ri.SHAPES[t_arch][-1][0]
    opt = SimpleNamespace(s_dim=s_dim, t_dim=t_dim, feat_dim=o["feat_dim"], nce_k=o["nce_k"], nce_t=o["nce_t"],
                          nce_m=o["nce_m"], n_data=n)
    torch.manual_seed(0)
    crd = CRDLoss(opt).double()
    embeds = nn.ModuleDict({"embed_s": crd.embed_s, "embed_t": crd.embed_t})
    ri.fill_module(embeds)
    memory = crd.contrast
    with torch.no_grad():
        memory.memory_v1.copy_(ContrastMemory.initial_rows(seed, 0, n, o["feat_dim"], stream=1))
        memory.memory_v2.copy_(ContrastMemory.initial_rows(seed, 0, n, o["feat_dim"], stream=2))
    memory.params = torch.tensor([o["nce_k"], o["nce_t"], -1.0, -1.0, o["nce_m"]], dtype=torch.float64)
    banks = {"bank_s": lambda: memory.memory_v1, "bank_t": lambda: memory.memory_v2}
    init = {name: ri.summarize(get(), name) for name, get in banks.items()}
    sampler = NegativeSampler(train_labels(), o["nce_k"], seed)
    steps = []
    for draw, (step_seed, index) in enumerate(zip(SETUP["step_seeds"], step_indices())):
        f_s = ri.student_features(s_arch, batch=SETUP["batch"], seed=step_seed)["feat"][-1]
        f_t = ri.features(t_arch, "teacher", batch=SETUP["batch"], seed=step_seed)["feat"][-1].detach()
        idx = torch.tensor(index)
        contrast_idx = sampler.draw(idx, draw)
        crd.zero_grad(set_to_none=True)
        loss = crd(f_s, f_t, idx, contrast_idx)
        loss.backward()
        grads = {"pooled": ri.summarize(f_s.grad, "pooled")}
        grads.update({name: ri.summarize(p.grad, name) for name, p in embeds.named_parameters()})
        steps.append({"input_seed": step_seed, "index": index, "contrast_idx": contrast_idx.tolist(),
                      "loss": float(loss.detach().reshape(())), "grads": grads,
                      "z": memory.params.detach()[2:4].tolist(),
                      "banks": {name: ri.summarize(get(), name) for name, get in banks.items()}})
    return {"student": s_arch, "teacher": t_arch, "banks_init": init, "steps": steps,
            "state_dict": {name: ri.state_shapes(mod) for name, mod in embeds.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", default="/tmp/ref/RepDistiller", help="RepDistiller work tree")
    args = parser.parse_args()
    sys.path.insert(0, args.repdistiller)
    import crd.memory

    crd.memory.AliasMethod.cuda = lambda self: None  # CPU only; the alias sampler is never drawn from here
    payload = {
        "method": "crd",
        "reference": {**ri.REPDISTILLER, "file": "crd/criterion.py", "files": ["crd/criterion.py", "crd/memory.py"],
                      "combined_as": ["train_student.py", "helper/loops.py"]},
        "inputs": {**SETUP, "dtype": "float64", "fill_module_seed": 0, "train_labels": train_labels(),
                   "student": "reference_inputs.student_features(student, batch, input_seed)['feat'][-1]",
                   "teacher": "reference_inputs.features(teacher, 'teacher', batch, input_seed)['feat'][-1]",
                   "banks": "ContrastMemory.initial_rows(seed, 0, N, feat_dim, stream 1: student, 2: teacher)",
                   "negatives": "NegativeSampler(train_labels, nce_k, seed).draw(index, step)"},
        "cases": [run_case(*pair) for pair in PAIRS],
    }
    print(ri.write_fixture("crd", payload))


if __name__ == "__main__":
    main()
