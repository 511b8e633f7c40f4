"""Typed configs: YAML plus overrides, unknown keys refused with suggestions, resolved config saved."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rrd_fast.config import ConfigError, load_config, save_config
from rrd_fast.trainer import lr_at

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))


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


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_shipped_configs_load(path: Path) -> None:
    cfg = load_config(path)
    raw = yaml.safe_load(path.read_text())
    assert cfg.name == raw["name"]
