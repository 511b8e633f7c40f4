"""Teacher feature cache: cached outputs equal the online teacher's for the same (index,
view); distilling from an fp32 cache reproduces the online run exactly; mismatched
manifests, corrupt shards and interrupted builds are handled."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from pipelines.synthetic import write_cifar100
from rrd_fast.cache import CacheError, CachedTeacher, build_cache, open_cached_teacher, read_manifest
from rrd_fast.cache.__main__ import main as cache_main
from rrd_fast.cache.shards import CacheReader
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.cli import run_cli
from rrd_fast.config import load_config
from rrd_fast.data import build_data
from rrd_fast.models import create_model
from rrd_fast.checkpoint import load_teacher

N_TRAIN = 128
ROOT = Path(__file__).resolve().parent.parent


def _teacher_ckpt(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = create_model("resnet8", num_classes=100, in_channels=3)
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode outputs are not a plain rescaling
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    write_model_checkpoint(path, model, {"arch": "resnet8", "num_classes": 100, "in_channels": 3, "image_size": 32,
                                         "normalization": {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]}})
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("cache")
    write_cifar100(base / "data", N_TRAIN, 32, seed=3)
    return {"base": base, "data": base / "data", "teacher": _teacher_ckpt(base / "teacher", 1),
            "teacher2": _teacher_ckpt(base / "teacher2", 2)}


def _overrides(env: dict[str, Path], cache: Path, *extra: str) -> list[str]:
    return [f"data.root={env['data']}", "data.batch_size=32", "data.eval_limit=32", f"teacher.checkpoint={env['teacher']}",
            f"teacher.cache={cache}", "teacher.cache_views=2", "teacher.cache_shard_samples=50",
            "teacher.cache_batch_size=32", "method.name=rrd", "method.alpha=1", "method.beta=1",
            "method.options={rrd: {queue_size: 128}}", "student.arch=resnet8", "train.progress=false", *extra]


def _cfg(env: dict[str, Path], cache: Path, *extra: str):
    return load_config(None, _overrides(env, cache, *extra))


@pytest.fixture(scope="module")
def fp32_cache(env: dict[str, Path]) -> Path:
    cache = env["base"] / "fp32"
    build_cache(_cfg(env, cache, "teacher.cache_dtype=fp32"), log=lambda _: None)
    return cache


def _online_and_cached(cfg, views_and_indices):
    """Online teacher outputs and cached ones (through CachedTeacher) for the same batches."""
    data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    model, meta = load_teacher(cfg.teacher.checkpoint, "", 100, 3)
    cached = open_cached_teacher(cfg, model, meta, data.train, "cpu", ("logits", "pooled"))
    model = model.to(memory_format=torch.channels_last)
    pairs = []
    for view, index in views_and_indices:
        batch = data.train.batch_for(index, view)
        images = batch.images.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            online = model(images, features=True)
        pairs.append((online, cached(batch, images)))
    cached.close()
    return pairs


def _random_batches(seed: int = 0) -> list[tuple[int, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [(v, rng.choice(N_TRAIN, 32, replace=False)) for v in (0, 1, 1)]


def test_fp32_cache_equals_online_teacher_bit_exactly(env, fp32_cache):
    manifest = read_manifest(fp32_cache)
    assert manifest["complete"] and len(manifest["shards"]) == 6  # 2 views × 3 row ranges: gathers cross shards
    for online, cached in _online_and_cached(_cfg(env, fp32_cache, "teacher.cache_dtype=fp32"), _random_batches()):
        assert cached.logits.dtype == torch.float32
        assert torch.equal(cached.logits, online.logits)
        assert torch.equal(cached.pooled, online.pooled)


def test_teacher_outputs_beyond_fp16_range_are_refused(env, tmp_path):
    """An fp16 cache would store logits above 65504 as inf; the build says so instead, and bf16 stores them."""
    model, _ = load_teacher(env["teacher"], "", 100, 3)
    with torch.no_grad():
        model.fc.weight.mul_(1e6)
    write_model_checkpoint(tmp_path / "big", model, {"arch": "resnet8", "num_classes": 100, "in_channels": 3,
                                                     "image_size": 32, "normalization": {"mean": [0.5] * 3,
                                                                                         "std": [0.25] * 3}})
    with pytest.raises(CacheError, match="'logits' reaches .* beyond fp16's range .* teacher.cache_dtype=bf16"):
        build_cache(_cfg(env, tmp_path / "fp16", f"teacher.checkpoint={tmp_path / 'big'}"), log=lambda _: None)
    manifest = build_cache(_cfg(env, tmp_path / "bf16", f"teacher.checkpoint={tmp_path / 'big'}",
                                "teacher.cache_dtype=bf16"), log=lambda _: None)
    assert manifest["complete"]


@pytest.mark.parametrize("dtype,rtol", [("fp16", 2.0**-11), ("bf16", 2.0**-8)])
def test_half_caches_equal_online_within_rounding(env, dtype, rtol):
    cache = env["base"] / dtype
    cfg = _cfg(env, cache, f"teacher.cache_dtype={dtype}")
    build_cache(cfg, log=lambda _: None)
    for online, cached in _online_and_cached(cfg, _random_batches(1)):
        for got, want in ((cached.logits, online.logits), (cached.pooled, online.pooled)):
            assert not torch.equal(got, want)  # really stored at lower precision
            torch.testing.assert_close(got, want, rtol=rtol, atol=1e-6)


def test_fp32_teacher_of_a_bf16_run_is_built_from_fp32_batches(env, fp32_cache):
    """The run's pipeline yields bf16 batches; a cache built with cache_precision=no must not see them."""
    cache = env["base"] / "fp32-for-bf16-run"
    cfg = _cfg(env, cache, "teacher.cache_dtype=fp32", "train.mixed_precision=bf16", "teacher.cache_precision=no")
    run_pipeline = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"), "bf16").train
    assert run_pipeline.dtype == torch.bfloat16
    build_cache(cfg, pipeline=run_pipeline, device="cpu", log=lambda _: None)
    for online, cached in _online_and_cached(cfg, _random_batches(2)):  # online: fp32 batches, no autocast
        assert torch.equal(cached.logits, online.logits) and torch.equal(cached.pooled, online.pooled)


def _train(env, name: str, cache: str, *extra: str):
    from rrd_fast.trainer import Trainer

    cfg = load_config(None, _overrides(env, Path(cache), f"output_dir={env['base'] / 'runs'}", f"name={name}",
                                       "optim.epochs=2", "teacher.cache_dtype=fp32", *extra))
    if not cache:
        cfg.teacher.cache = ""
    trainer = Trainer(cfg)
    trainer.fit()
    return trainer


def test_distillation_from_fp32_cache_matches_online_teacher(env, fp32_cache):
    online = _train(env, "online", "")
    cached = _train(env, "cached", str(env["base"] / "built-by-trainer"))  # no cache yet: the trainer builds it
    assert isinstance(cached.teacher, CachedTeacher)
    _assert_same_cache(env["base"] / "built-by-trainer", fp32_cache)
    keys = [k for k in online.state.history[0] if k.startswith("loss") or k.startswith("top") or k == "train_top1"]
    assert {"loss_ce", "loss_kd", "loss_rrd"} <= set(keys)
    for a, b in zip(online.state.history, cached.state.history, strict=True):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    want, got = online.unwrapped.state_dict(), cached.unwrapped.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        assert torch.equal(want[k], got[k]), k
    cached.teacher.close()


def test_epochs_beyond_views_replay_view_e_mod_v(env, fp32_cache):
    cfg = _cfg(env, fp32_cache, "teacher.cache_dtype=fp32")
    data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    model, meta = load_teacher(cfg.teacher.checkpoint, "", 100, 3)
    teacher = open_cached_teacher(cfg, model, meta, data.train, "cpu")
    pipe = teacher.wrap(data.train)
    model = model.to(memory_format=torch.channels_last)
    batches = list(pipe.epoch(3, start_step=1))
    assert len(batches) == len(pipe) - 1
    plan = data.train.sampler.batches(3)[1:]
    assert not np.array_equal(plan[0], data.train.sampler.batches(1)[1])  # the order still changes per epoch
    for step, batch in enumerate(pipe.epoch(3, start_step=1)):
        assert batch.epoch == 1  # view 3 mod 2
        np.testing.assert_array_equal(batch.index.numpy(), plan[step])
        again = data.train.batch_for(plan[step], 1)
        assert torch.equal(batch.images, again.images)
        out = teacher(batch, batch.images.contiguous(memory_format=torch.channels_last))
        with torch.no_grad():
            ref = model(again.images.contiguous(memory_format=torch.channels_last), features=True)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.pooled, ref.pooled)
    teacher.close()


def test_dali_pipeline_builds_and_replays_the_cache(env, fp32_cache):
    """The same cache path through the DALI backend: built from DALI's `batch_for`, replayed
    by its `epoch(e, aug_epoch=e mod V)`; equal to the online teacher on DALI's images."""
    pytest.importorskip("nvidia.dali")
    cfg = _cfg(env, env["base"] / "dali", "teacher.cache_dtype=fp32", "data.pipeline=dali")
    data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    assert data.backend == "dali"
    model, meta = load_teacher(cfg.teacher.checkpoint, "", 100, 3)
    teacher = open_cached_teacher(cfg, model, meta, data.train, "cpu")  # builds it
    assert read_manifest(env["base"] / "dali")["info"]["pipeline"] != "ArrayPipeline"
    model = model.to(memory_format=torch.channels_last)
    torch_cache = CacheReader(fp32_cache, read_manifest(fp32_cache), verify=False)
    for batch in teacher.wrap(data.train).epoch(3):
        assert batch.epoch == 1
        images = batch.images.contiguous(memory_format=torch.channels_last)
        out = teacher(batch, images)
        with torch.no_grad():
            ref = model(images, features=True)
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.pooled, ref.pooled)
        # and within float rounding of the cache the torch pipeline built
        rows = torch_cache.gather(1, batch.index.numpy())
        torch.testing.assert_close(out.logits, torch.from_numpy(rows["logits"]), rtol=1e-4, atol=1e-4)
    teacher.close()


@pytest.mark.parametrize("change,field", [
    ("seed=5", "augmentation.seed"),
    ("teacher.cache_views=3", "views"),
    ("data.train_limit=100", "dataset.num_samples"),
    ("data.pad=2", "augmentation.spec.pad"),
    ("teacher.cache_dtype=fp16", "dtype"),
    ("train.mixed_precision=bf16", "precision"),
])
def test_manifest_mismatch_is_refused_naming_the_field(env, fp32_cache, change, field):
    cfg = _cfg(env, fp32_cache, "teacher.cache_dtype=fp32", change)
    with pytest.raises(CacheError) as err:
        build_cache(cfg)
    msg = str(err.value)
    assert "\n" not in msg and f"{field}:" in msg and "--rebuild-cache" in msg, msg


def test_other_teacher_refused_by_cli_then_rebuilt(env, fp32_cache, capsys):
    cache = env["base"] / "rebuild"
    shutil.copytree(fp32_cache, cache)
    args = ["build", *_overrides(env, cache, "teacher.cache_dtype=fp32", f"teacher.checkpoint={env['teacher2']}")]
    assert run_cli(lambda: cache_main(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "teacher.sha256:" in err and str(cache / "manifest.json") in err, err
    assert run_cli(lambda: cache_main(["build", "--rebuild-cache", *args[1:]])) == 0
    manifest = read_manifest(cache)
    assert manifest["complete"]
    assert manifest["key"]["teacher"]["sha256"] == json.loads((env["teacher2"] / "model.json").read_text())["sha256"]
    assert manifest["shards"] != read_manifest(fp32_cache)["shards"]


def test_train_cli_refuses_a_cache_of_another_teacher_until_rebuild(env, fp32_cache, capsys):
    from rrd_fast.train import main as train_main

    cache = env["base"] / "train-rebuild"
    shutil.copytree(fp32_cache, cache)
    args = [*_overrides(env, cache, "teacher.cache_dtype=fp32", f"teacher.checkpoint={env['teacher2']}"),
            f"output_dir={env['base'] / 'runs'}", "name=cli", "optim.epochs=1"]
    assert run_cli(lambda: train_main(args)) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "teacher.sha256:" in err and "--rebuild-cache" in err, err
    assert run_cli(lambda: train_main(["--rebuild-cache", *args])) == 0
    sha = json.loads((env["teacher2"] / "model.json").read_text())["sha256"]
    assert read_manifest(cache)["key"]["teacher"]["sha256"] == sha
    assert json.loads((env["base"] / "runs" / "cli" / "model.json").read_text())["teacher"]["sha256"] == sha


def test_truncated_and_corrupt_shards_are_detected(env, fp32_cache, capsys):
    cfg_args = ("teacher.cache_dtype=fp32",)
    shard = "view-0001.rows-00000050.safetensors"
    # Same size, one flipped byte in the data region: only the checksum can tell.
    flipped = env["base"] / "flipped"
    shutil.copytree(fp32_cache, flipped)
    raw = bytearray((flipped / shard).read_bytes())
    raw[-5] ^= 0x40
    (flipped / shard).write_bytes(bytes(raw))
    cfg = _cfg(env, flipped, *cfg_args)
    data = build_data(cfg.data, cfg.seed, 0, 1, torch.device("cpu"))
    model, meta = load_teacher(cfg.teacher.checkpoint, "", 100, 3)
    teacher = open_cached_teacher(cfg, model, meta, data.train, "cpu")
    batch = data.train.batch_for(np.arange(32), 0)
    teacher(batch, batch.images)  # view 0 is intact
    batch = data.train.batch_for(np.arange(32), 1)
    with pytest.raises(CacheError, match=f"{shard}: cache shard checksum .* corrupt"):
        teacher(batch, batch.images)
    teacher.close()
    assert run_cli(lambda: cache_main(["verify", str(flipped)])) == 2
    assert "checksum" in capsys.readouterr().err
    # Truncated: refused when the run opens the cache, before any read.
    truncated = env["base"] / "truncated"
    shutil.copytree(fp32_cache, truncated)
    with open(truncated / shard, "r+b") as fh:
        fh.truncate(1000)
    cfg = _cfg(env, truncated, *cfg_args)
    with pytest.raises(CacheError, match=f"{shard}: cache shard is 1000 bytes, manifest says \\d+ .*truncated"):
        open_cached_teacher(cfg, model, meta, data.train, "cpu")


_KILLER = """
import os, signal, sys
from rrd_fast.cache import build_cache
from rrd_fast.config import load_config
phase, shard = sys.argv[1], int(sys.argv[2])
def fault(p, i):
    if (p, i) == (phase, shard):
        os.kill(os.getpid(), signal.SIGKILL)
build_cache(load_config(None, sys.argv[3:]), fault=fault)
"""


def _assert_same_cache(a: Path, b: Path) -> None:
    ma, mb = read_manifest(a), read_manifest(b)
    assert ma["complete"] and mb["complete"]
    assert ma["shards"] == mb["shards"]
    for name in ma["shards"]:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())


@pytest.mark.parametrize("phase,shard", [("tmp_written", 2), ("renamed", 4)])
def test_build_killed_mid_shard_resumes_to_the_same_cache(env, fp32_cache, phase, shard):
    cache = env["base"] / f"killed-{phase}"
    overrides = _overrides(env, cache, "teacher.cache_dtype=fp32")
    envvars = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _KILLER, phase, str(shard), *overrides], env=envvars,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    manifest = read_manifest(cache)
    assert not manifest["complete"] and len(manifest["shards"]) == shard
    leftovers = [p.name for p in cache.iterdir() if p.name != "manifest.json" and p.name not in manifest["shards"]]
    assert leftovers, "the kill should leave a half-finished shard behind"
    cfg = load_config(None, overrides)
    with pytest.raises(CacheError, match="never completed"):
        CacheReader(cache, manifest)
    with pytest.raises(CacheError, match="no complete teacher cache"):
        model, meta = load_teacher(cfg.teacher.checkpoint, "", 100, 3)
        open_cached_teacher(cfg, model, meta, None, "cpu", may_build=False)
    build_cache(cfg, log=lambda _: None)
    _assert_same_cache(cache, fp32_cache)


def test_build_interrupted_by_an_error_resumes(env, fp32_cache):
    cache = env["base"] / "raised"
    cfg = _cfg(env, cache, "teacher.cache_dtype=fp32")

    def fault(phase: str, index: int) -> None:
        if (phase, index) == ("recorded", 1):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_cache(cfg, fault=fault)
    assert len(read_manifest(cache)["shards"]) == 2
    built = []
    build_cache(cfg, log=built.append)
    assert "GiB per view" in built[0] and "resuming" in built[1] and "built 4 shards" in built[2]
    _assert_same_cache(cache, fp32_cache)


@pytest.mark.gpu
def test_cuda_cache_serves_prefetched_rows_on_device(env, tmp_path):
    """CUDA path: build on the GPU, pinned prefetch + non-blocking copies, outputs close to the online teacher."""
    cfg = _cfg(env, tmp_path / "cuda", "teacher.cache_dtype=fp16")
    device = torch.device("cuda")
    data = build_data(cfg.data, cfg.seed, 0, 1, device)
    model, meta = load_teacher(cfg.teacher.checkpoint, "", 100, 3)
    teacher = open_cached_teacher(cfg, model, meta, data.train, device)
    assert next(model.parameters()).device.type == "cpu"  # the caller's teacher never moved
    pipe = teacher.wrap(data.train)
    online = model.to(device, memory_format=torch.channels_last)
    for batch in pipe.epoch(3):
        assert batch.epoch == 1
        images = batch.images.contiguous(memory_format=torch.channels_last)
        out = teacher(batch, images)
        assert out.logits.device.type == "cuda" and out.logits.dtype == torch.float32
        with torch.no_grad():
            ref = online(images, features=True)
        torch.testing.assert_close(out.logits, ref.logits, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(out.pooled, ref.pooled, rtol=2e-3, atol=2e-3)
    teacher.close()


# -- manifest schema (CacheSpec) -------------------------------------------------------------

def _tiny_cache(folder: Path) -> dict:
    """A real 2-shard cache (6 samples, 1 view) written by the shard writer, without a teacher run."""
    from rrd_fast.cache.manifest import CACHE_FORMAT, write_manifest
    from rrd_fast.cache.shards import plan_shards, write_shard

    manifest = {"key": {"format": CACHE_FORMAT, "dtype": "fp32"}, "fields": ["logits"], "tensors": {"logits": [3]},
                "layout": {"num_samples": 6, "views": 1, "samples_per_shard": 4}, "shards": {}, "complete": True}
    for i, part in enumerate(plan_shards(6, 1, 4)):
        rows = part["stop"] - part["start"]
        entry = write_shard(folder / part["name"], {"logits": torch.arange(rows * 3.0).view(rows, 3)}, i)
        manifest["shards"][part["name"]] = {"view": 0, "start": part["start"], "stop": part["stop"], **entry}
    write_manifest(folder, manifest)
    return manifest


def _shard0(m: dict) -> dict:
    return m["shards"]["view-0000.rows-00000000.safetensors"]


@pytest.mark.parametrize("change, field", [
    pytest.param(lambda m: m.update(shards="x"), "'shards' is 'x' (str)", id="shards-str"),
    pytest.param(lambda m: m["layout"].update(num_samples=10**15), "'layout.num_samples' is 1000000000000000",
                 id="num-samples-huge"),
    pytest.param(lambda m: m["layout"].update(num_samples="6"), "'layout.num_samples' is '6' (str)", id="num-samples-str"),
    pytest.param(lambda m: m["layout"].update(samples_per_shard=1, num_samples=10**8),
                 "'layout.samples_per_shard' is 1", id="too-many-shards"),
    pytest.param(lambda m: m.update(complete="yes"), "'complete' is 'yes' (str), expected true or false", id="complete-str"),
    pytest.param(lambda m: m.update(complete=1), "'complete' is 1 (int)", id="complete-int"),
    pytest.param(lambda m: m.pop("complete"), "'complete' is missing", id="complete-missing"),
    pytest.param(lambda m: m["key"].update(dtype="fp64"), "'key.dtype' is 'fp64'", id="dtype"),
    pytest.param(lambda m: m.update(fields="logits"), "'fields' is 'logits' (str)", id="fields-str"),
    pytest.param(lambda m: m.update(tensors={"logits": [-3]}), "'tensors.logits' is [-3] (list)", id="tensor-shape"),
    pytest.param(lambda m: m["shards"].update({"../../etc/passwd": m["shards"].pop(next(iter(m["shards"])))}),
                 "'shards.../../etc/passwd'", id="shard-name"),
    pytest.param(lambda m: _shard0(m).update(stop="4"), "'shards.view-0000.rows-00000000.safetensors.stop' is '4'",
                 id="shard-stop-str"),
    pytest.param(lambda m: _shard0(m).update(stop=6), ".stop' is 6 (int), expected a row range of 1..4 rows",
                 id="shard-range"),
    pytest.param(lambda m: _shard0(m).update(sha256=None), ".sha256' is None", id="shard-sha"),
])
def test_bad_manifest_is_one_line_naming_the_field(tmp_path, capsys, change, field):
    manifest = _tiny_cache(tmp_path)
    assert run_cli(lambda: cache_main(["verify", str(tmp_path)])) == 0
    capsys.readouterr()
    change(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert run_cli(lambda: cache_main(["verify", str(tmp_path)])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'manifest.json'}: field " in err and field in err, err
    assert "--rebuild-cache" in err
    with pytest.raises(CacheError, match="field"):  # a manifest handed over in memory is validated as well
        CacheReader(tmp_path, manifest)


def test_manifest_shard_not_matching_its_planned_rows_is_refused(tmp_path):
    manifest = _tiny_cache(tmp_path)
    second = manifest["shards"]["view-0000.rows-00000004.safetensors"]
    second["start"], second["stop"] = 0, 2
    with pytest.raises(CacheError, match=r"rows-00000004\.safetensors records view 0 rows 0\.\.2, the layout plans "
                                         r"view 0 rows 4\.\.6"):
        CacheReader(tmp_path, manifest)


def test_valid_manifest_round_trips_through_cache_spec(fp32_cache):
    from rrd_fast.cache.manifest import CacheSpec

    raw = json.loads((fp32_cache / "manifest.json").read_text())
    spec = CacheSpec.from_dict(raw)
    assert spec.to_dict() == raw and read_manifest(fp32_cache) == raw
    assert spec.layout.num_samples == N_TRAIN and spec.layout.views == 2 and spec.complete and spec.dtype == "fp32"


def test_build_leaves_no_lock_file_and_the_lock_still_excludes(fp32_cache, tmp_path):
    from rrd_fast.cache.builder import LOCK_NAME, _build_lock

    assert read_manifest(fp32_cache)["complete"] and not (fp32_cache / LOCK_NAME).exists()  # after a real build
    folder = tmp_path / "cache"
    with _build_lock(folder):
        assert (folder / LOCK_NAME).is_file()
        with pytest.raises(CacheError, match="another process is building"):
            with _build_lock(folder):
                pass
    assert not (folder / LOCK_NAME).exists()
    (folder / LOCK_NAME).touch()  # left by a killed builder: taken over, then removed
    with _build_lock(folder):
        pass
    assert sorted(os.listdir(folder)) == []
