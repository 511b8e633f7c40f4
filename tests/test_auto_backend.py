"""`data.pipeline=auto`: rows keyed by machine, a first-use probe on the run's own data, the
user's cache, and the shipped table's consistency."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.auto import cache_path, empty_table, machine_description, machine_key, merge_entries
from pipelines.backends import AUTO_TABLE, FALLBACK_BACKEND, load_auto_table, resolve_backend
from pipelines.errors import DataError
from pipelines.formats import get_format, read_split
from pipelines.synthetic import write_cifar100, write_tiny_imagenet
from rrd_fast.config import load_config
from rrd_fast.data import build_data

HERE = machine_description("cpu")
OTHER = {**HERE, "cpu": "Some Other CPU 9000", "cores": HERE["cores"] + 14}


@pytest.fixture(autouse=True)
def user_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every test gets its own empty cache folder: nothing is read from or written to the real one."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "rrd-fast" / "auto_backend.json"


@pytest.fixture(scope="module")
def cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_cifar100(tmp_path_factory.mktemp("auto") / "c", n_train=288, n_test=32)  # > one reference batch


def _write(path: Path, table: dict) -> Path:
    path.write_text(json.dumps(table))
    return path


def _entry(backend: str, torch_img_s: int, dali_img_s: int) -> dict:
    return {"backend": backend, "img_s": {"torch": torch_img_s, "dali": dali_img_s}, "measured": "2026-01-01"}


def test_cache_path_follows_xdg(user_cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_path() == user_cache
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "rrd-fast" / "auto_backend.json"


def test_machine_key_names_cpu_cores_and_flags() -> None:
    key = machine_key(HERE)
    assert HERE["cpu"] in key and f"{HERE['cores']} cores" in key and HERE["arch"] in key
    assert machine_key(OTHER) != key
    assert machine_key({**HERE, "flags": ["avx2"]}) != machine_key({**HERE, "flags": ["avx2", "avx512f"]})
    assert machine_key({**HERE, "gpu": "NVIDIA H200"}).endswith(" | NVIDIA H200")


def test_only_this_machines_row_is_used(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another CPU's measurement must not decide here; this machine's row does."""
    table = merge_entries(empty_table(), OTHER, {"array/cpu": _entry("torch", 800_000, 200_000),
                                                 "files/cpu": _entry("torch", 9_000, 3_000)})
    table = merge_entries(table, HERE, {"files/cpu": _entry("dali", 900, 3_600)})
    path = _write(tmp_path / "t.json", table)
    cifar100, tiny = get_format("cifar100"), get_format("tiny_imagenet")
    with caplog.at_level(logging.INFO, logger="pipelines.backends"):
        assert resolve_backend("auto", tiny, "cpu", table=path) == "dali"
        # No row for arrays on this machine and no data to probe: the always-installed fallback,
        # not the other machine's "torch" row (which names the same backend, so check the reason).
        assert resolve_backend("auto", cifar100, "cpu", table=path) == FALLBACK_BACKEND
        assert resolve_backend("auto", tiny, "cuda", table=path) == FALLBACK_BACKEND  # nothing measured on GPUs
    logged = [r.getMessage() for r in caplog.records]
    assert any("dali" in m and "3,600 img/s" in m for m in logged), logged
    assert any("no measurement for array/cpu" in m and machine_key(HERE) in m for m in logged), logged
    assert not any("800,000" in m for m in logged)
    assert any("no measurement for files/cuda" in m for m in logged)
    assert resolve_backend("dali", cifar100, "cpu", table=path) == "dali"  # explicit choices pass through


def test_unkeyed_table_is_not_trusted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The earlier layout (one row per data kind, machine unknown) is ignored, with a warning."""
    path = _write(tmp_path / "old.json", {"entries": {"files/cpu": _entry("dali", 1, 2)}})
    with caplog.at_level(logging.INFO, logger="pipelines.backends"):
        assert resolve_backend("auto", get_format("tiny_imagenet"), "cpu", table=path) == FALLBACK_BACKEND
    assert any("not keyed by machine" in r.getMessage() and str(path) in r.getMessage() for r in caplog.records)


def test_table_errors_name_the_file(tmp_path: Path) -> None:
    bad = _write(tmp_path / "bad.json", {})
    bad.write_text("{not json")
    with pytest.raises(DataError, match=str(bad)) as ei:
        resolve_backend("auto", get_format("cifar100"), "cpu", table=bad)
    assert "\n" not in str(ei.value)
    _write(bad, {"machines": {"x": "not a row"}})
    with pytest.raises(DataError, match=str(bad)):
        resolve_backend("auto", get_format("cifar100"), "cpu", table=bad)
    assert resolve_backend("auto", get_format("cifar100"), "cpu", table=tmp_path / "absent.json") == FALLBACK_BACKEND


def test_first_use_probes_the_runs_data_once_and_caches_it(cifar: Path, tmp_path: Path, user_cache: Path,
                                                            caplog: pytest.LogCaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """No row anywhere: build_data probes both backends on the run's own data, stores the winner, and
    the next run reads it back without probing."""
    empty = _write(tmp_path / "shipped.json", empty_table())
    cfg = load_config(None, ["data.format=cifar100", f"data.root={cifar}", "data.pipeline=auto", "data.batch_size=32"])
    import pipelines.backends as backends

    monkeypatch.setattr(backends, "AUTO_TABLE", empty)  # the shipped table may hold this machine's row
    with caplog.at_level(logging.INFO, logger="pipelines.backends"):
        first = build_data(cfg.data, 0, 0, 1, torch.device("cpu"))
        stored = user_cache.read_text()
        second = build_data(cfg.data, 0, 0, 1, torch.device("cpu"))
    logged = [r.getMessage() for r in caplog.records]
    assert sum("probing" in m for m in logged) == 1, logged
    row = json.loads(stored)["machines"][machine_key(HERE)]
    assert row["machine"] == HERE
    entry = row["entries"]["array/cpu"]
    assert set(entry["img_s"]) == {"torch", "dali"} and all(v > 0 for v in entry["img_s"].values())
    assert entry["backend"] == max(entry["img_s"], key=entry["img_s"].get) == first.backend == second.backend
    assert entry["source"] == "probe" and "cifar100" in entry["note"]
    assert user_cache.read_text() == stored  # the second run only read it
    assert not list(user_cache.parent.glob("*.lock")) and not list(user_cache.parent.glob(".*tmp"))


def test_probe_rows_are_per_data_kind(tmp_path: Path, user_cache: Path) -> None:
    """A JPEG folder is probed on its own (decoding), next to the array row already cached."""
    cached = merge_entries(empty_table(), HERE, {"array/cpu": _entry("torch", 2, 1)})
    user_cache.parent.mkdir(parents=True)
    _write(user_cache, cached)
    root = write_tiny_imagenet(tmp_path / "t", n_classes=2, per_class_train=128, per_class_val=1, size=16)
    fmt = get_format("tiny_imagenet")
    split = read_split("tiny_imagenet", root, "train")
    from pipelines.augment import ResizedCropSpec

    empty = _write(tmp_path / "shipped.json", empty_table())
    got = resolve_backend("auto", fmt, "cpu", table=empty, split=split, augment=ResizedCropSpec(), batch_size=8)
    entries = json.loads(user_cache.read_text())["machines"][machine_key(HERE)]["entries"]
    assert set(entries) == {"array/cpu", "files/cpu"}
    assert entries["array/cpu"] == _entry("torch", 2, 1)  # kept as it was
    assert entries["files/cpu"]["backend"] == got
    assert set(entries["files/cpu"]["img_s"]) == {"torch", "dali"}


def test_shipped_table_rows_are_keyed_consistently() -> None:
    """Each shipped row names the machine it was measured on, and its choice is its fastest backend."""
    table = load_auto_table(AUTO_TABLE)
    assert table["format"] == "rrd-fast-auto-backend/2" and isinstance(table["machines"], dict)
    for key, row in table["machines"].items():
        assert key == machine_key(row["machine"])
        for entry in row["entries"].values():
            assert entry["backend"] in ("torch", "dali")
            assert entry["backend"] == max(entry["img_s"], key=entry["img_s"].get)


def test_damaged_cache_is_ignored_and_rewritten(cifar: Path, tmp_path: Path, user_cache: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    """The user's cache is only a cache: a damaged file warns, is probed over, and holds a valid table after."""
    user_cache.parent.mkdir(parents=True)
    user_cache.write_text("{half a file")
    split = read_split("cifar100", cifar, "train")
    from pipelines.augment import CropFlipSpec

    empty = _write(tmp_path / "shipped.json", empty_table())
    with caplog.at_level(logging.INFO, logger="pipelines.backends"):
        got = resolve_backend("auto", get_format("cifar100"), "cpu", table=empty, split=split, augment=CropFlipSpec(),
                              batch_size=32)
    assert any(str(user_cache) in r.getMessage() and "ignoring" in r.getMessage() for r in caplog.records)
    assert load_auto_table(user_cache)["machines"][machine_key(HERE)]["entries"]["array/cpu"]["backend"] == got


def test_a_split_smaller_than_the_reference_batch_is_probed_but_not_stored(cifar: Path, tmp_path: Path,
                                                                            user_cache: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A smoke run on a few samples must not decide the backend of later full-size runs."""
    from pipelines.augment import CropFlipSpec
    from pipelines.formats import head

    split = head(read_split("cifar100", cifar, "train"), 64)
    empty = _write(tmp_path / "shipped.json", empty_table())
    with caplog.at_level(logging.INFO, logger="pipelines.backends"):
        got = resolve_backend("auto", get_format("cifar100"), "cpu", table=empty, split=split, augment=CropFlipSpec(),
                              batch_size=8)
    assert got in ("torch", "dali") and not user_cache.exists()
    assert any("not stored" in r.getMessage() and "reference batch of 256" in r.getMessage() for r in caplog.records)


def test_probe_streams_stay_on_their_own_pipeline(cifar: Path) -> None:
    """Each probed backend cycles through its own epochs, however the streams interleave."""
    from pipelines.auto import _endless
    from pipelines.backends import build_pipeline
    from pipelines.formats import head
    from pipelines.sampler import EpochSampler

    split, fmt = read_split("cifar100", cifar, "train"), get_format("cifar100")
    small = build_pipeline("torch", head(split, 64), fmt, EpochSampler(64, 32, seed=0), None)
    large = build_pipeline("torch", head(split, 256), fmt, EpochSampler(256, 32, seed=0), None)
    a, b = _endless(small), _endless(large)
    seen_a, seen_b = [], []
    for _ in range(6):  # three epochs of the small one
        seen_a.append(next(a).index)
        seen_b.append(next(b).index)
    assert max(int(i.max()) for i in seen_a) < 64 and max(int(i.max()) for i in seen_b) >= 64
    assert sorted(np.concatenate(seen_a[2:4]).tolist()) == list(range(64))  # its second epoch, whole
