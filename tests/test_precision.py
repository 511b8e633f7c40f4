"""Native low-precision detection: the CPU's feature flags, not torch's capability string."""

from __future__ import annotations

import warnings

import pytest
import torch

from rrd_fast.precision import native_cpu_precisions, resolve_mixed_precision, warn_if_emulated

# An AVX-512 Xeon without AVX512_BF16 (torch reports "AVX512" for it, as for the EPYC below).
XEON = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni\n"
EPYC = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512vl avx512_bf16 avx512_vnni\n"
SAPPHIRE = "flags\t\t: avx512f avx512_bf16 avx512_fp16 amx_bf16 amx_tile\n"
NEOVERSE = "processor\t: 0\nFeatures\t: fp asimd fphp asimdhp bf16 i8mm\n"


def test_native_types_come_from_the_flags() -> None:
    assert native_cpu_precisions(XEON) == set()
    assert native_cpu_precisions(EPYC) == {"bf16"}
    assert native_cpu_precisions(SAPPHIRE) == {"bf16", "fp16"}
    assert native_cpu_precisions(NEOVERSE) == {"bf16", "fp16"}


def test_bf16_on_avx512_without_bf16_warns_and_names_the_faster_setting() -> None:
    with pytest.warns(UserWarning, match="train.mixed_precision=no"):
        assert warn_if_emulated(torch.device("cpu"), "bf16", XEON)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_emulated(torch.device("cpu"), "bf16", EPYC)
        assert not warn_if_emulated(torch.device("cpu"), "no", XEON)
    with pytest.warns(UserWarning, match="no native fp16"):
        warn_if_emulated(torch.device("cpu"), "fp16", EPYC)


def test_auto_precision_follows_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert resolve_mixed_precision("auto", cpu, XEON) == "no"
    assert resolve_mixed_precision("auto", cpu, EPYC) == "bf16"
    assert resolve_mixed_precision("fp16", cpu, XEON) == "fp16"
