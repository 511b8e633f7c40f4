"""Fixed inputs and summaries shared by the reference-fixture generators and the loss tests.

The generators (`scripts/reference_fixtures/*.py`) run the reference code (RepDistiller,
mdistiller) on these inputs once and store the results as JSON under
`tests/fixtures/reference/`; the tests run our terms on the same inputs and compare.
Everything here is a pure function of names and seeds, so the two sides need to share
no tensors, only this file.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

FIXTURES = Path(__file__).parent / "fixtures" / "reference"

# Per-sample feature shapes of RepDistiller's feat list (stem, stages..., pooled) at 32x32.
SHAPES: dict[str, list[tuple[int, ...]]] = {
    "resnet8x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    "resnet32x4": [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (256,)],
    "resnet20": [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8), (64,)],
    "wrn_40_2": [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8), (128,)],
}
NUM_CLASSES = 100
BATCH = 4


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def features(arch: str, role: str, batch: int = BATCH, seed: int = 0) -> dict[str, Any]:
    """Float64 features shaped like `arch`'s: {'feat', 'preact', 'logits'} as RepDistiller lists them.

    `feat[1:-1]` are ReLU'd `preact[1:-1]`; feat[0] and feat[-1] are non-negative, as after a ReLU.
    """
    shapes = SHAPES[arch]
    g = _generator(f"{arch}/{role}", seed)
    pre = [torch.randn((batch, *s), generator=g, dtype=torch.float64) for s in shapes]
    feat = [p.clamp_min(0) if i in (0, len(shapes) - 1) else p.relu() for i, p in enumerate(pre)]
    preact = [feat[0], *pre[1:-1], feat[-1]]
    logits = torch.randn((batch, NUM_CLASSES), generator=g, dtype=torch.float64) * 3
    return {"feat": feat, "preact": preact, "logits": logits}


def student_features(arch: str, batch: int = BATCH, seed: int = 0) -> dict[str, Any]:
    """As `features`, each tensor a leaf that requires grad. `preact[i]` and `feat[i]` are separate leaves."""
    out = features(arch, "student", batch, seed)
    leaf = lambda t: t.clone().requires_grad_(True)  # noqa: E731
    return {"feat": [leaf(t) for t in out["feat"]], "preact": [leaf(t) for t in out["preact"]], "logits": leaf(out["logits"])}


def labels(batch: int = BATCH, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, NUM_CLASSES, (batch,), generator=_generator("labels", seed))


def fill_module(module: nn.Module, seed: int = 0, scale: float = 0.1) -> None:
    """Set every parameter and float buffer from a generator keyed by its state_dict name.

    Both sides fill modules whose state_dict keys are equal (after any prefix mapping the
    test states), so this is the same as loading the reference module's state_dict.
    BatchNorm running variances are kept positive and BatchNorm scales near 1.
    """
    with torch.no_grad():
        for key, value in module.state_dict(keep_vars=True).items():
            if not value.dtype.is_floating_point:
                continue
            noise = torch.randn(value.shape, generator=_generator(key, seed), dtype=torch.float64)
            if key.endswith("running_var"):
                noise = noise.abs() + 0.5
            elif key.endswith("weight") and value.dim() == 1:  # BatchNorm scales
                noise = 1.0 + scale * noise
            else:
                noise = scale * noise
            value.copy_(noise.to(value.dtype))


def summarize(t: torch.Tensor, name: str) -> dict[str, float]:
    """Three scalars that pin a tensor: its sum, its L1 norm and its dot with a fixed random tensor."""
    t = t.detach().double()
    probe = torch.randn(t.shape, generator=_generator(f"probe/{name}", 0), dtype=torch.float64)
    return {"sum": float(t.sum()), "abs": float(t.abs().sum()), "dot": float((t * probe).sum())}


def state_shapes(module: nn.Module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def close(ours: float, ref: float, rtol: float = 1e-6, atol: float = 1e-12) -> bool:
    return abs(ours - ref) <= atol + rtol * abs(ref)


def assert_summary_close(ours: dict[str, float], ref: dict[str, float], what: str, rtol: float = 1e-6) -> None:
    for key, value in ref.items():
        assert close(ours[key], value, rtol), f"{what}.{key}: ours {ours[key]!r}, reference {value!r}"


def load_fixture(name: str) -> dict[str, Any]:
    return json.loads((FIXTURES / f"{name}.json").read_text())


def write_fixture(name: str, payload: dict[str, Any]) -> Path:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    path = FIXTURES / f"{name}.json"
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")
    return path


REPDISTILLER = {"repo": "HobbitLong/RepDistiller", "commit": "b84f547c5db6a35318d4671d7d5c4de74c822403"}
MDISTILLER = {"repo": "megvii-research/mdistiller", "commit": "a08d46f10d6102bd6e3f258ca5ac880b020ea259"}


def model_input(batch: int = 2, channels: int = 3, size: int = 32, seed: int = 0) -> torch.Tensor:
    """A fixed float64 image batch for whole-model feature fixtures (N(0, 1), like normalised pixels)."""
    return torch.randn((batch, channels, size, size), generator=_generator("model_input", seed), dtype=torch.float64)
