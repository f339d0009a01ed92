"""Worker tasks per preset: its step and caching pass, checkpointing flipped, and settings that would fit.

Each runs in a spawned worker process of bench/memory.py or bench/gpu_step.py and returns plain results.
"""

from __future__ import annotations

import dataclasses
import logging

from memory_budget import verdict
from memory_step import Setup, StepMemory, simulate_caching, simulate_step

__all__ = ["EVERYDREAM2_T4", "estimate_task", "preset_task", "replace", "step_task", "variants"]


def variants(setup: Setup) -> list[tuple[str, Setup]]:
    """Settings to try when a preset does not fit: checkpointing, smaller batches, a smaller LoRA rank, and for
    full fine-tunes weights without an fp32 master copy (kohya's --full_bf16 / --full_fp16)."""
    out = []
    if not setup.gradient_checkpointing:
        out.append(("gradient_checkpointing=True", replace(setup, gradient_checkpointing=True)))
    batch = setup.batch_size
    while batch > 1:
        batch //= 2
        out.append(
            (
                f"gradient_checkpointing=True, batch_size={batch}",
                replace(setup, gradient_checkpointing=True, batch_size=batch),
            )
        )
    if setup.lora_rank > 4:
        out.append((f"lora_rank={setup.lora_rank // 2}", replace(setup, lora_rank=setup.lora_rank // 2)))
    if not setup.lora_rank:
        out.append(
            (
                f"{setup.mixed_precision} weights, no fp32 master copy (not an edtools option yet)",
                replace(setup, half_weights=True),
            )
        )
    return out


def replace(setup: Setup, **changes) -> Setup:
    return dataclasses.replace(setup, **changes)


# The configuration EveryDream2 documents for SD1.x on a T4: full UNet + text encoder, AMP (fp16), gradient
# checkpointing, AdamW8bit, no latent cache (the VAE stays on the GPU and encodes each batch).
EVERYDREAM2_T4 = Setup(
    "sd", 512, 8, "fp16", True, train_text_encoder=True, cache_latents=False, cache_text_embeddings=False
)


def preset_task(name: str, quick: bool) -> dict:
    """Everything one preset needs: its step and caching pass, the step with checkpointing flipped, and settings
    that would fit if it does not (run in a worker process)."""
    import resource

    import torch

    from edtools.presets import PRESETS

    torch.set_num_threads(1)  # fake tensors compute nothing
    preset = PRESETS[name]
    simulated: dict[str, StepMemory] = {}

    def step_for(setup: Setup) -> StepMemory:
        key = repr(setup)
        if key not in simulated:
            simulated[key] = simulate_step(setup)
        return simulated[key]

    setup = Setup.from_preset(preset)
    out = {"step": step_for(setup)}
    out["caching"] = simulate_caching(setup, out["step"])
    if not quick:
        flipped = replace(setup, gradient_checkpointing=not setup.gradient_checkpointing)
        out["alternative"] = step_for(flipped)
        if verdict(max(out["step"].estimate, out["caching"].estimate), preset.gpu_gib) != "fits":
            out["fixes"] = []
            for label, candidate in variants(setup):
                step = step_for(candidate)
                cache = simulate_caching(candidate, step)
                out["fixes"].append((label, step, cache))
                if verdict(max(step.estimate, cache.estimate), preset.gpu_gib) == "fits":
                    break
    out["rss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return out


def step_task(setup: Setup, attention: str = "efficient") -> StepMemory:
    import torch

    torch.set_num_threads(1)
    return simulate_step(setup, attention)


def estimate_task(name: str) -> dict:
    """bench/memory.py's estimate of one preset's training step (fake tensors; run in a worker process)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(1)
    from edtools.presets import PRESETS

    step = simulate_step(Setup.from_preset(PRESETS[name]))
    return {
        "weights": dict(step.weights),
        "optimizer": step.optimizer,
        "step_peak": step.step_peak,
        "tensor_peak": step.tensor_peak,
        "estimate": step.estimate,
    }
