"""Typed configs: YAML plus overrides, unknown keys refused with suggestions, resolved config saved."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from rrd_fast.cli import run_cli
from rrd_fast.config import ConfigError, RunConfig, config_to_dict, load_config, save_config
from rrd_fast.threads import resolve_threads
from rrd_fast.train import main as train_main
from rrd_fast.trainer import lr_at

CONFIG_ROOT = Path(__file__).resolve().parent.parent / "configs"
CONFIGS = sorted(p for p in CONFIG_ROOT.rglob("*.yaml") if p.parent.name != "sweeps")  # run configs; sweeps/ holds sweep specs
CIFAR100_CONFIGS = sorted((CONFIG_ROOT / "cifar100").glob("*.yaml"))


def test_yaml_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: a\noptim:\n  lr: 0.01\n  milestones: [1, 2]\nmethod:\n  name: rrd\n  beta: 1\n")
    cfg = load_config(path, ["optim.epochs=3", "method.options={rrd: {preset: '2025'}}", "data.flip=false",
                             "train.mixed_precision=no"])
    assert cfg.train.mixed_precision == "no"  # YAML 1.1 would read `no` as false
    assert cfg.optim.lr == 0.01 and cfg.optim.epochs == 3 and cfg.optim.milestones == [1, 2]
    assert cfg.method.beta == 1.0 and isinstance(cfg.method.beta, float)
    assert cfg.method.options == {"rrd": {"preset": "2025"}}
    assert cfg.data.flip is False
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=0.1", "did you mean 'optim.lr'"),
    ("optim.epochs=ten", "expected an integer"),
    ("train.mixed_precision=fp8", "not one of"),
    ("data.flip=3", "expected true or false"),
    ("nosuch=1", "unknown config key 'nosuch'"),
    ("optim", "expected key.path=value"),
])
def test_bad_overrides(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_missing_and_invalid_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_lr_schedule_follows_the_recipe() -> None:
    cfg = load_config(None, [])
    assert [lr_at(cfg, e) for e in (0, 149, 150, 179, 180, 210, 239)] == pytest.approx(
        [0.05, 0.05, 0.005, 0.005, 0.0005, 0.00005, 0.00005])
    scaled = load_config(None, ["optim.lr_scaling=linear", "data.batch_size=256"])
    assert lr_at(scaled, 0) == pytest.approx(0.2)


PAPER_PAIRS = {  # the RRD paper's two CIFAR-100 tables: same-architecture A1-A7, cross-architecture B1-B6
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "MobileNetV2"),
    ("ResNet50", "MobileNetV2"), ("ResNet50", "vgg8"), ("resnet32x4", "ShuffleV1"), ("resnet32x4", "ShuffleV2"),
    ("wrn_40_2", "ShuffleV1"),
}
SMALL_LR_STUDENTS = {"MobileNetV2", "ShuffleV1", "ShuffleV2"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.optim.lr == (0.01 if cfg.student.arch in SMALL_LR_STUDENTS else 0.05)
    assert cfg.train.mixed_precision == "auto"
    if cfg.method.name == "vanilla":
        assert cfg.name == f"{cfg.student.arch}_vanilla_seed0"
    else:
        assert cfg.name == f"{cfg.teacher.arch}_{cfg.student.arch}_{cfg.method.name}_seed0"
        assert cfg.teacher.checkpoint == f"runs/{cfg.data.format}/{cfg.teacher.arch}_vanilla_seed0"


def test_every_cell_of_the_paper_tables_is_one_command() -> None:
    from rrd_fast.methods import list_methods
    from rrd_fast.methods.objective import method_terms

    pairs = {}
    for path in CIFAR100_CONFIGS:
        cfg = load_config(path)
        if cfg.method.name != "vanilla":
            pairs[(cfg.teacher.arch, cfg.student.arch)] = path
    assert set(pairs) == PAPER_PAIRS
    teachers_and_students = {a for pair in PAPER_PAIRS for a in pair}
    assert {load_config(p).student.arch for p in CIFAR100_CONFIGS
            if load_config(p).method.name == "vanilla"} == teachers_and_students
    for (teacher, student), path in pairs.items():
        for method in list_methods():
            cfg = load_config(path, [f"method.name={method}", "seed=3"])
            prefix = "" if method == "vanilla" else f"{teacher}_"
            assert cfg.name == f"{prefix}{student}_{method}_seed3"
            assert method_terms(cfg.method)  # weights resolve and the terms are known


# ------------------------------------------------------------------ every value checked at load time

@pytest.mark.parametrize("overrides, message", [
    (["data.batch_size=0"], "data.batch_size: got 0, expected >0"),
    (["data.batch_size=-64"], "data.batch_size: got -64, expected >0"),
    (["data.eval_batch_size=0"], "data.eval_batch_size: got 0, expected >0"),
    (["data.train_limit=-5"], "data.train_limit: got -5, expected >=0"),
    (["data.eval_limit=-1"], "data.eval_limit: got -1, expected >=0"),
    (["data.pad=-1"], "data.pad: got -1, expected >=0"),
    (["optim.lr=-0.1"], "optim.lr: got -0.1, expected finite, >=0"),
    (["optim.lr=.nan"], "optim.lr: got nan, expected finite, >=0"),
    (["optim.lr=.inf"], "optim.lr: got inf, expected finite, >=0"),
    (["optim.momentum=-0.5"], "optim.momentum: got -0.5, expected finite, [0, 1)"),
    (["optim.momentum=1.0"], "optim.momentum: got 1.0, expected finite, [0, 1)"),
    (["optim.weight_decay=-5e-4"], "optim.weight_decay: got -0.0005, expected finite, >=0"),
    (["optim.epochs=0"], "optim.epochs: got 0, expected >0"),
    (["optim.milestones=[-1]"], "optim.milestones[0]: got -1, expected >=0"),
    (["optim.milestones=[180, 150]"], "optim.milestones: got [180, 150], expected >=0, increasing"),
    (["optim.milestones=[150, 150]"], "expected >=0, increasing"),
    (["optim.lr_decay=0"], "optim.lr_decay: got 0.0, expected finite, (0, 1]"),
    (["optim.lr_decay=1.5"], "optim.lr_decay: got 1.5, expected finite, (0, 1]"),
    (["optim.base_batch_size=0"], "optim.base_batch_size: got 0, expected >0"),
    (["optim.nesterov=true", "optim.momentum=0"], "optim.nesterov: true needs optim.momentum > 0"),
    (["train.save_every=0"], "train.save_every: got 0, expected >0"),
    (["train.eval_every=-2"], "train.eval_every: got -2, expected >0"),
    (["train.threads=-1"], "train.threads: got -1, expected >=0"),
    (["teacher.cache_views=0"], "teacher.cache_views: got 0, expected >0"),
    (["teacher.cache_max_gb=0"], "teacher.cache_max_gb: got 0.0, expected >0"),
    (["teacher.cache_max_gb=.nan"], "teacher.cache_max_gb: got nan, expected >0"),
    (["teacher.cache_shard_samples=0"], "teacher.cache_shard_samples: got 0, expected >0"),
    (["teacher.cache_batch_size=-1"], "teacher.cache_batch_size: got -1, expected >=0"),
    (["method.beta=-1"], "method.beta: got -1.0, expected finite, >=0"),
    (["seed=-1"], "seed: got -1, expected [0, 2**63)"),
])
def test_out_of_range_values_are_refused_at_load(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, overrides)


def test_edge_values_that_are_allowed(tmp_path: Path) -> None:
    cfg = load_config(None, ["optim.epochs=2", "optim.lr=0", "optim.momentum=0", "optim.lr_decay=1",
                             "optim.milestones=[0, 1]", "teacher.cache_max_gb=.inf", "teacher.cache_batch_size=0",
                             "data.pad=0", "method.gamma=0"])
    assert cfg.optim.lr == 0.0 and cfg.teacher.cache_max_gb == float("inf") and cfg.method.gamma == 0.0
    short = load_config(None, ["optim.epochs=2"])  # the recipe's milestones past a short run never apply
    assert short.optim.milestones == [150, 180, 210]
    assert load_config(None, ["optim.milestones=[]"]).optim.milestones == []
    assert load_config(None, ["method.gamma=null"]).method.gamma is None
    assert load_config(None, []).method.alpha is None
    path = tmp_path / "c.yaml"
    path.write_text("method:\n  gamma: null\n  beta: 0.8\nteacher:\n  cache_max_gb: .inf\n")
    cfg = load_config(path)
    assert cfg.method.gamma is None and cfg.method.beta == 0.8
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


def test_a_bad_value_in_a_file_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("data:\n  batch_size: 0\n")
    code = run_cli(lambda: train_main(["--config", str(path), f"output_dir={tmp_path}"]))
    err = capsys.readouterr().err
    assert code == 2 and err == "error: data.batch_size: got 0, expected >0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["c.yaml"]  # no run folder was started


# ------------------------------------------------------------------ scientific notation

def test_scientific_notation_is_a_float_in_files_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\n  weight_decay: 5E-4\nteacher:\n  cache_max_gb: 1.5e1\n"
                    "method:\n  options: {kd: {T: 4e0}}\n")
    cfg = load_config(path)
    assert cfg.optim.lr == 1e-3 and cfg.optim.weight_decay == 5e-4 and cfg.teacher.cache_max_gb == 15.0
    assert cfg.method.options == {"kd": {"T": 4.0}}
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5e-4", "optim.momentum=+9.0e-1", "method.beta=.8e0"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.momentum, cfg.method.beta) == (1e-3, 5e-4, 0.9, 0.8)
    with pytest.raises(ConfigError, match="optim.epochs: expected an integer, got 0.001"):
        load_config(None, ["optim.epochs=1e-3"])
    path.write_text("data:\n  batch_size: 6.4e1\n")
    with pytest.raises(ConfigError, match="data.batch_size: expected an integer, got 64.0"):
        load_config(path)


def test_strings_that_look_like_numbers_survive_a_save(tmp_path: Path) -> None:
    cfg = load_config(None, ["name='1e3'", "data.root='5E-4'", "train.mixed_precision=no"])
    assert cfg.name == "1e3" and cfg.data.root == "5E-4"
    save_config(cfg, tmp_path / "out.yaml")
    assert load_config(tmp_path / "out.yaml") == cfg


# ------------------------------------------------------------------ YAML alias bombs

def _laughs_rows(levels: int) -> list[str]:
    """The "billion laughs" anchors: level k is 9 aliases of level k-1, so 9**levels strings in all."""
    rows = ["a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, name in zip("abcdefghij", "bcdefghijk"[: levels - 1]):
        rows.append(f"{name}: &{name} [" + ", ".join([f"*{prev}"] * 9) + "]")
    return rows


def _laughs(levels: int, key: str = "method:\n  options:\n    lol") -> str:
    return f"{key}:\n" + "".join(f"      {row}\n" for row in _laughs_rows(levels))


@pytest.mark.parametrize("key", ["method:\n  options:\n    lol", "optim:\n  milestones"])
def test_billion_laughs_is_refused_naming_the_file(tmp_path: Path, key: str) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(_laughs(9, key))
    with pytest.raises(ConfigError, match=r"bomb\.yaml: YAML aliases expand to more than 100000 values"):
        load_config(path)


def test_alias_limits(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(_laughs(4))  # 9**4 = 6561 values: an ordinary use of anchors, accepted
    assert len(load_config(path).method.options["lol"]["d"]) == 9
    path.write_text("base: &b 1\nmethod:\n  options:\n    many: [" + ", ".join(["*b"] * 101) + "]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: more than 100 YAML alias references"):
        load_config(path)
    path.write_text("method:\n  options:\n    loop: &l [*l]\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: a YAML alias inside its own anchor"):
        load_config(path)
    with pytest.raises(ConfigError, match="override method.options: YAML aliases expand"):
        load_config(None, ["method.options={x: {" + ", ".join(_laughs_rows(9)) + "}}"])


# ------------------------------------------------------------------ --help and --print-config

def _flat_keys(tree: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flat_keys(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_help_lists_every_key_with_type_default_constraint_and_doc(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        train_main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    keys = _flat_keys(config_to_dict(RunConfig()))
    for key in keys:
        (head,) = [line for line in lines if line.startswith(f"  {key}: ")]
        doc = lines[lines.index(head) + 1]
        assert doc.startswith("      ") and len(doc.strip()) > 10, key
    for section in ("data", "student", "teacher", "method", "optim", "distributed", "train"):
        assert any(line.startswith(f"{section}: ") for line in lines), section
    assert "  data.batch_size: int = 64   allowed: >0" in lines
    assert "  optim.lr: float = 0.05   allowed: finite, >=0" in lines
    assert "  optim.milestones: list[int] = [150, 180, 210]   allowed: >=0, increasing" in lines
    assert "  method.gamma: float|null = null   allowed: finite, >=0" in lines
    assert "  teacher.cache_dtype: fp16|bf16|fp32 = \"fp16\"" in lines
    flat = " ".join(out.split())
    assert "epoch e replays view e mod V" in flat and "V-times larger" in flat
    assert "first N samples of the training split" in flat and "first N samples of the evaluation split" in flat


def test_every_field_has_a_doc() -> None:
    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            assert f.metadata.get("doc"), f"{prefix}{f.name} has no doc"
            if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
                walk(f.default_factory, f"{prefix}{f.name}.")

    walk(RunConfig, "")


def test_help_imports_no_training_code() -> None:
    code = ("import sys\nfrom rrd_fast.train import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "heavy = [m for m in ('torch', 'rrd_fast.methods', 'rrd_fast.trainer', 'rrd_fast.cache') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parent.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "config keys" in proc.stdout


def test_print_config_round_trips_and_starts_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = Path(__file__).resolve().parent.parent / "configs" / "cifar100" / "resnet32x4_resnet8x4.yaml"
    args = ["--config", str(config), f"output_dir={tmp_path / 'runs'}", "optim.lr=1e-3", "method.alpha=0.9",
            "train.mixed_precision=auto", "name='1e3'"]
    assert train_main(["--print-config", *args]) == 0
    printed = capsys.readouterr().out
    assert not (tmp_path / "runs").exists()
    (tmp_path / "printed.yaml").write_text(printed)
    resolved = load_config(tmp_path / "printed.yaml")
    assert resolved.method.name == "rrd" and resolved.name == "1e3"
    assert (resolved.method.gamma, resolved.method.alpha, resolved.method.beta) == (1.0, 0.9, 1.0)  # rrd's own gamma, beta
    assert resolved.train.mixed_precision in ("no", "bf16") and resolved.optim.lr == 1e-3
    assert train_main(["--print-config", "--config", str(tmp_path / "printed.yaml")]) == 0
    assert capsys.readouterr().out == printed
    assert config_to_dict(resolved) == yaml.safe_load(printed)  # nothing lost or retyped on the way back


# ------------------------------------------------------------------ train.threads

def test_resolve_threads_shares_the_cores_among_local_processes() -> None:
    before = torch.get_num_threads()
    try:
        auto = load_config(None, [])
        env: dict[str, str] = {"LOCAL_WORLD_SIZE": "4"}
        assert resolve_threads(auto, affinity=range(8), environ=env) == 2
        assert env["OMP_NUM_THREADS"] == "2" and torch.get_num_threads() == 2
        assert resolve_threads(auto, affinity={0, 1, 2}, environ={"LOCAL_WORLD_SIZE": "8"}) == 1  # at least 1
        assert resolve_threads(auto, affinity={3}, environ={}) == 1
        env = {}
        assert resolve_threads(auto, environ=env) == len(os.sched_getaffinity(0))  # this process's real affinity
        pinned = load_config(None, ["train.threads=3"])
        env = {"LOCAL_WORLD_SIZE": "4", "OMP_NUM_THREADS": "1"}
        assert resolve_threads(pinned, affinity=range(64), environ=env) == 3 and env["OMP_NUM_THREADS"] == "3"
        assert torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)
