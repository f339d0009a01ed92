"""Exact byte counts: weights per dtype and AdamW / AdamW8bit optimizer state, per part of the real configs.

Counted from parameter shapes alone (meta-device models), so nothing is allocated, measured or extrapolated.
"""

from __future__ import annotations

from models import ARCH_LABEL, ARCHS, build_text, build_unet, build_vae

__all__ = ["GIB", "adamw8bit_state_bytes", "component_table", "gib", "nbytes", "optimizer_state_bytes"]

GIB = 2**30


def gib(n: int | None) -> str:
    """Bytes as GiB for the reports, two decimals ("n/a" for None)."""
    return "n/a" if n is None else f"{n / GIB:.2f}"


def nbytes(params, dtype_size: int) -> int:
    return sum(p.numel() for p in params) * dtype_size


def adamw8bit_state_bytes(params) -> int:
    """bitsandbytes AdamW8bit state: tensors of >= 4096 values keep two uint8 states and one fp32 absmax per
    256-value block each; smaller tensors keep two fp32 states; plus the two shared 256-entry fp32 quantile maps."""
    total = 2 * 256 * 4
    for p in params:
        n = p.numel()
        if n < 4096:
            total += 8 * n
        else:
            total += 2 * (n + 4 * -(-n // 256))
    return total


def optimizer_state_bytes(optimizer: str, params) -> int:
    if optimizer == "adamw8bit":
        return adamw8bit_state_bytes(params)
    if optimizer == "adamw":
        return nbytes(params, 8)
    raise ValueError(f"unknown optimizer {optimizer!r}")


def component_table() -> list[tuple]:
    """Per part of SD1.5 and SDXL: (model, part, parameters, fp32, fp16/bf16, AdamW8bit and AdamW state bytes)."""
    rows = []
    for arch in ("sd", "sdxl"):
        label = ARCH_LABEL[arch]
        modules = [("UNet", build_unet(arch)), ("VAE", build_vae(arch))]
        modules += [(name, build_text(cfg, proj)) for name, cfg, proj in ARCHS[arch].texts]
        for name, module in modules:
            params = list(module.parameters())
            n = sum(p.numel() for p in params)
            rows.append((label, name, n, n * 4, n * 2, adamw8bit_state_bytes(params), n * 8))
    return rows
