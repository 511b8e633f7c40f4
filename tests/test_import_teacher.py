"""Importing RepDistiller teachers: strict names, weights-only reads, one-line errors."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rrd_fast.checkpoint import CheckpointError, read_model_checkpoint
from rrd_fast.models import create_model

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "rrd_fast.import_teacher", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_import_repdistiller_checkpoint(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = create_model("resnet8x4", num_classes=100)
    pth = tmp_path / "ckpt_epoch_240.pth"
    torch.save({"model": model.state_dict(), "epoch": 240}, pth)
    proc = _run(str(pth), "--arch", "resnet8x4", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    meta = json.loads((tmp_path / "out" / "model.json").read_text())
    assert meta["arch"] == "resnet8x4" and meta["num_classes"] == 100
    assert meta["normalization"]["mean"] == pytest.approx([0.5071, 0.4867, 0.4408])
    weights = load_file(str(tmp_path / "out" / "model.safetensors"))
    for key, value in model.state_dict().items():
        assert torch.equal(weights[key], value), key
    loaded, _ = read_model_checkpoint(tmp_path / "out")
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(loaded(x), model(x))


def test_import_refuses_wrong_architecture(tmp_path: Path) -> None:
    pth = tmp_path / "ckpt.pth"
    torch.save({"model": create_model("resnet20", num_classes=100).state_dict()}, pth)
    proc = _run(str(pth), "--arch", "resnet8x4", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1 and str(pth) in proc.stderr
    assert not (tmp_path / "out").exists()


class _Boom:
    def __reduce__(self):  # executed by an unrestricted unpickler
        return (os.system, (f"touch {self.marker}",))


def test_import_never_runs_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    boom = _Boom()
    boom.marker = marker
    pth = tmp_path / "evil.pth"
    torch.save({"model": {"conv1.weight": torch.zeros(1)}, "payload": boom}, pth, pickle_protocol=2)
    proc = _run(str(pth), "--arch", "resnet8x4", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2 and "weights-only" in proc.stderr
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError):
        torch.load(pth, weights_only=True)


@pytest.mark.parametrize("content,needle", [(b"{not json", "not valid JSON"), (b"\xff\xfe\x00", "not valid JSON"),
                                            (b"[1, 2]", "expected a JSON object, found list")])
def test_unreadable_model_sidecar_is_one_line(tmp_path: Path, content: bytes, needle: str) -> None:
    (tmp_path / "model.json").write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_model_checkpoint(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'model.json'}: {needle}") and "\n" not in message
