"""A GPU's memory budget: what torch reports usable per GPU size, the allowance over the tensor peak, the verdict.

The same rule judges bench/memory.py's estimates and bench/gpu_step.py's measurements.
"""

from __future__ import annotations

from memory_bytes import GIB

__all__ = ["CONTEXT_GIB", "FITS", "FRAGMENTATION", "USABLE_GIB", "allowance", "usable_gib", "verdict"]

# What torch reports as a GPU's total memory, for the sizes presets name (GiB): Colab's T4 (diffusers #4872's log
# shows "14.75 GiB total capacity"), and the smallest common 24 GB cards (A10G / L4 report about 22 GiB; an RTX
# 3090 / 4090 reports 23.6).
USABLE_GIB = {16: 14.75, 24: 22.0}
CONTEXT_GIB = 1.0  # CUDA context, cuBLAS / cuDNN workspaces
FRAGMENTATION = 0.10  # caching-allocator rounding and fragmentation, on top of the tensor peak
FITS = 0.85  # "fits" leaves this much of the usable memory as margin for the estimate's own error


def allowance(tensor_peak: int) -> int:
    """Bytes beyond the tensors: the CUDA context and workspaces, and the caching allocator's share."""
    return int(CONTEXT_GIB * GIB + FRAGMENTATION * tensor_peak)


def usable_gib(gpu_gib: float) -> float:
    return USABLE_GIB.get(int(gpu_gib), gpu_gib * 0.92)


def verdict(estimate: int, gpu_gib: float) -> str:
    """fits (<= FITS of the usable memory), tight (<= all of it) or does not fit."""
    usable = usable_gib(gpu_gib) * GIB
    if estimate <= FITS * usable:
        return "fits"
    if estimate <= usable:
        return "tight"
    return "does not fit"
