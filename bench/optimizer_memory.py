"""Optimizer state bytes per parameter on the real SD1.5 UNet: bitsandbytes AdamW8bit against torch AdamW.

The UNet is built from SD1.5's config (random weights, float32, CPU), one optimizer step allocates the state,
and every state tensor is counted once (8-bit AdamW shares its quantile maps). Goal: <= 2.05 B/param for 8-bit.
"""

from __future__ import annotations

import gc
import logging
import time

from configs import SD15_UNET  # bench/ is on sys.path when a script runs


def state_bytes(optimizer) -> int:
    """Bytes of all tensors in the optimizer state, each storage counted once."""
    import torch

    storages = {}
    for state in optimizer.state.values():
        for value in state.values():
            if torch.is_tensor(value):
                storages[value.untyped_storage().data_ptr()] = value.untyped_storage().nbytes()
    return sum(storages.values())


def measure(name: str, make_optimizer, params: list) -> float:
    """One step of a fresh optimizer over params (gradients set to a constant); prints and returns B/param."""
    import torch

    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = make_optimizer(params)
    start = time.perf_counter()
    optimizer.step()
    seconds = time.perf_counter() - start
    n_params = sum(p.numel() for p in params)
    total = state_bytes(optimizer)
    per_param = total / n_params
    print(
        f"{name:<22} {total / 2**30:7.3f} GiB state  {per_param:6.3f} B/param  (first step {seconds:.1f} s)"
    )
    if name.startswith("bitsandbytes"):
        small = [p for p in params if optimizer.state[p]["state1"].dtype != torch.uint8]
        n_small = sum(p.numel() for p in small)
        print(
            f"{'':<22} {len(small)} of {len(params)} tensors ({n_small:,} values, {n_small / n_params:.4%}) are "
            "under 4096 values and keep 32-bit state"
        )
    del optimizer
    for p in params:
        p.grad = None
    gc.collect()
    return per_param


if __name__ == "__main__":
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import bitsandbytes as bnb
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET)
    params = [p for p in unet.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    print(f"SD1.5 UNet: {n_params:,} parameters ({n_params * 4 / 2**30:.2f} GiB float32), CPU")
    eight_bit = measure("bitsandbytes AdamW8bit", lambda ps: bnb.optim.AdamW8bit(ps, lr=1e-6), params)
    full = measure("torch AdamW", lambda ps: torch.optim.AdamW(ps, lr=1e-6, foreach=False), params)
    print(
        f"AdamW8bit: {eight_bit:.3f} B/param (goal <= 2.05); torch AdamW / AdamW8bit = {full / eight_bit:.2f}x"
    )
