"""One preset's real training step on a device: set up as a run does, then warm-up, timed and first-epoch steps.

edtools' own code throughout (TrainConfig, prepare_modules, the caches, train_step) on synthetic batches.
"""

from __future__ import annotations

import argparse
import gc
import time
from dataclasses import dataclass, field

from configs import ARCHITECTURES  # bench/ is on sys.path when a script runs
from models import build_components, module_dtype, part_dtypes, smoke_architecture, tokenizers_for

__all__ = [
    "CAPTIONS",
    "MAX_EXTRA_WARMUP",
    "SMOKE_RESOLUTION",
    "PresetResult",
    "describe",
    "make_batches",
    "run_preset",
    "synchronize",
]

SMOKE_RESOLUTION = 128  # tiny models' own size: latents 16 x 16
CAPTIONS = 64  # distinct captions in the text-embedding cache; a batch takes the next batch_size of them
MAX_EXTRA_WARMUP = 30  # more warm-up steps while fp16's loss scale is still backing off (skipped steps)


@dataclass
class PresetResult:
    name: str
    settings: str = ""
    skipped: str | None = None  # why nothing was measured
    error: str | None = None
    parameters: dict = field(default_factory=dict)  # part -> (parameters, dtype)
    trained_params: int = 0
    batch_size: int = 0
    warmup_steps: int = 0
    steps: int = 0
    seconds_per_step: float = float("nan")
    skipped_steps: int = (
        0  # timed steps whose optimizer step was skipped (non-finite gradient: fp16 overflow)
    )
    nonfinite_steps: int = 0  # timed steps with a non-finite loss (no backward ran)
    setup_seconds: float = 0.0
    setup_peak_allocated: int | None = None  # building, prepare_modules, the text-embedding cache
    resident: int | None = None  # allocated once set up: weights (and the optimizer state after a step)
    peak_allocated: int | None = None
    peak_reserved: int | None = None
    outside_allocator: int | None = (
        None  # device memory in use beyond torch's reserved: CUDA context and such
    )
    first_epoch_steps: int = 0
    first_epoch_seconds: float = float("nan")
    first_epoch_peak_allocated: int | None = None
    first_epoch_peak_reserved: int | None = None
    recast: list = field(default_factory=list)  # parts prepare_modules cast to another dtype than built in
    estimate: dict | None = None  # bench/memory.py's for this preset

    @property
    def images_per_second(self) -> float:
        return self.batch_size / self.seconds_per_step


def make_batches(
    config, components, captions: list[str], count: int, *, cached: bool, prefix: str
) -> list[dict]:
    """Batches as edtools.data.ScheduleBatches makes them, of random data at the config's batch size and
    resolution. With a latent cache: cached=True, every image's latent comes with the batch (as batches built
    with a memory store after the first epoch); cached=False, pixels only, under keys never seen (first epoch: the
    step encodes them). Without one, pixels: the step encodes them every time."""
    import torch

    from edtools.data import token_ids

    b, side = config.batch_size, config.resolution
    channels = components.vae.config.latent_channels
    latent_dtype = components.vae.dtype  # what LatentStore.put keeps: the VAE's output
    scaling = components.vae.config.scaling_factor
    caching = config.cache_latents != "off"
    batches = []
    for i in range(count):
        names = [captions[(i * b + j) % len(captions)] for j in range(b)]
        with_latents = caching and cached
        batch = {
            "pixel_values": torch.empty(0, 3, side, side)
            if with_latents
            else torch.rand(b, 3, side, side) * 2 - 1,
            "time_ids": torch.tensor([[side, side, 0, 0, side, side]] * b, dtype=torch.int64),
            "loss_scale": torch.ones(b),
            "concept": torch.zeros(b, dtype=torch.int64),
            "image_index": torch.arange(i * b, (i + 1) * b),
            "batch_weight": 1.0,
            "epoch": 0,
            "batch": i,
            "captions": names,
            "skipped_images": [],
        }
        if caching:
            batch["latent_keys"] = [f"{prefix}-{i}-{j}" for j in range(b)]
            batch["cached_latents"] = [
                (torch.randn(channels, side // 8, side // 8) / scaling).to(latent_dtype) if cached else None
                for _ in range(b)
            ]
        for n, tokenizer in enumerate(components.tokenizers):
            batch["input_ids" if n == 0 else f"input_ids_{n + 1}"] = token_ids(tokenizer, names)
        batches.append(batch)
    return batches


def synchronize(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_preset(name: str, device, args: argparse.Namespace, result: PresetResult, folder: str) -> None:
    """Set the preset up as a run does, then warm-up, timed and first-epoch steps; fills `result`. folder: an empty
    folder for the run's data root, out and cache folders (nothing is read from them; a disk cache would write)."""
    import torch

    from edtools.config import TrainConfig
    from edtools.presets import PRESETS
    from edtools.train.runtime import make_runtime
    from edtools.train.setup import configure_noise, fill_text_cache, make_latent_cache, resolve_config
    from edtools.train.step import (
        make_grad_scaler,
        make_lr_scheduler,
        make_optimizer,
        prepare_modules,
        step_generator,
        train_step,
    )

    cuda = device.type == "cuda"
    preset = PRESETS[name]
    start = time.perf_counter()
    values = {
        "preset": name,
        "data_root": folder,  # never scanned: the batches are made here
        "model": f"random {preset.architecture}",  # never loaded: built from bench/configs.py
        "out": folder,
        "cache_dir": folder,
        "device": device.type,
        "progress_bar": False,
    }
    if args.smoke:
        values["resolution"] = SMOKE_RESOLUTION
    config = TrainConfig.from_dict(values)
    if args.smoke:
        configs, tokenizers = smoke_architecture(preset.architecture)
    else:
        configs, tokenizers = ARCHITECTURES[preset.architecture], tokenizers_for(preset.architecture)
    runtime = make_runtime(config)
    dtypes = part_dtypes(config, configs)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    components = build_components(configs, tokenizers, dtypes, runtime.device)
    config = resolve_config(config, components, runtime)
    configure_noise(components, config)
    result.settings = describe(config)
    result.batch_size = config.batch_size
    parts = {"unet": components.unet, "vae": components.vae}
    parts.update({n: getattr(components, n) for n, _, _ in configs["texts"]})

    # as train() does: the captions are cached before prepare_modules (which keeps cached encoders on the CPU)
    captions = [
        f"a photo of a {w} {i}" for i, w in enumerate(["person", "dog", "cat", "woman"] * (CAPTIONS // 4))
    ]
    text_cache = (
        fill_text_cache(components, tuple(captions), config, runtime)
        if config.cache_text_embeddings
        else None
    )
    params = prepare_modules(components, config, runtime.device)
    text_params = [p for e in components.text_encoders for p in e.parameters() if p.requires_grad]
    result.recast = [
        f"{n}: built {str(dtypes[n]).removeprefix('torch.')}, kept {str(module_dtype(m)).removeprefix('torch.')}"
        for n, m in parts.items()
        if module_dtype(m) != dtypes[n]
    ]
    result.parameters = {
        n: (sum(p.numel() for k, p in m.named_parameters() if "lora_" not in k), module_dtype(m))
        for n, m in parts.items()
    }
    result.trained_params = sum(p.numel() for p in params)
    optimizer = make_optimizer(config, params, text_params)
    first_epoch = args.first_epoch_steps if config.cache_latents != "off" else 0
    total = args.warmup + MAX_EXTRA_WARMUP + args.steps + first_epoch + 1
    lr_scheduler = make_lr_scheduler(config, optimizer, total)
    scaler = make_grad_scaler(config, runtime.device)
    latent_cache = make_latent_cache(config, components)
    batches = make_batches(config, components, captions, 4, cached=True, prefix="cached")
    step_index = [0]

    def steps(n: int, batch_list: list[dict]) -> list:
        out = []
        for _ in range(n):
            i = step_index[0]
            out.append(
                train_step(
                    components,
                    optimizer,
                    batch_list[i % len(batch_list)],
                    config=config,
                    lr_scheduler=lr_scheduler,
                    scaler=scaler,
                    latent_cache=latent_cache,
                    generator=step_generator(config.seed, 0, 0, i),
                    text_cache=text_cache,
                )
            )
            step_index[0] += 1
        return out

    synchronize(device)
    result.setup_seconds = time.perf_counter() - start
    if cuda:
        result.setup_peak_allocated = torch.cuda.max_memory_allocated(device)
        gc.collect()
        torch.cuda.empty_cache()
        result.resident = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)

    warm = steps(args.warmup, batches)
    while warm and warm[-1].skipped and len(warm) < args.warmup + MAX_EXTRA_WARMUP:
        warm += steps(1, batches)  # fp16: the loss scale starts at 2**16 and halves per overflowing step
    result.warmup_steps = len(warm)
    synchronize(device)
    began = time.perf_counter()
    timed = steps(args.steps, batches)
    synchronize(device)
    result.seconds_per_step = (time.perf_counter() - began) / args.steps
    result.steps = args.steps
    result.skipped_steps = sum(r.skipped for r in timed)
    result.nonfinite_steps = sum(r.nonfinite for r in timed)
    if cuda:
        result.peak_allocated = torch.cuda.max_memory_allocated(device)
        result.peak_reserved = torch.cuda.max_memory_reserved(device)
        free, total_bytes = torch.cuda.mem_get_info(device)
        result.outside_allocator = max(total_bytes - free - torch.cuda.memory_reserved(device), 0)

    if first_epoch:
        fresh = make_batches(
            config, components, captions, first_epoch + 1, cached=False, prefix="first-epoch"
        )
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        steps(1, fresh[:1])  # the VAE's kernels warm up
        synchronize(device)
        began = time.perf_counter()
        steps(first_epoch, fresh[1:])
        synchronize(device)
        result.first_epoch_seconds = (time.perf_counter() - began) / first_epoch
        result.first_epoch_steps = first_epoch
        if cuda:
            result.first_epoch_peak_allocated = torch.cuda.max_memory_allocated(device)
            result.first_epoch_peak_reserved = torch.cuda.max_memory_reserved(device)


def describe(config) -> str:
    mode = f"LoRA r{config.lora_rank}" if config.lora_rank else "full"
    text = []
    if config.lora_rank == 0 and config.train_text_encoder:
        text.append("+ TE")
    if config.lora_rank == 0 and config.train_text_encoder_2:
        text.append("+ TE2")
    cached = [
        n
        for n, on in (("latents", config.cache_latents != "off"), ("text", config.cache_text_embeddings))
        if on
    ]
    return " ".join(
        [mode, *text, f"{config.resolution}px b{config.batch_size} {config.mixed_precision}"]
        + (["ckpt"] if config.gradient_checkpointing else [])
        + [config.optimizer]
        + ([f"cached {' + '.join(cached)}"] if cached else [])
    )
