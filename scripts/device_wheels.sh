#!/usr/bin/env bash
# Bring NVIDIA DALI to the lent GPU machine for scripts/gpu_check.sh.
#
# That machine reaches no package index and has no DALI, and one device call carries at most
# 64 MiB, while DALI for CUDA 13 (the machine's torch is a cu130 build) and what it needs weigh
# about 250 MB. So the wheels are cut into parts here and sent one part per call, back to back:
# a warm machine keeps /tmp between calls (it goes back after 30 s idle, so do not pause).
#
#   here:           bash scripts/device_wheels.sh pack        # downloads, writes .devparts/part_NN + SHA256SUMS
#   device, each N: carry [".devparts/part_NN", ".devparts/SHA256SUMS"], command:
#                   bash scripts/device_wheels.sh stash
#   device, last:   bash scripts/device_wheels.sh install && bash scripts/gpu_check.sh
#
# `install` checks the parts against SHA256SUMS, installs into $RRD_DEVICE_SITE (default
# /tmp/rrd-site) with pip --target, and gpu_check.sh puts that folder on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."

PARTS=.devparts
STASH=${RRD_DEVICE_STASH:-/tmp/rrd-devparts}
SITE=${RRD_DEVICE_SITE:-/tmp/rrd-site}
PY=${PYTHON:-python3}  # the device image's python3 holds its torch
PART_BYTES=${RRD_PART_BYTES:-62914560}  # 60 MiB: a part plus the working tree stays under 64 MiB
# DALI 2.4 for CUDA 13 and the packages it needs that the device image lacks (numpy, six,
# packaging, pyyaml and typing-extensions are there). nvjpeg is pinned to the driver's CUDA 13.0.
WHEELS=(
    "nvidia-dali-cuda130==2.4.0"
    "nvidia-nvimgcodec-cu13==0.9.0.20"
    "nvidia-libnvcomp-cu13==5.3.0.16"
    "nvidia-nvjpeg==13.0.4.44"
    "astunparse==1.6.3" "gast==0.7.0" "optree==0.20.0" "nvtx==0.2.17" "makefun==1.16.0" "libcst==1.9.0"
)

pack() {
    local download
    download=$(mktemp -d)
    trap 'rm -rf "$download"' RETURN
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
        --platform manylinux2014_x86_64 -d "$download" "${WHEELS[@]}"
    rm -rf "$PARTS"
    mkdir -p "$PARTS"
    tar -C "$download" -cf - . | split -b "$PART_BYTES" -d -a 2 - "$PARTS/part_"
    (cd "$PARTS" && sha256sum part_* >SHA256SUMS)
    local n
    n=$(ls "$PARTS"/part_* | wc -l)
    echo "device_wheels: $(du -sh "$download" | cut -f1) of wheels in $n parts under $PARTS/:"
    ls -l "$PARTS"
}

stash() {
    mkdir -p "$STASH"
    local found=0
    for part in "$PARTS"/part_* "$PARTS"/SHA256SUMS; do
        [ -f "$part" ] || continue
        cp "$part" "$STASH/"
        found=1
    done
    [ "$found" = 1 ] || { echo "device_wheels: no $PARTS/part_NN here; name one in carry" >&2; exit 2; }
    echo "device_wheels: stashed so far: $(cd "$STASH" && ls part_* | tr '\n' ' ')"
}

install() {
    [ -f "$STASH/SHA256SUMS" ] || { echo "device_wheels: $STASH/SHA256SUMS missing; stash the parts first" >&2; exit 2; }
    (cd "$STASH" && sha256sum --quiet -c SHA256SUMS) \
        || { echo "device_wheels: a part in $STASH is missing or damaged; stash it again" >&2; exit 2; }
    local unpacked
    unpacked=$(mktemp -d)
    trap 'rm -rf "$unpacked"' RETURN
    cat "$STASH"/part_* | tar -C "$unpacked" -xf -
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" "$unpacked"/*.whl
    PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c "import nvidia.dali as d; print('device_wheels: DALI', d.__version__, 'in $SITE')"
}

case "${1:-}" in
    pack) pack ;;
    stash) stash ;;
    install) install ;;
    *) echo "usage: bash scripts/device_wheels.sh pack|stash|install" >&2; exit 2 ;;
esac
