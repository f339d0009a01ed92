"""Each preset's real training step on a GPU: edtools' own train_step on a real-size model, s/step and peak memory.

Per preset (edtools.presets): the real model of its architecture (bench/configs.py: SD1.5 or SDXL UNet, VAE, CLIP-L
and for SDXL OpenCLIP-bigG text encoders) built from its configs with random weights directly on the GPU, each part
in the dtype edtools keeps it in (constructed under a CUDA default device and default dtype: no CPU copy and no
float32 copy of frozen parts). Then what a run does, with edtools' own code: TrainConfig.from_dict({"preset": ...})
with its automatic values resolved (resolve_config), prepare_modules (freeze, cast, LoRA, checkpointing),
make_optimizer, make_lr_scheduler, make_grad_scaler, fill_text_cache (frozen text encoders encode every caption once,
then leave the GPU), make_latent_cache, and train_step on synthetic batches shaped as ScheduleBatches makes them (the
preset's batch size and resolution; cached latents carried by the batch when the preset caches latents).

Warm-up steps (the optimizer state appears, fp16's loss scale settles), then timed steps (torch.cuda.synchronize):
s/step, images/s, peak memory allocated and reserved from the first step on (torch.cuda.max_memory_*), the memory
outside torch's allocator (CUDA context), all against the preset's GPU size and bench/memory.py's estimate. Then a
few first-epoch steps, whose latents are not cached yet (the VAE encodes each image inside the step).

--unet: the older sweep of a hand-written SD1.5 UNet step (batch 1/4/8, fp16/bf16, checkpointing off/on) with model
FLOPs utilisation. Both need CUDA; --smoke runs the same code on the CPU with tiny models (the numbers mean nothing).

Run: python bench/gpu_step.py [--preset NAME ...] [--markdown] [--no-estimate] [--force]
     python bench/gpu_step.py --unet [--batches 1 4 8] [--precisions fp16 bf16]
     python bench/gpu_step.py --smoke [--unet]

The parts: models.py (building), gpu_preset.py (one preset's steps), gpu_report.py (printing), gpu_unet_sweep.py
(--unet); the estimates are bench/memory.py's (memory_presets.estimate_task, memory_budget's verdict).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
import traceback

from configs import ARCHITECTURES
from gpu_preset import SMOKE_RESOLUTION, PresetResult, run_preset
from gpu_report import header, markdown, print_result
from gpu_unet_sweep import run_unet_sweep
from memory_bytes import GIB
from memory_presets import estimate_task

__all__ = ["main", "run_presets"]

FITS_RULE = 0.9  # a preset runs on a GPU with at least this share of its gpu_gib (as edtools.presets chooses)


def run_presets(args: argparse.Namespace, device) -> None:
    import torch

    from edtools.presets import PRESETS

    names = args.preset or list(PRESETS)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    total_gib = torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None
    bf16 = device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 0)

    results: dict[str, PresetResult] = {}
    runnable, failed = [], []
    for name in names:
        preset = PRESETS[name]
        result = results[name] = PresetResult(name)
        if preset.architecture not in ARCHITECTURES:
            result.skipped = "a flow-matching preset: bench/configs.py has no real config of its family yet"
        elif total_gib is not None and total_gib < preset.gpu_gib * FITS_RULE and not args.force:
            result.skipped = f"sized for a {preset.gpu_gib:g} GB GPU and this one has {total_gib:.1f} GiB (--force tries anyway)"
        elif preset.settings.get("mixed_precision") == "bf16" and not bf16:
            result.skipped = "bf16 and this GPU has no bfloat16 tensor cores"
        else:
            runnable.append(name)

    if args.smoke:
        print(
            f"SMOKE RUN on the CPU with tiny models at {SMOKE_RESOLUTION} px: checks the script, the numbers mean "
            "nothing (the memory.py estimates are for the real sizes)"
        )
    estimates = {}
    if args.estimate and runnable:
        # Before any step: simulation workers beside the timed steps would take the CPU that launches the kernels.
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        print(f"bench/memory.py estimates of {len(runnable)} preset(s) ...", flush=True)
        began = time.perf_counter()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = {name: pool.submit(estimate_task, name) for name in runnable}
            for name, future in futures.items():
                try:
                    estimates[name] = future.result()
                except Exception as exc:  # an estimate that fails never hides the measurement
                    print(f"  {name}: bench/memory.py estimate failed: {exc!r}")
        print(f"  done in {time.perf_counter() - began:.0f} s")
    print(header(gpu, total_gib))
    for name in names:
        result = results[name]
        if result.skipped:
            print(f"\n{name}: skipped: {result.skipped}")
            continue
        print(f"\n{name}: {PRESETS[name].summary}", flush=True)
        try:
            with tempfile.TemporaryDirectory(prefix="gpu-step-") as folder:
                run_preset(name, device, args, result, folder)
        except torch.cuda.OutOfMemoryError as exc:
            result.error = "out of memory: " + str(exc).splitlines()[0][:200]
        except Exception as exc:  # reported, and the other presets still run; the exit status says so
            traceback.print_exc()
            result.error = f"failed: {exc!r}"[:300]
            failed.append(name)
        finally:
            gc.collect()
            if device.type == "cuda":
                if result.error and result.peak_allocated is None:
                    result.peak_allocated = torch.cuda.max_memory_allocated(device)
                    result.peak_reserved = torch.cuda.max_memory_reserved(device)
                torch.cuda.empty_cache()
        result.estimate = estimates.get(name)
        print_result(result, PRESETS[name])
    if args.markdown:
        print()
        print(markdown(results, PRESETS, gpu, total_gib, args))
    if failed:
        sys.exit(f"bench/gpu_step.py: {', '.join(failed)} failed (tracebacks above)")


def main() -> None:
    from edtools.presets import PRESET_NAMES

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--preset", action="append", choices=PRESET_NAMES, metavar="NAME",
        help=f"a preset to measure, repeatable (default: all): {', '.join(PRESET_NAMES)}",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before timing")
    parser.add_argument(
        "--first-epoch-steps", type=int, default=3, help="timed steps with latents not cached yet (0: none)"
    )
    parser.add_argument("--markdown", action="store_true", help="also print the RESULTS.md rows")
    parser.add_argument(
        "--no-estimate", dest="estimate", action="store_false", help="skip bench/memory.py's estimates"
    )
    parser.add_argument(
        "--jobs", type=int, default=2, help="worker processes for bench/memory.py's estimates"
    )
    parser.add_argument("--force", action="store_true", help="also run presets sized for a larger GPU")
    parser.add_argument("--smoke", action="store_true", help="run the same code on the CPU with tiny models")
    unet = parser.add_argument_group("--unet: the hand-written SD1.5 UNet sweep")
    unet.add_argument("--unet", action="store_true", help="run the SD1.5 UNet sweep instead of the presets")
    unet.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8])
    unet.add_argument("--precisions", nargs="+", choices=("fp16", "bf16"), default=["fp16", "bf16"])
    unet.add_argument("--resolution", type=int, default=512)
    unet.add_argument("--peak-tflops", type=float, help="the GPU's dense fp16/bf16 peak, for MFU")
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 0 or args.first_epoch_steps < 0 or args.jobs < 1:
        parser.error("--steps must be >= 1, --warmup and --first-epoch-steps >= 0, --jobs >= 1")
    # bitsandbytes (imported by diffusers too) warns about a 4-bit CPU kernel that AdamW8bit never uses.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import torch

    if args.smoke:
        device = torch.device("cpu")
        args.steps, args.warmup, args.first_epoch_steps = 2, 1, min(args.first_epoch_steps, 1)
        if args.unet:
            args.batches = [1, 2]
    elif not torch.cuda.is_available():
        sys.exit(
            "bench/gpu_step.py needs a CUDA GPU and torch sees none: nothing was measured. Run it on a GPU "
            "machine (e.g. Colab with a GPU runtime); `python bench/gpu_step.py --smoke` checks the script on "
            "the CPU."
        )
    else:
        device = torch.device("cuda")
    if args.unet:
        run_unet_sweep(args, device)
    else:
        run_presets(args, device)


if __name__ == "__main__":
    main()
