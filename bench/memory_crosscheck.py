"""The cross-check with real tensors: the SD1.5 UNet with LoRA stepped on the CPU, its RSS against the tracker.

It runs in a child process (`bench/memory.py --cross-check-child`): a clean RSS, and its memory goes back on exit.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys

from memory_step import Setup
from memory_trace import gpu_attention, live_tracker_class, saved_tensor_bytes, tensors_of
from models import TEXT_TOKENS, build_unet

__all__ = ["CROSS_CHECK", "cross_check_child", "cross_check_setup", "finish_cross_check", "start_cross_check"]

# The memory.py CLI, which runs cross_check_child when given --cross-check-child.
MEMORY_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "memory.py")

CROSS_CHECK = dict(resolution=256, batch_size=1, lora_rank=32, lora_alpha=16.0)


def cross_check_setup(checkpointing: bool) -> Setup:
    return Setup(
        "sd",
        CROSS_CHECK["resolution"],
        CROSS_CHECK["batch_size"],
        "no",
        checkpointing,
        lora_rank=CROSS_CHECK["lora_rank"],
        lora_alpha=CROSS_CHECK["lora_alpha"],
        cache_text_embeddings=True,
    )


def _rss() -> tuple[int, int]:
    """(current, peak) resident set size of this process, bytes."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


_HIGHEST_RSS = [0]  # the process's peak RSS, kept across resets of the kernel's high-water mark


def _reset_peak_rss() -> bool:
    _HIGHEST_RSS[0] = max(_HIGHEST_RSS[0], _rss()[1])
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cross_check_child() -> dict:
    """Real SD1.5 UNet (random weights, fp32, CPU) with LoRA, one forward + backward per mode: the peak RSS rise
    over the step (after a warm-up step), with oneDNN convolutions and with them off (torch's own conv kernels,
    no weight-layout copies), the RSS rise when the forward ends, the saved-tensor hook sum, and the live-bytes
    tracker on the real tensors. Large allocations are mmapped (MALLOC_MMAP_THRESHOLD_), so freed memory leaves
    the RSS at once."""
    import torch

    torch.manual_seed(0)
    unet = build_unet("sd", CROSS_CHECK["lora_rank"], CROSS_CHECK["lora_alpha"])
    unet.to_empty(device="cpu")
    params = list(unet.parameters())
    pool = torch.randn(max(p.numel() for p in params)) * 0.02  # copied in: much faster than normal_
    with torch.no_grad():
        for p in params:
            p.view(-1).copy_(pool[: p.numel()])
        for b in unet.buffers():
            b.zero_()
    del pool
    unet.train()
    side = CROSS_CHECK["resolution"] // 8
    bsz = CROSS_CHECK["batch_size"]
    latents = torch.randn(bsz, 4, side, side)
    hidden = torch.randn(bsz, TEXT_TOKENS, 768)
    timesteps = torch.randint(0, 1000, (bsz,))
    largest_conv = max(m.weight.nbytes for m in unet.modules() if isinstance(m, torch.nn.Conv2d))

    def step(measure_saved: bool) -> dict:
        noise = torch.randn_like(latents)
        hooks = saved_tensor_bytes(params) if measure_saved else contextlib.nullcontext([None])
        with hooks as saved:
            pred = unet(latents + noise, timesteps, hidden).sample
        after_forward = _rss()[0]
        ((pred.float() - noise) ** 2).mean().backward()
        del pred, noise
        for p in params:
            p.grad = None
        return {"rss_after_forward": after_forward, "saved": saved[0]}

    results = {}
    with gpu_attention("cpu_flash"):
        for checkpointing in (False, True):
            if checkpointing:
                unet.enable_gradient_checkpointing()
            step(False)  # warm-up: thread pools, oneDNN primitives
            gc.collect()
            before = _rss()[0]
            can_reset = _reset_peak_rss()
            measured = step(measure_saved=not checkpointing)
            peak = _rss()[1]
            with torch.backends.mkldnn.flags(enabled=False):
                gc.collect()
                before_plain = _rss()[0]
                _reset_peak_rss()
                step(False)
                peak_plain = _rss()[1]
            live = live_tracker_class()([*tensors_of(unet), latents, hidden, timesteps])
            with live:
                noise = torch.randn_like(latents)
                pred = unet(latents + noise, timesteps, hidden).sample
                held = live.current
                ((pred.float() - noise) ** 2).mean().backward()
                del pred, noise
            for p in params:
                p.grad = None
            results["on" if checkpointing else "off"] = {
                "peak_rss_rise": peak - before if can_reset else None,
                "peak_rss_rise_no_onednn": peak_plain - before_plain if can_reset else None,
                "rss_rise_after_forward": measured["rss_after_forward"] - before,
                "saved_for_backward": measured["saved"],
                "real_tracker_peak": live.peak,
                "real_tracker_held": held,
            }
    results["largest_conv_weight"] = largest_conv
    results["child_peak_rss"] = max(_HIGHEST_RSS[0], _rss()[1])
    return results


def start_cross_check() -> subprocess.Popen:
    """The real-tensor run, in a child process (its own RSS; its memory goes back when it exits), started early so
    it overlaps the fake-tensor runs (one torch thread each on the 2 cores)."""
    env = {
        **os.environ,
        "MALLOC_MMAP_THRESHOLD_": "65536",
        "MALLOC_TRIM_THRESHOLD_": "0",
        "OMP_NUM_THREADS": "1",
    }
    args = [sys.executable, MEMORY_SCRIPT, "--cross-check-child"]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_cross_check(child: subprocess.Popen, fakes: dict) -> dict:
    """The child's measurements beside the fake-tensor predictions for the same steps (fakes[checkpointing])."""
    out, err = child.communicate()
    if child.returncode:
        raise RuntimeError(f"cross-check child failed:\n{err[-3000:]}")
    real = json.loads(out.strip().splitlines()[-1])
    for mode, checkpointing in (("off", False), ("on", True)):
        fake = fakes[checkpointing]
        real[mode].update(
            fake_step_peak=fake.step_peak,
            fake_held=fake.held_after_forward,
            fake_saved=fake.saved_for_backward,
        )
    return real
