"""Settings sized for a GPU: named presets (a free Colab T4 has 16 GB, fp16 only) and the defaults that
depend on the device (precision, gradient checkpointing, resolution), as plain functions over plain values.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Literal, TypeVar

from .errors import ConfigError
from .models.families import family

# auto_settings takes and returns a config.TrainConfig; config imports this module, so it is not named here
_Config = TypeVar("_Config")

__all__ = ["PRESETS", "PRESET_NAMES", "Preset", "auto_precision", "auto_settings", "choose_preset"]

# A "T4-sized" GPU: at most this much memory (Colab's T4 reports 15 GiB), and no bfloat16.
SMALL_GPU_GIB = 16.0


@dataclass(frozen=True)
class Preset:
    """TrainConfig settings for one kind of run on one size of GPU; the user's own settings win."""

    name: str
    # the model family's name (models.families); a preset may name a family registered later (its presets
    # are only chosen once it is)
    architecture: Literal["sd", "sdxl", "sd3", "flux"]
    gpu_gib: float  # the GPU memory it is sized for
    summary: str  # what it trains and why these settings, for a person
    settings: Mapping[str, Any]
    # GPU memory at the peak (GiB) of a training step and of the caching pass before it: estimates of
    # bench/memory.py / bench/memory_flow.py (exact byte counts and a traced step of the real configs), not GPU
    # measurements
    estimated_gib: tuple[float, float] = (0.0, 0.0)
    # the Colab runtime it is sized for, in words ("a T4", "an L4 (24 GB)")
    runtime: str = ""
    # whether the model trains only in bfloat16 (Flux: fp16 gives NaNs or empty LoRAs), so no T4
    needs_bf16: bool = False


def _preset(
    name: str,
    architecture: str,
    gpu_gib: float,
    estimated_gib: tuple[float, float],
    summary: str,
    runtime: str = "",
    needs_bf16: bool = False,
    **settings: Any,
) -> Preset:
    return Preset(
        name, architecture, gpu_gib, summary, MappingProxyType(settings), estimated_gib, runtime, needs_bf16
    )


# Every preset keeps the frozen parts out of the way: cached latents (the VAE encodes each image once) and,
# with frozen text encoders, cached caption embeddings. T4 presets use fp16 (no bf16 on a T4).
_T4 = dict(mixed_precision="fp16", gradient_checkpointing=True, optimizer="adamw8bit", cache_latents="memory")
_BIG = dict(mixed_precision="bf16", optimizer="adamw8bit", cache_latents="memory")
_FROZEN_TEXT = dict(train_text_encoder=False, train_text_encoder_2=False, cache_text_embeddings=True)

PRESETS: Mapping[str, Preset] = MappingProxyType(
    {
        p.name: p
        for p in (
            _preset(
                "sd15-full-t4",
                "sd",
                16,
                (11.2, 5.54),
                "SD 1.x/2.x full fine-tune on a 16 GB T4: UNet and text encoder, 512 px, batch 4, fp16 with "
                "gradient checkpointing and 8-bit AdamW (EveryDream2 trains SD 1.x fully on a T4 this way)",
                runtime="a T4 (16 GB)",
                resolution=512,
                batch_size=4,
                lora_rank=0,
                train_text_encoder=True,
                lr=1e-6,
                **_T4,
            ),
            _preset(
                "sd15-lora-t4",
                "sd",
                16,
                (4.29, 3.59),
                "SD 1.x/2.x LoRA (rank 32) on a 16 GB T4: 512 px, batch 4, frozen text encoder with cached "
                "caption embeddings, fp16 with gradient checkpointing",
                runtime="a T4 (16 GB)",
                resolution=512,
                batch_size=4,
                lora_rank=32,
                lora_alpha=16.0,
                lora_lr=1e-4,
                **_T4,
                **_FROZEN_TEXT,
            ),
            _preset(
                "sdxl-lora-t4",
                "sdxl",
                16,
                (7.35, 11.22),
                "SDXL LoRA (rank 16, UNet only) on a 16 GB T4: 1024 px, batch 1, frozen fp16 base weights, "
                "cached latents and text-encoder outputs, gradient checkpointing (kohya trains SDXL LoRA in 8-10 GB "
                "this way)",
                runtime="a T4 (16 GB)",
                resolution=1024,
                batch_size=1,
                lora_rank=16,
                lora_alpha=8.0,
                lora_lr=1e-4,
                **_T4,
                **_FROZEN_TEXT,
            ),
            _preset(
                "sd15-full-24gb",
                "sd",
                24,
                (11.84, 5.54),
                "SD 1.x/2.x full fine-tune on a 24 GB GPU: UNet and text encoder, 512 px, batch 8, bf16 with "
                "gradient checkpointing (without it batch 8 needs about 20 of the 22 usable GB)",
                runtime="an L4 (24 GB)",
                resolution=512,
                batch_size=8,
                lora_rank=0,
                train_text_encoder=True,
                lr=1e-6,
                gradient_checkpointing=True,
                **_BIG,
            ),
            _preset(
                "sdxl-lora-24gb",
                "sdxl",
                24,
                (10.11, 11.39),
                "SDXL LoRA (rank 32) on a 24 GB GPU: 1024 px, batch 4, bf16, gradient checkpointing, cached "
                "text-encoder outputs",
                runtime="an L4 (24 GB)",
                resolution=1024,
                batch_size=4,
                lora_rank=32,
                lora_alpha=16.0,
                lora_lr=1e-4,
                gradient_checkpointing=True,
                **_BIG,
                **_FROZEN_TEXT,
            ),
            _preset(
                "sdxl-full-40gb",
                "sdxl",
                40,
                (28.05, 16.3),
                "SDXL full UNet fine-tune on a 40 GB or larger GPU: 1024 px, batch 2, bf16, gradient checkpointing, "
                "8-bit AdamW, frozen text encoders with cached outputs (float32 weights and gradients alone take "
                "19 GB: on 24 GB train SDXL as LoRA)",
                runtime="an A100 (40 GB)",
                resolution=1024,
                batch_size=2,
                lora_rank=0,
                lr=1e-6,
                gradient_checkpointing=True,
                **_BIG,
                **_FROZEN_TEXT,
            ),
            _preset(
                "sd35m-lora-t4",
                "sd3",
                16,
                (6.56, 11.22),
                "SD3.5 Medium LoRA (rank 16, transformer only) on a 16 GB T4: it fits a free Colab T4. 1024 px, "
                "batch 1, frozen fp16 base weights, cached latents and text-encoder outputs (T5-XXL loaded in "
                "8-bit to encode the captions, then freed), gradient checkpointing, 8-bit AdamW (SD3.5 Large "
                "needs a bigger GPU)",
                runtime="a T4 (16 GB)",
                resolution=1024,
                batch_size=1,
                lora_rank=16,
                lora_alpha=16.0,
                lora_lr=1e-4,
                t5="8bit",
                **_T4,
                **_FROZEN_TEXT,
            ),
            _preset(
                "flux-lora-24gb",
                "flux",
                24,
                (11.04, 17.85),
                "Flux.1 LoRA (rank 16) on a 24 GB L4: QLoRA, the frozen transformer in 4-bit NF4 "
                "(quantize_base nf4), bf16, 1024 px, batch 1, gradient checkpointing, cached latents and "
                "text-encoder outputs (Flux needs bf16: fp16 gives NaNs or empty LoRAs, so no T4)",
                runtime="an L4 (24 GB)",
                needs_bf16=True,
                resolution=1024,
                batch_size=1,
                lora_rank=16,
                lora_alpha=16.0,
                lora_lr=1e-4,
                quantize_base="nf4",
                gradient_checkpointing=True,
                **_BIG,
                **_FROZEN_TEXT,
            ),
            _preset(
                "flux-lora-40gb",
                "flux",
                40,
                (29.02, 28.90),
                "Flux.1 LoRA (rank 16) on a 40 GB A100: the frozen transformer in bf16 (no quantisation), "
                "1024 px, batch 1, gradient checkpointing, cached latents and text-encoder outputs",
                runtime="an A100 (40 GB)",
                needs_bf16=True,
                resolution=1024,
                batch_size=1,
                lora_rank=16,
                lora_alpha=16.0,
                lora_lr=1e-4,
                gradient_checkpointing=True,
                **_BIG,
                **_FROZEN_TEXT,
            ),
        )
    }
)
PRESET_NAMES = tuple(PRESETS)


def choose_preset(
    architecture: str, gpu_gib: float | None, *, lora: bool | None = None, bf16: bool | None = None
) -> tuple[Preset | None, str]:
    """The preset for this model on this GPU, and why, in words: the one sized for the largest GPU that this
    one matches. lora None: a full fine-tune where one fits, else LoRA. bf16: whether the GPU has bfloat16
    (None: judged by its size, a T4-sized GPU has not); presets that need it are left out where it lacks it.
    No GPU: no preset (the CPU only suits tiny models)."""
    if gpu_gib is None:
        return None, "no GPU: no preset (training on the CPU only suits the tiny test models)"
    model_family = family(architecture)
    has_bf16 = gpu_gib > SMALL_GPU_GIB if bf16 is None else bf16
    ours = [p for p in PRESETS.values() if _family_of(p) is model_family]
    usable = [p for p in ours if has_bf16 or not p.needs_bf16]

    def best(want_lora: bool) -> Preset | None:
        fitting = [p for p in usable if (p.settings["lora_rank"] > 0) == want_lora and _fits(p, gpu_gib)]
        return max(fitting, key=lambda p: p.gpu_gib, default=None)

    preset = best(bool(lora)) if lora is not None else best(False) or best(True)
    if preset is None and ours and not usable:
        runtimes = " or ".join(dict.fromkeys(p.runtime for p in sorted(ours, key=lambda p: p.gpu_gib)))
        return None, (
            f"{model_family.short_label} needs bf16, which this GPU ({gpu_gib:.0f} GB) lacks: choose {runtimes} "
            f"runtime ({', '.join(p.name for p in ours)})"
        )
    if preset is None:
        kind = {True: "LoRA ", False: "full fine-tune "}.get(lora, "")
        other = best(not lora) if lora is not None else None
        hint = f": choose {other.name}" if other is not None else ""
        bigger = sorted((p for p in usable if not _fits(p, gpu_gib)), key=lambda p: p.gpu_gib)
        if not hint and bigger and bigger[0].runtime:
            hint = f": {bigger[0].name} needs {bigger[0].runtime} runtime"
        return None, f"no {model_family.name.upper()} {kind}preset fits a GPU of {gpu_gib:.0f} GB{hint}"
    return preset, f"{preset.name}: the GPU has {gpu_gib:.0f} GB. {preset.summary}"


def _family_of(preset: Preset) -> Any:
    """The family a preset is for, or None while it is not registered (its presets wait for it)."""
    try:
        return family(preset.architecture)
    except ValueError:
        return None


def _fits(preset: Preset, gpu_gib: float) -> bool:
    # GPUs report a little less than their marketed size (a 16 GB T4 shows 15 GiB, a 40 GB A100 39.4 GiB)
    return gpu_gib >= preset.gpu_gib * 0.9


def auto_precision(mixed_precision: str, device_type: str, bf16_supported: bool) -> str:
    """mixed_precision with auto decided: bf16 where the GPU has it, fp16 on other GPUs, no on the CPU. It
    depends on the device alone, so a model can be loaded in the dtype it will be kept in."""
    if mixed_precision != "auto":
        return mixed_precision
    if device_type == "cpu":
        return "no"
    return "bf16" if bf16_supported else "fp16"


def auto_settings(
    config: _Config,
    *,
    architecture: str,
    native_resolution: int,
    device_type: str,
    bf16_supported: bool,
    gpu_gib: float | None,
) -> _Config:
    """The config with its automatic values decided for this model and device:
    resolution none -> the model's own; mixed_precision auto -> bf16 where the GPU has it, fp16 on other GPUs,
    no (fp32) on the CPU; gradient_checkpointing none -> on for SDXL, and for full fine-tunes on GPUs of at
    most 16 GB; train_text_encoder_2 none -> as train_text_encoder; num_workers none -> one decoding worker
    while a GPU trains on a machine with 2 or more CPUs (Colab's 2: the other one feeds the GPU), else 0 (on
    the CPU the training process needs every core)."""
    model_family = family(architecture)
    changes: dict[str, Any] = {}
    if config.resolution is None:
        changes["resolution"] = native_resolution
    if config.mixed_precision == "auto":
        changes["mixed_precision"] = auto_precision(config.mixed_precision, device_type, bf16_supported)
    if config.gradient_checkpointing is None:
        small = device_type == "cuda" and gpu_gib is not None and gpu_gib <= SMALL_GPU_GIB
        changes["gradient_checkpointing"] = model_family.gradient_checkpointing_always or (
            config.lora_rank == 0 and small
        )
    if config.num_workers is None:
        changes["num_workers"] = 1 if device_type == "cuda" and (os.cpu_count() or 1) >= 2 else 0
    second_trains = (
        "text_encoder_2" in model_family.trainable_text_encoders and len(model_family.text_encoders) > 1
    )
    if config.train_text_encoder_2 is None:
        changes["train_text_encoder_2"] = config.train_text_encoder if second_trains else False
    elif config.train_text_encoder_2 and not second_trains:
        raise ConfigError(
            f"train_text_encoder_2 is true, but {model_family.label} models have no second text encoder that "
            "can train (Flux.1's T5 always stays frozen); set train_text_encoder_2 false"
        )
    return dataclasses.replace(config, **changes) if changes else config
