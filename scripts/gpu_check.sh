#!/usr/bin/env bash
# GPU checks: the gpu-marked tests and GPU benchmarks, one section per area. Run on a
# machine with an NVIDIA GPU, after scripts/setup.sh or on the lent device machine as it is
# (its python3 holds a CUDA torch; DALI comes through scripts/device_wheels.sh, whose
# install folder is put on PYTHONPATH here). Every section runs even when an earlier one
# fails; the summary at the end names the failed ones and the exit code is non-zero. With
# $OUT set (the device tool), the whole log is also written to $OUT/gpu_check.log.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
SITE=${RRD_DEVICE_SITE:-/tmp/rrd-site}
if [ -d "$SITE" ]; then
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    for lib in "$SITE"/nvidia/*/lib; do  # nvJPEG and nvCOMP from the carried wheels, for DALI's loader
        [ -d "$lib" ] && export LD_LIBRARY_PATH="$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    done
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # the project itself, where it is not pip-installed (device)
if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
    exec > >(tee -a "$OUT/gpu_check.log") 2>&1
fi
export PYTHONUNBUFFERED=1
"$PY" -c "import torch; print('gpu_check: torch', torch.__version__, 'CUDA', torch.version.cuda, 'devices', torch.cuda.device_count())"
if ! "$PY" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: no CUDA device is visible to $PY's torch; these checks need one" >&2
    exit 2
fi

FAILED=()
section() {  # section NAME FUNCTION: run it with errexit in a subshell, record a failure, go on
    local name=$1 start=$SECONDS status
    echo "=== gpu_check: $name"
    (set -e; "$2")  # not inside `if`: bash would ignore errexit there
    status=$?
    if [ "$status" = 0 ]; then
        echo "=== gpu_check: $name passed in $((SECONDS - start)) s"
    else
        echo "=== gpu_check: $name FAILED (exit $status) after $((SECONDS - start)) s"
        FAILED+=("$name")
    fi
}

# pipelines
# DALI with a GPU-resident source and nvJPEG ("mixed") decode, half-precision outputs; then
# the GPU benchmark: 32x32 in-memory arrays (target >= 1M img/s) and 224x224 random-resized
# crops from JPEG (target >= 20k img/s), recorded in the auto table. About a minute.
pipelines_on_gpu() {
    if ! "$PY" -c "import nvidia.dali" >/dev/null 2>&1; then
        echo "pipelines: NVIDIA DALI is not importable; on the device machine run scripts/device_wheels.sh first"
        return 1
    fi
    "$PY" -m pytest -q -m gpu tests/test_dali_arrays.py tests/test_dali_files.py tests/test_dali_train.py
    "$PY" -m rrd_fast.bench pipelines --device cuda --sections arrays,jpeg224 --repeats 3 --warmup 3 --batch 256 --array-batch 1024 \
        --batches 40 --workers 8 --jpeg224-images 4096 --dali-lanes 1,2,4 --dali-sequence --write-auto-table --targets
    if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then cp pipelines/auto_backend.json "$OUT/auto_backend.json"; fi
}
section pipelines pipelines_on_gpu

# export
# Exporters on the GPU (Torch-TensorRT fp32/fp16/int8, ONNX Runtime CUDA provider, AOTInductor
# on CUDA, eager fp16), then the GPU bench: a randomly initialised resnet8x4 on a synthetic
# CIFAR-100 split, TensorRT fp16 against eager fp16 at batch 1 and 256. Without torch_tensorrt
# the bench falls back to ONNX Runtime (CUDA provider) and AOTInductor. About two minutes.
export_on_gpu() {
    EXPORT_TMP=$(mktemp -d)
    trap 'rm -rf "$EXPORT_TMP"' EXIT
    "$PY" -m pytest -q -m gpu tests/test_export_gpu.py
    "$PY" - "$EXPORT_TMP" <<'PYEOF'
import sys
from pathlib import Path

import torch

from pipelines.synthetic import write_cifar100
from rrd_fast.checkpoint import write_model_checkpoint
from rrd_fast.models import create_model

root = Path(sys.argv[1])
data = write_cifar100(root / "cifar", n_train=512, n_test=2000)
torch.manual_seed(0)
write_model_checkpoint(root / "resnet8x4", create_model("resnet8x4", num_classes=100, in_channels=3).eval(), {
    "arch": "resnet8x4", "num_classes": 100, "in_channels": 3, "image_size": 32,
    "normalization": {"mean": [0.5071, 0.4867, 0.4408], "std": [0.2675, 0.2565, 0.2761]},
    "dataset": {"format": "cifar100", "root": str(data)},
    "method": {"name": "random-init", "gamma": 1.0, "alpha": 0.0, "beta": 0.0, "options": {}},
})
PYEOF
    if "$PY" -c "import torch_tensorrt" >/dev/null 2>&1; then
        EXPORT_BACKENDS=eager,tensorrt
    else
        echo "export: torch_tensorrt is not importable here; benchmarking onnxruntime (CUDA) and aotinductor instead"
        EXPORT_BACKENDS=eager,onnxruntime,aotinductor
    fi
    "$PY" -m export.bench "$EXPORT_TMP/resnet8x4" --device cuda --backends "$EXPORT_BACKENDS" --precisions fp16 \
        --batch-sizes 1,256 --skip-unsupported --warmup 20 --iters 200 --budget 2 --out "$EXPORT_TMP/bench"
    cat "$EXPORT_TMP/bench/bench.md"
    if [ -n "${OUT:-}" ] && [ -d "${OUT}" ]; then
        mkdir -p "$OUT/export"
        cp "$EXPORT_TMP"/bench/bench.{json,md,png} "$OUT/export/"
    fi
}
section export export_on_gpu

# trainer and cache
# The torch pipeline with the split on the GPU and the teacher cache's pinned, non-blocking reads.
trainer_and_cache_on_gpu() {
    "$PY" -m pytest -q -m gpu tests/test_torch_pipeline.py tests/test_cache.py
}
section "trainer and cache" trainer_and_cache_on_gpu

# compiled step: no device sync inside a CUDA step (sync debug mode "error")
compiled_step_on_gpu() {
    "$PY" -m pytest -q -m gpu tests/test_compile.py tests/test_bench_compile.py
}
section "compiled step" compiled_step_on_gpu

# compiled step benchmark (issue 17): resnet32x4 -> resnet8x4 at the paper's batch 64, bf16, channels_last,
# eager against each compile mode in steps/s, with the cache build's and evaluation's passes and the
# projected 240-epoch CIFAR-100 run (32-view cache build + training + evaluation + compile). Every compiled
# graph costs tens of seconds, so max-autotune, whose autotuning may take minutes, runs on its own, last;
# each part keeps its JSON in $OUT (rewritten as groups finish). About eight minutes.
compiled_step_bench_on_gpu() {
    local out=${OUT:-$(mktemp -d)}
    timeout 330 "$PY" -m rrd_fast.bench compile --device cuda --models resnet32x4:resnet8x4 --batch-sizes 64 \
        --precisions bf16 --modes default reduce-overhead --rounds 3 --steps 50 --project --trajectory-steps 0 \
        --no-start-up --out "$out/bench_compile.json"
    timeout 200 "$PY" -m rrd_fast.bench compile --device cuda --models resnet32x4:resnet8x4 --batch-sizes 64 \
        --precisions bf16 --modes max-autotune --rounds 3 --steps 50 --project --trajectory-steps 0 \
        --no-start-up --out "$out/bench_compile_max_autotune.json"
}
section "compiled step benchmark" compiled_step_bench_on_gpu

if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_check: FAILED: ${FAILED[*]}"
    exit 1
fi
echo "gpu_check: every section passed"
