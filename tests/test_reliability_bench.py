"""`python -m rrd_fast.bench reliability`: the real command on its cheapest classes, and its verdicts.

The subprocess run covers bad config values, a YAML alias bomb and a second writer on a folder a
live run holds (one trial each): every one must be counted as handled, in the JSON and in the
table. The verdict function is checked on outcomes it must reject, so a harness that passed
everything could not pass here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rrd_fast.bench.reliability import HarnessError, Outcome, select_classes, trial_classes

REPO = Path(__file__).resolve().parent.parent
CHEAP = ["bad_config", "yaml_bomb", "two_writers"]


def _outcome(code: int, err: str) -> Outcome:
    return Outcome(code=code, out="", err=err, seconds=1.0, cpu_s=1.0, peak_mb=10.0)


def test_cheap_classes_are_handled_and_counted(tmp_path: Path) -> None:
    out = tmp_path / "reliability.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "rrd_fast.bench", "reliability", "--trials", "1", "--classes",
                           ",".join(CHEAP), "--seed", "3", "--out", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "seed 3 (replay with --seed 3)" in proc.stdout
    report = json.loads(out.read_text())
    assert report["seed"] == 3 and report["threads_per_process"] == 1
    assert [(r["class"], r["trials"], r["handled"], r["failed"]) for r in report["classes"]] == [(c, 1, 1, 0) for c in CHEAP]
    first = {c.name: c.variants[0].label for c in trial_classes()}
    assert [(t["cls"], t["index"], t["variant"], t["handled"]) for t in report["trials"]] == \
        [(c, 0, first[c], True) for c in CHEAP]
    # The live second writer was refused while the first ran, and the first then stopped cleanly on SIGTERM.
    writer = report["trials"][2]["detail"]
    assert "second refused" in writer and "first stopped with exit 143" in writer, writer
    rows = [line.split("|") for line in proc.stdout.splitlines() if line.count("|") == 4]
    table = {cells[0].strip(): [c.strip() for c in cells[1:4]] for cells in rows}
    for name in CHEAP:
        assert table[name] == ["1", "1", "0"], table
    assert table["total"] == ["3", "3", "0"]
    assert "failed trials:" not in proc.stdout


@pytest.mark.parametrize("code, err, problem", [
    (2, "error: optim.lr: got -1, expected >=0\n", None),
    (2, "some warning\nerror: optim.lr: got -1\n\n", None),
    (0, "", "expected exit 2"),
    (1, "error: optim.lr: got -1\n", "expected exit 2"),
    (2, "Traceback (most recent call last):\n  ...\nerror: optim.lr\n", "traceback"),
    (2, "ValueError: bad\n", "does not start with 'error:'"),
    (2, "error: data.batch_size: got 0\n", "does not name ['optim.lr']"),
])
def test_error_verdict_rejects_what_is_not_a_one_line_error(code: int, err: str, problem: str | None) -> None:
    found = _outcome(code, err).error_problem("optim.lr")
    assert (found is None) if problem is None else (found is not None and problem in found), found


def test_unknown_class_is_a_one_line_error() -> None:
    with pytest.raises(HarnessError, match="--classes: unknown class nope; known: kill_train"):
        select_classes("kill_train,nope")
    assert [c.name for c in select_classes("yaml_bomb,bad_config")] == ["yaml_bomb", "bad_config"]
