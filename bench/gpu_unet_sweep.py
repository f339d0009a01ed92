"""--unet: a hand-written SD1.5 UNet training step swept over batch 1/4/8, fp16/bf16 and checkpointing off/on.

Reports images/s, ms/step, peak memory and model FLOPs utilisation against the GPU's data-sheet peak.
"""

from __future__ import annotations

import argparse
import re
import time

from configs import SD15_UNET  # bench/ is on sys.path when a script runs
from gpu_preset import synchronize
from models import TEXT_TOKENS

__all__ = ["PEAK_TFLOPS", "SMOKE_UNET", "flops_per_image", "peak_tflops", "run_unet_sweep", "unet_step"]

# Only for --smoke: the same code on the CPU with a small UNet, to check the script without a GPU.
SMOKE_UNET = {
    **SD15_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
}

# Dense fp16/bf16 tensor-core peaks (TFLOP/s) from the vendors' data sheets; first match on the device name wins.
PEAK_TFLOPS = (
    (r"H200", 989.4),
    (r"H100.*PCIe", 756.0),
    (r"H100.*NVL", 835.0),
    (r"H100", 989.4),
    (r"A100", 312.0),
    (r"L40S", 362.0),
    (r"\bL4\b", 121.0),
    (r"A10G", 70.0),
    (r"\bA10\b", 125.0),
    (r"V100", 125.0),
    (r"\bT4\b", 65.0),
)


def peak_tflops(device_name: str) -> float | None:
    for pattern, value in PEAK_TFLOPS:
        if re.search(pattern, device_name):
            return value
    return None


def unet_optimizer(params):
    import bitsandbytes as bnb

    return bnb.optim.AdamW8bit(params, lr=1e-6, weight_decay=0.01)


def unet_batch(batch: int, resolution: int, cross_dim: int, device):
    import torch

    side = resolution // 8
    latents = torch.randn(batch, 4, side, side, device=device)
    timesteps = torch.randint(0, 1000, (batch,), device=device)
    hidden = torch.randn(batch, TEXT_TOKENS, cross_dim, device=device)
    return latents, timesteps, hidden


def unet_step(unet, optimizer, scaler, batch, dtype, params) -> None:
    """edtools' step on the UNet alone: autocast forward, MSE to the noise, (scaled) backward, clip 1.0, step."""
    import torch

    latents, timesteps, hidden = batch
    noise = torch.randn_like(latents)
    with torch.autocast(device_type=latents.device.type, dtype=dtype):
        pred = unet(latents + noise, timesteps, hidden).sample
    loss = torch.nn.functional.mse_loss(pred.float(), noise)
    if scaler.is_enabled():
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flops_per_image(unet, resolution: int, cross_dim: int, device) -> float:
    """Model FLOPs of one forward + backward of one image (counted once, no checkpoint recomputation)."""
    from torch.utils.flop_counter import FlopCounterMode

    unet.disable_gradient_checkpointing()
    latents, timesteps, hidden = unet_batch(1, resolution, cross_dim, device)
    counter = FlopCounterMode(display=False)
    with counter:
        unet(latents, timesteps, hidden).sample.float().pow(2).mean().backward()
    unet.zero_grad(set_to_none=True)
    synchronize(device)
    return float(counter.get_total_flops())


def run_unet_sweep(args: argparse.Namespace, device) -> None:
    import torch
    from diffusers import UNet2DConditionModel

    if args.smoke:
        config, resolution = SMOKE_UNET, 64
        print("SMOKE RUN on the CPU with a small UNet at 64 px: checks the script, the numbers mean nothing")
    else:
        config, resolution = SD15_UNET, args.resolution
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    bf16_ok = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)

    torch.manual_seed(0)
    with torch.device(device):  # random init on the GPU: seconds instead of minutes on the CPU
        unet = UNet2DConditionModel(**config)
    unet.train()
    params = list(unet.parameters())
    n_params = sum(p.numel() for p in params)
    cross_dim = config["cross_attention_dim"]
    flops = flops_per_image(unet, resolution, cross_dim, device)
    print(
        f"{name}: UNet {n_params / 1e6:.0f}M parameters, {resolution} px (latents {resolution // 8}x{resolution // 8}), "
        f"{flops / 1e9:,.1f} GFLOP per image per step (forward + backward); peak "
        + (f"{peak:g} TFLOP/s dense fp16/bf16" if peak else "unknown: pass --peak-tflops for MFU")
    )
    print(f"torch {torch.__version__}, AdamW8bit, float32 weights under autocast, SDPA attention, clip 1.0")
    print(
        f"{'precision':<9} {'checkpointing':<13} {'batch':>5} {'images/s':>9} {'ms/step':>8} "
        f"{'peak VRAM GiB':>13} {'MFU':>6}"
    )
    for precision in args.precisions:
        if precision == "bf16" and not bf16_ok:
            print(f"{precision:<9} skipped: this GPU has no bfloat16 tensor cores")
            continue
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        for checkpointing in (False, True):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            else:
                unet.disable_gradient_checkpointing()
            for batch_size in args.batches:
                row = f"{precision:<9} {'on' if checkpointing else 'off':<13} {batch_size:>5}"
                optimizer = scaler = None
                try:
                    optimizer = unet_optimizer(params)
                    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
                    batch = unet_batch(batch_size, resolution, cross_dim, device)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats(device)
                    for _ in range(args.warmup):  # allocates the optimizer state, warms the kernels
                        unet_step(unet, optimizer, scaler, batch, dtype, params)
                    synchronize(device)
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        unet_step(unet, optimizer, scaler, batch, dtype, params)
                    synchronize(device)
                    seconds = (time.perf_counter() - start) / args.steps
                except torch.cuda.OutOfMemoryError:
                    print(f"{row} out of memory")
                    continue
                finally:
                    del optimizer, scaler
                    unet.zero_grad(set_to_none=True)
                images_per_s = batch_size / seconds
                vram = (
                    torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
                )
                mfu = f"{flops * images_per_s / (peak * 1e12):6.1%}" if peak else "   n/a"
                print(f"{row} {images_per_s:9.2f} {seconds * 1e3:8.1f} {vram:13.2f} {mfu}")
