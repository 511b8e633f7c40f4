#!/usr/bin/env bash
# One-shot set-up: a virtual environment in .venv with rrd-fast and everything its tests need.
# On machines without an NVIDIA GPU, the CPU build of torch is installed first so that
# no multi-GB CUDA build is pulled in by the `torch` requirement. It also installs the real
# Fashion-MNIST (Debian's dataset-fashion-mnist) for the demo when it can (scripts/fashion_mnist.sh).
# The other packages are installed at the versions CI last passed with (scripts/constraints.txt,
# whose header says how to move them on).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fashion_mnist.sh
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
        .venv/bin/python -m pip install -q torch
    else
        .venv/bin/python -m pip install -q "torch==2.13.0"
    fi
fi
.venv/bin/python -m pip install -q -c scripts/constraints.txt -e ".[dev,onnx,dali]"
