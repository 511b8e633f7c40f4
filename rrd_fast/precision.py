"""Which low-precision types this machine computes natively, and what `train.mixed_precision: auto` means.

On a CPU, bf16 autocast is fast only with native bf16 instructions (AVX512_BF16 or AMX on x86,
the BF16 extension on Arm); elsewhere torch emulates it and it is several times slower than
fp32. `torch.backends.cpu.get_cpu_capability()` reports "AVX512" whether or not the CPU has
AVX512_BF16, so it cannot tell these apart; the CPU's own feature flags can.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch

# Feature flags (as /proc/cpuinfo spells them) that give native arithmetic for each type.
_NATIVE_FLAGS = {
    "bf16": {"avx512_bf16", "amx_bf16", "bf16"},  # x86 AVX-512 BF16 / AMX, Arm BF16 ("bf16" in Features)
    "fp16": {"avx512_fp16", "amx_fp16", "fphp", "asimdhp"},  # x86 AVX512-FP16 / AMX-FP16, Arm FP16
}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags from /proc/cpuinfo text (x86 'flags' or Arm 'Features'); empty if unknown."""
    if cpuinfo is None:
        path = Path("/proc/cpuinfo")
        cpuinfo = path.read_text(errors="replace") if path.is_file() else ""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def native_cpu_precisions(cpuinfo: str | None = None) -> set[str]:
    """The mixed-precision settings ('bf16', 'fp16') this CPU computes natively."""
    flags = cpu_flags(cpuinfo)
    return {name for name, wanted in _NATIVE_FLAGS.items() if flags & wanted}


def resolve_mixed_precision(setting: str, device: torch.device, cpuinfo: str | None = None) -> str:
    """`auto`: bf16 on GPUs that support it and on CPUs that compute it natively, fp32 ('no') otherwise."""
    if setting != "auto":
        return setting
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "no"
    return "bf16" if "bf16" in native_cpu_precisions(cpuinfo) else "no"


def warn_if_emulated(device: torch.device, mixed_precision: str, cpuinfo: str | None = None) -> bool:
    """Warn (and return True) when a CPU run asks for a low precision this CPU only emulates."""
    if device.type != "cpu" or mixed_precision not in _NATIVE_FLAGS:
        return False
    if mixed_precision in native_cpu_precisions(cpuinfo):
        return False
    warnings.warn(f"train.mixed_precision={mixed_precision}: this CPU has no native {mixed_precision} instructions, so "
                  f"{mixed_precision} autocast is emulated and several times slower than fp32; "
                  "train.mixed_precision=no (or auto) is faster here", stacklevel=2)
    return True
