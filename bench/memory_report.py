"""bench/memory.py's report: components, each step's activations, the cross-check, per-preset verdicts, fixes.

Plain text by default, the RESULTS.md section with --markdown; every figure comes from the results passed in.
"""

from __future__ import annotations

from memory_budget import CONTEXT_GIB, FITS, FRAGMENTATION, USABLE_GIB, usable_gib, verdict
from memory_bytes import GIB, gib
from memory_crosscheck import CROSS_CHECK
from models import LORA_TARGETS

__all__ = ["report"]


def report(
    presets,
    names,
    components,
    steps,
    alternatives,
    caching,
    fixes,
    reference,
    checks,
    seconds,
    rss,
    args,
):
    md = args.markdown
    out = []

    def table(header, rows):
        if md:
            out.append("| " + " | ".join(header) + " |")
            out.append("|" + "---|" * len(header))
            out.extend("| " + " | ".join(str(c) for c in row) + " |" for row in rows)
        else:
            widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
            out.append("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)).rstrip())
            out.extend(
                "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
            )
        out.append("")

    def text(line=""):
        out.append(line)

    def bold(value: str) -> str:
        return f"**{value}**" if md else value

    command = "python bench/memory.py" + (" --presets " + " ".join(args.presets) if args.presets else "")
    command += " --quick" if args.quick else ""
    command += f" --jobs {args.jobs}" if args.jobs != 2 else ""
    workers = (
        f"{args.jobs} simulation worker processes" if args.jobs > 1 else "simulations in the main process"
    )
    run = f"{seconds:.0f} s wall ({workers}); peak RSS per process: " + ", ".join(
        f"{k} {v / GIB:.2f} GiB" for k, v in rss.items()
    )
    if md:
        text("## Memory per preset (estimates)")
        text()
        text(
            f"**Estimates (no GPU measurement).** `{command} --markdown` on 2026-11-25, 2-core CPU, no GPU, "
            f"`torch {__import__('torch').__version__}`, `diffusers {__import__('diffusers').__version__}`, "
            f"`transformers {__import__('transformers').__version__}`, `peft {__import__('peft').__version__}`: "
            f"{run}."
        )
    else:
        text("GPU memory per preset: ESTIMATES (no GPU measurement)")
    text()
    text(
        "Method: weights, gradients and optimizer state are exact byte counts of the real configs built on the "
        "meta device. One training step (trained text encoder, UNet forward under autocast, MSE loss, backward) "
        "runs on fake tensors (FakeTensorMode: shapes and dtypes, no data) while a dispatch mode sums the bytes "
        "of every live tensor storage; its peak covers activations saved for backward, gradients, autocast's "
        "half copies of fp32 weights, checkpoint recomputation and transient buffers. Autocast follows CUDA's "
        "rules (torch 2.13 lists: group_norm, layer_norm, softmax, upsample_nearest2d ... run in fp32), gradient "
        "checkpointing is diffusers' enable_gradient_checkpointing() (non-reentrant), attention is the "
        "memory-efficient SDPA kernel as on a GPU (flash keeps the same tensors). LoRA: peft adapters on "
        f"{', '.join(LORA_TARGETS)} (what peft creates is counted). AdamW8bit state: 2 B/param plus an fp32 "
        "absmax per 256-value block, 8 B/param for tensors under 4096 values; on the SD1.5 UNet this rule gives "
        f"{components[0][5] / components[0][2]:.3f} B/param (bench/optimizer_memory.py measured 2.034)."
    )
    text()
    text("Components (real configs, meta device; GiB):")
    text()
    rows = [
        (a, n, f"{c:,}", gib(f32), gib(f16), gib(s8), gib(s32)) for a, n, c, f32, f16, s8, s32 in components
    ]
    table(["model", "component", "parameters", "fp32", "fp16/bf16", "AdamW8bit state", "AdamW state"], rows)

    text(
        "Activation memory of one training step, with and without gradient checkpointing (GiB, fake tensors):"
    )
    text()
    rows = []
    for name in names:
        for step in (steps[name], alternatives.get(name)):
            if step is not None:
                rows.append(
                    (
                        name if step is steps[name] else f"({name}, other checkpointing)",
                        step.setup.describe(),
                        gib(step.saved_for_backward),
                        gib(step.held_after_forward),
                        gib(step.grads),
                        gib(step.step_peak),
                        f"{step.seconds:.1f}",
                    )
                )
    table(
        [
            "preset",
            "step",
            "saved for backward (hooks)",
            "held after forward",
            "gradients",
            "step peak",
            "sim s",
        ],
        rows,
    )
    text(
        "saved for backward: saved-tensor hook sum, each storage once, parameters excluded (n/a with "
        "checkpointing, whose own hooks take over). held after forward: every tensor still alive when the "
        "forward ends (adds checkpoint inputs and the output). step peak: highest live total over forward + "
        "backward above the resident weights, gradients included (with fp32 weights the peak is at the end of "
        "backward, when every gradient exists)."
    )
    text()

    if checks:
        text(
            f"Cross-check with real tensors on the CPU: SD1.5 UNet, random weights, fp32, LoRA "
            f"r{CROSS_CHECK['lora_rank']}, {CROSS_CHECK['resolution']} px, batch {CROSS_CHECK['batch_size']}, CPU "
            "flash attention in both runs; measured = rise of the process's peak RSS over one step after a "
            "warm-up step (MiB):"
        )
        text()
        rows = []
        for mode in ("off", "on"):
            c = checks[mode]

            def measured(key, c=c):
                if c[key] is None:
                    return "n/a"
                ratio = c[key] / c["fake_step_peak"]
                return f"{c[key] / 2**20:.0f} ({bold(f'{ratio:.2f}')})"

            rows.append(
                (
                    mode,
                    f"{c['fake_step_peak'] / 2**20:.0f}",
                    f"{c['real_tracker_peak'] / 2**20:.0f}",
                    measured("peak_rss_rise_no_onednn"),
                    measured("peak_rss_rise"),
                    f"{c['fake_held'] / 2**20:.0f}",
                    f"{c['rss_rise_after_forward'] / 2**20:.0f}",
                    "n/a" if c["saved_for_backward"] is None else f"{c['saved_for_backward'] / 2**20:.0f}",
                )
            )
        table(
            [
                "checkpointing",
                "predicted peak (fake tensors)",
                "same tracker, real tensors",
                "measured peak RSS rise, oneDNN conv off (/ predicted)",
                "measured, oneDNN conv on (/ predicted)",
                "predicted held after forward",
                "measured RSS rise after forward",
                "saved for backward (hooks, real)",
            ],
            rows,
        )
        text(
            "The tracker gives the same bytes on fake and real tensors, and the measured RSS matches it when "
            "torch's own conv kernels run. With oneDNN convolutions the RSS also holds oneDNN's buffers (a "
            "blocked-layout copy of a conv weight per call; the largest SD1.5 conv weight is "
            f"{checks['largest_conv_weight'] / 2**20:.0f} MiB), which the tracker cannot see: they show under "
            "checkpointing, where the step's tensor peak is small. On a GPU the matching extras (cuDNN / cuBLAS "
            "workspaces, allocator blocks) are what the allowance below is for."
        )
        text()

    usable = ", ".join(f"{k} GB: {v} GiB" for k, v in USABLE_GIB.items())
    text(
        f"Per preset (GiB). Estimated peak = weights + optimizer state + step peak + allowance ({CONTEXT_GIB:.1f} "
        f"GiB CUDA context and workspaces + {FRAGMENTATION:.0%} of the tensor total for the caching allocator). "
        "Caching pass: UNet (as trained, no gradients or optimizer state yet), VAE and text encoders resident, "
        "one VAE encode of a batch at the preset's resolution (SDXL's VAE in fp32: force_upcast), frozen text "
        f"encoders encode one batch, same allowance. Usable memory ({usable}); verdict on the larger of the two "
        f"peaks: fits <= {FITS * 100:.0f} % of usable, tight <= 100 %, else does not fit."
    )
    text()
    rows = []
    for name in names:
        s, c, p = steps[name], caching[name], presets[name]
        rows.append(
            (
                name,
                s.setup.describe(),
                " + ".join(f"{k} {gib(v)}" for k, v in s.weights.items()),
                f"{s.trainable_params / 1e6:,.1f} M",
                gib(s.optimizer),
                gib(s.step_peak),
                gib(s.allowance),
                bold(gib(s.estimate)),
                f"{gib(c.estimate)} (VAE encode {gib(c.vae_transient)})",
                f"{p.gpu_gib:g} ({usable_gib(p.gpu_gib):.1f})",
                bold(verdict(max(s.estimate, c.estimate), p.gpu_gib)),
            )
        )
    table(
        [
            "preset",
            "settings",
            "weights",
            "trained params",
            "optimizer",
            "step peak",
            "allowance",
            "estimated peak",
            "caching-pass peak",
            "GPU GB (usable GiB)",
            "verdict (estimate)",
        ],
        rows,
    )

    if fixes:
        text("Presets that do not fit or are tight: settings that would (estimates, tried in this order):")
        text()
        rows = []
        for name, tried in fixes.items():
            for label, s, c in tried:
                rows.append(
                    (
                        name,
                        label,
                        gib(s.estimate),
                        gib(c.estimate),
                        verdict(max(s.estimate, c.estimate), presets[name].gpu_gib),
                    )
                )
        table(["preset", "change", "estimated peak", "caching-pass peak", "verdict (estimate)"], rows)

    text(
        "Design constraint (not measured): saving a checkpoint copies tensors to the CPU one at a time, so it "
        "never raises the step's peak."
    )
    text()
    text(
        "Not modelled: EMA weights, sample images during training, torch.compile, xformers, several GPUs; how "
        "much of the allowance a real GPU needs (cuDNN's workspace choice, fragmentation) is the main unknown "
        "until bench/gpu_step.py runs on one."
    )
    text()
    text("Reference points (published, not measured here):")
    text()
    ed2 = ""
    if reference:
        small, big = reference
        per_image = (big.estimate - small.estimate) / (big.setup.batch_size - small.setup.batch_size)
        ed2 = (
            " This script's estimate for that setup (SD1.5 full + text encoder, 512 px, fp16, checkpointing, "
            f"AdamW8bit, VAE on the GPU): batch 8 {gib(big.estimate)} GiB ({verdict(big.estimate, 16)} on a "
            f"T4), batch 2 {gib(small.estimate)} GiB, {per_image / GIB:.2f} GiB per extra image."
        )
    for line in (
        "EveryDream2 trains SD1.x fully (UNet + text encoder) at batch 8 on a 16 GB T4 with AMP, gradient "
        "checkpointing and AdamW8bit; its docs put such runs on 12 GB GPUs at batch 1-2 and one more image "
        "per batch at about 0.5-1 GB." + ed2,
        "kohya's sd-scripts train SDXL LoRA in about 8-10 GB (kohya-ss/sd-scripts#715: about 7 GB at batch 1 on "
        "a 16 GB card, but out of memory in save_state with an old accelerate).",
        "diffusers#4872: the SDXL LoRA example (1024 px, batch 1, fp16, 8-bit Adam, gradient checkpointing, a "
        "checkpoint every 10 steps) ran out of memory on a Colab T4 (14.75 GiB total, 13.2 GiB allocated); the "
        "maintainer's answer was to turn checkpoint saving off.",
    ):
        text(("- " if md else "  - ") + line)
    text()
    if not md:
        text(f"Run: {run}")
    print("\n".join(out))
