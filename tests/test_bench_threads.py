"""`python -m rrd_fast.bench threads` runs real training processes under both launchers and reports what they used.

One quick round of the competing-job variant under each launcher, with nothing set about
OpenMP's waiting: the measured run pins one thread and its competitor runs with auto threads,
so each launcher's run folders show both an explicit and an automatic thread count, and
libgomp's own report in each log shows whether the trainer's PASSIVE default reached it. No
speed is asserted, only that the table has a row per variant and that every run's own
config.yaml and libgomp report hold what the table claims.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from rrd_fast.bench.__main__ import main
from rrd_fast.bench.common import usable_cores
from rrd_fast.bench.threads import libgomp_wait, wait_environment
from rrd_fast.cli import run_cli


def saved_threads(run: Path) -> int:
    return int(yaml.safe_load((run / "config.yaml").read_text())["train"]["threads"])


def test_threads_bench_runs_each_launcher_and_reads_the_saved_thread_counts(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work, out = tmp_path / "work", tmp_path / "threads.json"
    assert main(["threads", "--quick", "--rounds", "1", "--launchers", "python,accelerate", "--threads", "1",
                 "--wait-policies", "default", "--loads", "busy", "--workdir", str(work), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    table = result["table"]
    assert [(r["launcher"], r["threads"], r["wait_policy"], r["load"]) for r in table] == [
        ("python", 1, "default", "busy"), ("accelerate", 1, "default", "busy")]
    auto = len(os.sched_getaffinity(0))
    assert usable_cores() == auto
    for row in table:
        run = work / "runs" / f"r0_{row['variant']}"
        assert saved_threads(run) == 1 == row["resolved_threads"][0]
        assert saved_threads(run.with_name(run.name + "_competitor")) == auto == row["competitor_threads"][0]
        assert len(row["epochs_img_s"][0]) == 2 and row["img_s"] == row["epochs_img_s"][0][1] > 0
        assert row["ratio_to_default"] is None  # the default (auto threads) was not among the variants
        # OMP_WAIT_POLICY=PASSIVE from rrd_fast/malloc_tuning.py, as libgomp took it in the training process
        assert row["spin_count"] == ["0"]
        assert libgomp_wait(work / "runs" / f"{run.name}.log") == {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}
        assert libgomp_wait(work / "runs" / f"{run.name}_competitor.log")["GOMP_SPINCOUNT"] == "0"
    assert result["auto_check"] == {"auto_threads": {"python": [auto], "accelerate": [auto]},
                                    "same_under_every_launcher": True}
    assert printed.count("+1 job (") == 2 and "the same under every launcher" in printed
    assert "python rrd_fast/train.py" in printed and "accelerate launch --cpu" in printed


@pytest.mark.parametrize("args, message", [
    (["--threads", "two"], "--threads: 'two' is not auto or a positive integer"),
    (["--wait-policies", "lazy"], "--wait-policies: 'lazy' is not default, libgomp, passive, active or spincount=N"),
    (["--launchers", "torchrun"], "--launchers: 'torchrun' is not one of python, accelerate"),
    (["--loads", "heavy"], "--loads: 'heavy' is not one of idle, busy"),
])
def test_threads_bench_refuses_bad_lists_by_name(args: list[str], message: str,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(lambda: main(["threads", "--quick", *args])) == 2
    assert capsys.readouterr().err.strip() == f"error: {message}"


def test_wait_policy_names_map_to_libgomp_variables() -> None:
    assert wait_environment("default") == {}
    assert wait_environment("libgomp") == {"GOMP_SPINCOUNT": "300000"}
    assert wait_environment("passive") == {"OMP_WAIT_POLICY": "PASSIVE"}
    assert wait_environment("spincount=1000") == {"GOMP_SPINCOUNT": "1000"}
