"""A dry run: everything a run does before its first step (model loaded as it will be kept, data scanned,
validation held out, schedule built, optimizer made), then the plan in words; nothing encoded, trained or written.

`check_run(config)` returns the RunPlan, `format_plan` says it; `edtools train --dry-run` and the notebook's
Check button print it. The host memory measured while loading is what a free Colab runtime must hold.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..balance.schedule import build_epoch, make_buckets
from ..config import TrainConfig
from ..errors import require
from ..models.families import family
from ..presets import PRESETS
from .checkpoint import TrainState, checkpoint_info
from .host_memory import GIB, HostMemory, PeakHostMemory, current_host_memory
from .outdir import resume_point
from .runtime import make_runtime
from .setup import load_data, load_model, planned_steps, resolve_config
from .step import make_optimizer, prepare_modules

__all__ = ["RunPlan", "check_run", "format_plan"]

log = logging.getLogger("edtools.train")


@dataclass(frozen=True)
class RunPlan:
    """What a run would do, as decided by the same code the run uses."""

    config: TrainConfig  # with its automatic values decided
    architecture: str
    device: str
    parts: tuple[tuple[str, str, int], ...]  # (part, dtype, parameters)
    trained_parameters: int
    images: int
    held_out: int
    concepts: tuple[tuple[str, int, float, float], ...]  # (folder, images, multiplier, images in epoch 1)
    steps: int
    resume_from: str | None  # the checkpoint a --resume would continue from
    resume_step: int
    host_memory_loading: HostMemory  # the peak while the model was loaded
    host_memory_peak: HostMemory  # the peak of the whole check (optimizer made)
    host_memory_before: HostMemory  # before loading: the interpreter and its libraries


def check_run(config: TrainConfig) -> RunPlan:
    """Load, scan, plan and build the optimizer exactly as train(config) would, and stop before encoding or
    training anything. Writes nothing: the out folder is neither created nor locked nor cleaned."""
    require("torch")
    runtime = make_runtime(config)
    resume_from = resume_point(config, Path(config.out).expanduser())  # refuses what the run would refuse
    info = checkpoint_info(resume_from) if resume_from is not None else {}
    before = current_host_memory()
    with PeakHostMemory() as whole:
        with PeakHostMemory() as loading:
            components = load_model(config, runtime, resume_from)
        resolved = resolve_config(config, components, runtime)
        dataset, validation = load_data(resolved, runtime.main)
        buckets = make_buckets(resolved.resolution)
        state = TrainState(**{k: info[k] for k in ("global_step", "epoch", "batch") if k in info})
        steps = planned_steps(resolved, dataset, buckets, state, runtime.world_size)
        params = prepare_modules(components, resolved, runtime.device)
        text_params = [p for e in components.text_encoders for p in e.parameters() if p.requires_grad]
        make_optimizer(resolved, params, text_params)
    first = build_epoch(dataset, epoch=0, seed=resolved.seed, batch_size=resolved.batch_size, buckets=buckets)
    per_concept = np.bincount(
        dataset.concept_index[first.trained_images()], minlength=len(dataset.concepts)
    ).tolist()
    parts = tuple(
        (name, _dtype_of(module), sum(_numel(p) for p in module.parameters()))
        for name, module in _parts(components, family(components.architecture).denoiser_part)
    )
    return RunPlan(
        config=resolved,
        architecture=components.architecture,
        device=str(runtime.device),
        parts=parts,
        trained_parameters=sum(p.numel() for p in params),
        images=len(dataset),
        held_out=len(validation) if validation is not None else 0,
        concepts=tuple(
            (c.path or ".", c.n_images, c.multiplier, n)
            for c, n in zip(dataset.concepts, per_concept, strict=True)
        ),
        steps=steps,
        resume_from=str(resume_from) if resume_from is not None else None,
        resume_step=int(info.get("global_step", 0)),
        host_memory_loading=loading.result,
        host_memory_peak=whole.result,
        host_memory_before=before,
    )


def _parts(components: Any, denoiser_part: str) -> list[tuple[str, Any]]:
    """(name, module) of every part loaded, the denoiser under its family's name ("unet", "transformer")."""
    parts = [(denoiser_part, components.unet), ("vae", components.vae)]
    names = ("text_encoder", "text_encoder_2", "text_encoder_3")
    return parts + [(n, getattr(components, n)) for n in names if getattr(components, n, None) is not None]


def _dtype_of(module: Any) -> str:
    """The dtype most of a module's weights are kept in (LoRA adapters are float32 beside half-precision bases),
    "nf4" / "int8" for weights bitsandbytes quantised."""
    sizes: dict[str, int] = {}
    for p in module.parameters():
        kind = _quantized_kind(p) or str(p.dtype).replace("torch.", "")
        sizes[kind] = sizes.get(kind, 0) + _numel(p)
    return max(sizes, key=sizes.get)


def _quantized_kind(parameter: Any) -> str | None:
    quant_state = getattr(parameter, "quant_state", None)  # bitsandbytes' Params4bit
    if quant_state is not None:
        return str(getattr(quant_state, "quant_type", "4bit"))
    if type(parameter).__name__ == "Int8Params":
        return "int8"
    return None


def _numel(parameter: Any) -> int:
    """Parameters of the weight as trained, not of its packed storage (two NF4 values a byte)."""
    quant_state = getattr(parameter, "quant_state", None)
    shape = getattr(quant_state, "shape", None)
    return int(np.prod(tuple(shape))) if shape is not None else parameter.numel()


def format_plan(plan: RunPlan) -> str:
    """The plan for a person: what would train, for how long, in how much memory."""
    c = plan.config
    kind = f"LoRA rank {c.lora_rank}" if c.lora_rank else "full fine-tune"
    lines = [
        f"dry run: nothing was encoded, trained or written ({c.out} untouched)",
        f"model: {c.model} ({family(plan.architecture).short_label}, {kind}) on {plan.device}, "
        f"mixed precision {'fp32' if c.mixed_precision == 'no' else c.mixed_precision}",
    ]
    for name, dtype, count in plan.parts:
        lines.append(f"  {name:<15} {dtype:<9} {_count(count):>8} parameters")
    lines.append(f"  trained: {_count(plan.trained_parameters)} parameters ({c.optimizer})")
    held = f", {plan.held_out} held out for validation" if plan.held_out else ""
    lines.append(
        f"data: {plan.images} images in {len(plan.concepts)} concepts{held}; images per concept in epoch 1:"
    )
    width = max(len(folder) for folder, *_ in plan.concepts)
    for folder, n_images, multiplier, in_epoch in plan.concepts:
        lines.append(f"  {folder:<{width}}  {n_images:6d} images  x {multiplier:<6g} -> {in_epoch:6d}")
    resume = f", resuming from {plan.resume_from} at step {plan.resume_step}" if plan.resume_from else ""
    lines.append(
        f"plan: {plan.steps} optimizer steps over {c.epochs} epochs, batch {c.batch_size} x {c.grad_accum} "
        f"accumulated, {c.resolution} px{resume}"
    )
    if c.preset in PRESETS:
        step, caching = PRESETS[c.preset].estimated_gib
        lines.append(
            f"GPU memory (preset {c.preset}, estimated by bench/memory.py or memory_flow.py, not measured): {step:.2f} GiB at a "
            f"step, {caching:.2f} GiB while caching"
        )
    else:
        lines.append("GPU memory: no preset chosen, so no estimate (bench/memory.py has one per preset)")
    lines.append(
        f"host memory measured: loading the model peaked at {plan.host_memory_loading}; the whole check at "
        f"{plan.host_memory_peak} (the libraries alone took {plan.host_memory_before.total / GIB:.2f} GiB)"
    )
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e6 else f"{n:,}"
