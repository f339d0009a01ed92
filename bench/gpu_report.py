"""bench/gpu_step.py's report: each preset's measurements beside bench/memory.py's estimate, and RESULTS.md rows.

The verdict is memory.py's rule (memory_budget) applied to the measured peak reserved plus the CUDA context.
"""

from __future__ import annotations

import contextlib

from gpu_preset import PresetResult
from memory_budget import usable_gib, verdict
from memory_bytes import gib

__all__ = ["header", "markdown", "print_result", "verdict_of"]


def header(gpu: str, total_gib: float | None) -> str:
    import diffusers
    import torch
    import transformers

    versions = f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}"
    with contextlib.suppress(ImportError):
        import peft

        versions += f", peft {peft.__version__}"
    with contextlib.suppress(ImportError):
        import bitsandbytes

        versions += f", bitsandbytes {bitsandbytes.__version__}"
    size = f" ({total_gib:.1f} GiB)" if total_gib is not None else ""
    return f"{gpu}{size}; {versions}"


def verdict_of(result: PresetResult, preset) -> str:
    """memory.py's rule (fits <= 85 % of the usable memory, tight <= 100 %) on the measured total: peak reserved
    plus what lies outside the allocator."""
    if result.peak_reserved is None or result.outside_allocator is None:
        return "n/a"
    reserved = max(result.peak_reserved, result.first_epoch_peak_reserved or 0)
    return verdict(reserved + result.outside_allocator, preset.gpu_gib)


def print_result(result: PresetResult, preset) -> None:
    if result.settings:
        print(f"  settings: {result.settings}; setup {result.setup_seconds:.1f} s")
    if result.parameters:
        print(
            "  parts: "
            + ", ".join(
                f"{n} {count / 1e6:,.{0 if count >= 1e7 else 2}f}M {str(dtype).removeprefix('torch.')}"
                for n, (count, dtype) in result.parameters.items()
            )
            + f"; trained {result.trained_params / 1e6:,.1f}M"
        )
    for line in result.recast:
        print(f"  NOTE prepare_modules recast {line}: the build's dtype rule is out of date")
    if result.error:
        print(f"  {result.error}")
    if result.steps:
        notes = []
        if result.skipped_steps:
            notes.append(
                f"{result.skipped_steps} of {result.steps} optimizer steps skipped (non-finite gradient)"
            )
        if result.nonfinite_steps:
            notes.append(
                f"{result.nonfinite_steps} steps with a non-finite loss: no backward, NOT a real step"
            )
        print(
            f"  {result.images_per_second:.2f} images/s, {result.seconds_per_step:.3f} s/step "
            f"({result.warmup_steps} warm-up + {result.steps} timed steps)"
            + (f"; {'; '.join(notes)}" if notes else "")
        )
    if result.peak_allocated is not None:
        usable = usable_gib(preset.gpu_gib)
        print(
            f"  memory GiB: peak allocated {gib(result.peak_allocated)}, peak reserved {gib(result.peak_reserved)}, "
            f"outside the allocator {gib(result.outside_allocator)}; resident after setup {gib(result.resident)}, "
            f"setup peak {gib(result.setup_peak_allocated)}; preset sized for {preset.gpu_gib:g} GB ({usable:.1f} "
            f"GiB usable): {verdict_of(result, preset)}"
        )
    if result.estimate:
        e = result.estimate
        print(
            f"  bench/memory.py estimate GiB: tensor peak {gib(e['tensor_peak'])} (weights "
            + " + ".join(f"{k} {gib(v)}" for k, v in e["weights"].items())
            + f", optimizer {gib(e['optimizer'])}, step {gib(e['step_peak'])}) vs peak allocated "
            f"{gib(result.peak_allocated)}; estimated peak {gib(e['estimate'])} vs reserved + outside "
            + (
                gib(result.peak_reserved + result.outside_allocator)
                if result.peak_reserved is not None and result.outside_allocator is not None
                else "n/a"
            )
        )
    if result.first_epoch_steps:
        print(
            f"  first epoch (the VAE encodes each image in the step): {result.first_epoch_seconds:.3f} s/step, "
            f"peak allocated {gib(result.first_epoch_peak_allocated)}, reserved {gib(result.first_epoch_peak_reserved)}"
        )


def markdown(results: dict, presets, gpu: str, total_gib: float | None, args) -> str:
    command = (
        "python bench/gpu_step.py" + "".join(f" --preset {n}" for n in args.preset or ()) + " --markdown"
    )
    lines = [
        f"`{command}` on {header(gpu, total_gib)}; {args.warmup}+ warm-up and {args.steps} timed steps per preset.",
        "",
        "| preset | settings | s/step | images/s | peak allocated | peak reserved | outside allocator | "
        "memory.py tensor peak / estimated peak | GPU GB (usable GiB) | verdict (measured) | first epoch s/step, "
        "peak reserved | notes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        p = presets[name]
        if r.skipped or (r.error and not r.steps):
            why = r.skipped or r.error
            lines.append(
                f"| {name} | {r.settings or '-'} | | | {gib(r.peak_allocated) if r.error else ''} | | | | "
                f"{p.gpu_gib:g} ({usable_gib(p.gpu_gib):.1f}) | | | {why} |"
            )
            continue
        e = r.estimate
        notes = []
        if r.skipped_steps:
            notes.append(f"{r.skipped_steps}/{r.steps} steps skipped")
        if r.nonfinite_steps:
            notes.append(f"{r.nonfinite_steps}/{r.steps} non-finite losses")
        notes += [f"recast {x}" for x in r.recast]
        first = (
            f"{r.first_epoch_seconds:.3f}, {gib(r.first_epoch_peak_reserved)}"
            if r.first_epoch_steps
            else "n/a"
        )
        lines.append(
            f"| {name} | {r.settings} | {r.seconds_per_step:.3f} | {r.images_per_second:.2f} | "
            f"{gib(r.peak_allocated)} | {gib(r.peak_reserved)} | {gib(r.outside_allocator)} | "
            + (f"{gib(e['tensor_peak'])} / {gib(e['estimate'])}" if e else "n/a")
            + f" | {p.gpu_gib:g} ({usable_gib(p.gpu_gib):.1f}) | {verdict_of(r, p)} | {first} | "
            f"{'; '.join(notes)} |"
        )
    lines.append("")
    lines.append(
        "GiB throughout. Peaks from the first step on (building and the text-embedding cache before it are not "
        "counted); outside allocator: device memory in use beyond torch's reserved (CUDA context and libraries). "
        "Verdict: memory.py's rule on peak reserved + outside allocator."
    )
    return "\n".join(lines)
