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
        assert cfg.teacher.checkpoint == f"runs/cifar100/{cfg.teacher.arch}_vanilla_seed0"


def test_every_cell_of_the_paper_tables_is_one_command() -> None:
    from rrd_fast.methods import list_methods
    from rrd_fast.methods.objective import method_terms

    pairs = {}
    for path in CONFIGS:
        cfg = load_config(path)
        if cfg.method.name != "vanilla":
            pairs[(cfg.teacher.arch, cfg.student.arch)] = path
    assert set(pairs) == PAPER_PAIRS
    teachers_and_students = {a for pair in PAPER_PAIRS for a in pair}
    assert {load_config(p).student.arch for p in CONFIGS if load_config(p).method.name == "vanilla"} == teachers_and_students
    for (teacher, student), path in pairs.items():
        for method in list_methods():
            cfg = load_config(path, [f"method.name={method}", "seed=3"])
            prefix = "" if method == "vanilla" else f"{teacher}_"
            assert cfg.name == f"{prefix}{student}_{method}_seed3"
            assert method_terms(cfg.method)  # weights resolve and the terms are known
