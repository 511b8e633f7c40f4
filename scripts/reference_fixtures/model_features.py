"""Pin every zoo model's feature list to RepDistiller's `model(x, is_feat=True, preact=...)`.

Builds each reference model (models/__init__.py model_dict: 100 classes, 3x32x32 inputs),
casts it to float64, fills its state_dict with tests/reference_inputs.fill_module (seed 0;
the keys equal ours, so this is the same as loading one checkpoint into both), and runs it
once in eval mode with preact=False and once with preact=True on
tests/reference_inputs.model_input(). Writes tests/fixtures/reference/model_features.json:
per model the reference file, the shape and summary of every feature (and the logits), the
modules get_feat_modules() returns (attribute name, type, full state_dict keys, parameter
count) and a checksum of the whole state_dict layout. Usage:

    OMP_NUM_THREADS=1 .venv/bin/python scripts/reference_fixtures/model_features.py [--repdistiller DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from reference_inputs import REPDISTILLER, fill_module, model_input, summarize, write_fixture  # noqa: E402

SEED = 0
BATCH = 2
SIZE = 32
NUM_CLASSES = 100


def layout_crc(model: nn.Module) -> int:
    """Checksum of the state_dict's keys and shapes, in order (strict-load compatibility)."""
    text = "\n".join(f"{k}:{tuple(v.shape)}" for k, v in model.state_dict().items())
    return zlib.crc32(text.encode())


def feat_modules(model: nn.Module) -> list[dict[str, Any]]:
    """get_feat_modules() as attribute names in the model, with their full state_dict keys."""
    names = {id(m): n for n, m in model.named_modules()}
    out = []
    for m in model.get_feat_modules():
        name = names[id(m)]
        out.append({"name": name, "type": type(m).__name__,
                    "keys": [f"{name}.{k}" for k in m.state_dict()],
                    "params": sum(p.numel() for p in m.parameters())})
    return out


def features(feats: list[torch.Tensor]) -> list[dict[str, Any]]:
    return [{"shape": list(f.shape), "summary": summarize(f, f"feat.{i}")} for i, f in enumerate(feats)]


def run(name: str, build: Any) -> dict[str, Any]:
    with contextlib.redirect_stdout(io.StringIO()):  # mobile_half prints its settings
        model = build(num_classes=NUM_CLASSES)
    model.double()
    fill_module(model, SEED)
    model.eval()
    x = model_input(BATCH, 3, SIZE, SEED)
    with torch.no_grad():
        feat, logits = model(x, is_feat=True, preact=False)
        pre, logits_pre = model(x, is_feat=True, preact=True)
    assert torch.equal(logits, logits_pre), name
    return {"file": type(model).__module__.replace(".", "/") + ".py",
            "feat": features(feat), "preact": features(pre), "logits": summarize(logits, "logits"),
            "feat_modules": feat_modules(model),
            "state_keys": len(model.state_dict()), "state_crc": layout_crc(model)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repdistiller", default="/tmp/ref/RepDistiller", help="RepDistiller work tree")
    args = parser.parse_args()
    sys.path.insert(0, args.repdistiller)
    from models import model_dict

    torch.set_num_threads(1)
    payload = {"reference": {**REPDISTILLER, "files": ["models/__init__.py (model_dict)", "models/*.py"]},
               "inputs": {"module": "tests/reference_inputs.py", "input": "model_input", "batch": BATCH,
                          "size": SIZE, "seed": SEED, "fill_seed": SEED, "num_classes": NUM_CLASSES,
                          "dtype": "float64", "order": "model.double(), then fill_module, then eval()",
                          "summary_names": "feat.{i} (both preact settings), logits"},
               "models": {name: run(name, build) for name, build in sorted(model_dict.items())}}
    print(write_fixture("model_features", payload))


if __name__ == "__main__":
    main()
