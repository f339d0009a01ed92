"""GPU memory each training preset needs, estimated on a CPU: estimates (no GPU measurement).

1. Weights, gradients and optimizer state: exact bytes from the real SD1.5 / SDXL configs (UNet, VAE, text
   encoders), built on the meta device (no weights, nothing downloaded).
2. One training step (text encoder when trained, UNet forward under autocast, MSE loss, backward) runs on fake
   tensors (torch's FakeTensorMode: shapes and dtypes, no data) while a dispatch mode adds up the bytes of every
   tensor storage alive, so the step's peak includes the activations saved for backward, the gradients, the
   autocast copies of fp32 weights, gradient-checkpointing recomputation and transient buffers. Fake tensors sit
   on the "cpu" device, so autocast is CPU autocast with CUDA's cast rules laid over it (ops CUDA runs in fp32 -
   group_norm, layer_norm, softmax, upsample_nearest2d, ... - get Python autocast kernels); attention runs
   torch's memory-efficient SDPA kernel as on a GPU (no materialised attention matrix).
   Every op runs at the real sizes this way: nothing is measured at a reduced size and extrapolated.
3. A cross-check on the CPU with real tensors (a child process): the SD1.5 UNet with LoRA at 256 px, fp32, its
   peak RSS rise over one step against the fake-tensor prediction for the same step.
4. Per preset: weights + gradients + optimizer state + step peak + an allowance for the CUDA context and the
   caching allocator, the caching pass's peak beside it, and a verdict against the preset's GPU; for presets
   that do not fit, the first of a few setting changes that would.

Run: python bench/memory.py [--presets NAME ...] [--quick] [--markdown] [--jobs N]

The parts: models.py (meta-device models), memory_bytes.py (1), memory_trace.py and memory_step.py (2),
memory_crosscheck.py (3), memory_budget.py, memory_presets.py and memory_report.py (4).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from memory_bytes import component_table
from memory_crosscheck import cross_check_child, cross_check_setup, finish_cross_check, start_cross_check
from memory_presets import EVERYDREAM2_T4, preset_task, replace, step_task
from memory_report import report
from models import ARCHS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

__all__ = ["main"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", metavar="NAME", help="only these presets")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="the presets only: no cross-check, alternatives or reference runs",
    )
    parser.add_argument("--markdown", action="store_true", help="print the RESULTS.md section")
    parser.add_argument(
        "--jobs", type=int, default=2, help="worker processes for the fake-tensor runs (1: in this process)"
    )
    parser.add_argument("--cross-check-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import logging

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(1)
    if args.cross_check_child:
        print(json.dumps(cross_check_child()))
        return 0

    from edtools.presets import PRESETS

    # the UNet presets; bench/memory_flow.py estimates the flow-matching ones (SD3.5, Flux)
    unet_presets = [n for n, p in PRESETS.items() if p.architecture in ARCHS]
    names = args.presets or unet_presets
    unknown = [n for n in names if n not in unet_presets]
    if unknown:
        parser.error(
            f"unknown preset(s) {unknown}; known: {', '.join(unet_presets)} (bench/memory_flow.py has the others)"
        )
    start = time.perf_counter()
    child = None if args.quick else start_cross_check()

    # Largest first (SDXL runs, two text encoders, take longest), so the workers finish together.
    order = sorted(names, key=lambda n: -len(ARCHS[PRESETS[n].architecture].texts))
    tasks = {("preset", n): (preset_task, (n, args.quick)) for n in order}
    if not args.quick:
        tasks["reference"] = (step_task, (EVERYDREAM2_T4,))
        tasks["reference b2"] = (step_task, (replace(EVERYDREAM2_T4, batch_size=2),))
        for checkpointing in (False, True):
            tasks[("cross-check", checkpointing)] = (
                step_task,
                (cross_check_setup(checkpointing), "cpu_flash"),
            )
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=context) as pool:
            futures = {key: pool.submit(fn, *fn_args) for key, (fn, fn_args) in tasks.items()}
            components = component_table()
            results = {key: future.result() for key, future in futures.items()}
    else:
        components = component_table()
        results = {key: fn(*fn_args) for key, (fn, fn_args) in tasks.items()}

    per_preset = {n: results[("preset", n)] for n in names}
    steps = {n: r["step"] for n, r in per_preset.items()}
    caching = {n: r["caching"] for n, r in per_preset.items()}
    alternatives = {n: r["alternative"] for n, r in per_preset.items() if "alternative" in r}
    fixes = {n: r["fixes"] for n, r in per_preset.items() if "fixes" in r}
    reference = (results["reference b2"], results["reference"]) if "reference" in results else None
    checks = {}
    if child is not None:
        fakes = {c: results[("cross-check", c)] for c in (False, True)}
        checks = finish_cross_check(child, fakes)
    seconds = time.perf_counter() - start
    import resource

    rss = {
        "main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    }
    if args.jobs > 1:
        rss["largest simulation worker"] = max(r["rss"] for r in per_preset.values())
    if checks:
        rss["cross-check child"] = checks["child_peak_rss"]
    report(
        PRESETS, names, components, steps, alternatives, caching, fixes, reference, checks, seconds, rss, args
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
