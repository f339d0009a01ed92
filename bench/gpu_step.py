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
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import re
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from configs import ARCHITECTURES, SD15_UNET, SD_NOISE_SCHEDULER  # bench/ is on sys.path when a script runs

GIB = 2**30
SMOKE_RESOLUTION = 128  # tiny models' own size: latents 16 x 16
CAPTIONS = 64  # distinct captions in the text-embedding cache; a batch takes the next batch_size of them
MAX_EXTRA_WARMUP = 30  # more warm-up steps while fp16's loss scale is still backing off (skipped steps)
FITS_RULE = 0.9  # a preset runs on a GPU with at least this share of its gpu_gib (as edtools.presets chooses)

# ---------------------------------------------------------------------------------------------------------------
# Presets: real-size models, edtools' own setup and train_step.
# ---------------------------------------------------------------------------------------------------------------


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


@contextlib.contextmanager
def default_dtype(dtype):
    import torch

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def smoke_architecture(architecture: str) -> tuple[dict, tuple]:
    """Tiny configs of an architecture (edtools.models.tiny_components, real block structure) and its tokenizers:
    the same build, setup and step as the real sizes, on the CPU in seconds."""
    from edtools.models import tiny_components

    tiny = tiny_components("sdxl" if architecture == "sdxl" else "sd1", real_blocks=True, sample_size=16)

    def diffusers_config(module) -> dict:
        return {k: v for k, v in module.config.items() if not k.startswith("_")}

    def text_config(encoder) -> dict:
        values = encoder.config.to_dict()
        for key in (
            "dtype",
            "torch_dtype",
            "_name_or_path",
            "architectures",
            "transformers_version",
            "model_type",
        ):
            values.pop(key, None)
        return values

    texts = [("text_encoder", text_config(tiny.text_encoder), False)]
    if tiny.text_encoder_2 is not None:
        texts.append(("text_encoder_2", text_config(tiny.text_encoder_2), True))
    configs = {"unet": diffusers_config(tiny.unet), "vae": diffusers_config(tiny.vae), "texts": tuple(texts)}
    return configs, tiny.tokenizers


def tokenizers_for(architecture: str) -> tuple:
    """CLIP tokenizers with a generated vocabulary (nothing to download): every caption is padded or cut to 77
    tokens as by the real ones, so the text encoders do the same work."""
    from edtools.models import tiny_tokenizer

    with tempfile.TemporaryDirectory(prefix="gpu-step-tokenizer-") as tmp:
        first = tiny_tokenizer(Path(tmp) / "1")
        second = tiny_tokenizer(Path(tmp) / "2", pad_token="!") if architecture == "sdxl" else None
    return (first,) if second is None else (first, second)


def part_dtypes(config, configs: dict) -> dict:
    """The dtype each part is built in: the one edtools.train.step.prepare_modules keeps it in (trained weights
    float32, frozen ones in the mixed-precision dtype, a VAE with force_upcast float32), so prepare_modules casts
    nothing. run_preset checks that it did not."""
    import inspect

    import torch
    from diffusers import AutoencoderKL

    from edtools.train.step import weight_dtype

    frozen = weight_dtype(config)
    lora = config.lora_rank > 0
    upcast_default = inspect.signature(AutoencoderKL.__init__).parameters["force_upcast"].default
    trained = {"text_encoder": config.train_text_encoder, "text_encoder_2": bool(config.train_text_encoder_2)}
    dtypes = {
        "unet": frozen if lora else torch.float32,
        "vae": torch.float32 if configs["vae"].get("force_upcast", upcast_default) else frozen,
    }
    for name, _, _ in configs["texts"]:
        dtypes[name] = torch.float32 if trained[name] and not lora else frozen
    return dtypes


def build_components(configs: dict, tokenizers: tuple, dtypes: dict, device, seed: int = 0):
    """SDComponents of random weights made on `device` in `dtypes`: every parameter is created (and initialised by
    the module's own init) once, where and as it will stay."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from edtools.models import SDComponents

    torch.manual_seed(seed)
    with torch.device(device):
        with default_dtype(dtypes["unet"]):
            unet = UNet2DConditionModel(**configs["unet"])
        with default_dtype(dtypes["vae"]):
            vae = AutoencoderKL(**configs["vae"])
        encoders = {}
        for name, config, projection in configs["texts"]:
            model_class = CLIPTextModelWithProjection if projection else CLIPTextModel
            with default_dtype(dtypes[name]):
                encoders[name] = model_class(CLIPTextConfig(**config))
    for module in (unet, vae, *encoders.values()):
        module.eval()  # as from_pretrained returns them
    return SDComponents(
        unet,
        encoders["text_encoder"],
        tokenizers[0],
        vae,
        DDPMScheduler(**SD_NOISE_SCHEDULER),
        text_encoder_2=encoders.get("text_encoder_2"),
        tokenizer_2=tokenizers[1] if len(tokenizers) > 1 else None,
    )


def module_dtype(module):
    """The dtype of a module's own (base) weights, LoRA adapters left out."""
    return next(p.dtype for n, p in module.named_parameters() if "lora_" not in n)


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
    captions = [
        f"a photo of a {w} {i}" for i, w in enumerate(["person", "dog", "cat", "woman"] * (CAPTIONS // 4))
    ]
    text_cache = (
        fill_text_cache(components, tuple(captions), config, runtime)
        if config.cache_text_embeddings
        else None
    )
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


def estimate_task(name: str) -> dict:
    """bench/memory.py's estimate of one preset's training step (fake tensors; run in a worker process)."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    import torch

    torch.set_num_threads(1)
    import memory  # bench/memory.py

    from edtools.presets import PRESETS

    step = memory.simulate_step(memory.Setup.from_preset(PRESETS[name]))
    return {
        "weights": dict(step.weights),
        "optimizer": step.optimizer,
        "step_peak": step.step_peak,
        "tensor_peak": step.tensor_peak,
        "estimate": step.estimate,
    }


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GIB:.2f}"


def run_presets(args: argparse.Namespace, device) -> None:
    import memory  # bench/memory.py: usable memory per GPU size and its verdict rule
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
        if total_gib is not None and total_gib < preset.gpu_gib * FITS_RULE and not args.force:
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
        print_result(result, PRESETS[name], memory)
    if args.markdown:
        print()
        print(markdown(results, PRESETS, memory, gpu, total_gib, args))
    if failed:
        sys.exit(f"bench/gpu_step.py: {', '.join(failed)} failed (tracebacks above)")


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


def verdict_of(result: PresetResult, preset, memory) -> str:
    """memory.py's rule (fits <= 85 % of the usable memory, tight <= 100 %) on the measured total: peak reserved
    plus what lies outside the allocator."""
    if result.peak_reserved is None or result.outside_allocator is None:
        return "n/a"
    reserved = max(result.peak_reserved, result.first_epoch_peak_reserved or 0)
    return memory.verdict(reserved + result.outside_allocator, preset.gpu_gib)


def print_result(result: PresetResult, preset, memory) -> None:
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
        usable = memory.usable_gib(preset.gpu_gib)
        print(
            f"  memory GiB: peak allocated {gib(result.peak_allocated)}, peak reserved {gib(result.peak_reserved)}, "
            f"outside the allocator {gib(result.outside_allocator)}; resident after setup {gib(result.resident)}, "
            f"setup peak {gib(result.setup_peak_allocated)}; preset sized for {preset.gpu_gib:g} GB ({usable:.1f} "
            f"GiB usable): {verdict_of(result, preset, memory)}"
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


def markdown(results: dict, presets, memory, gpu: str, total_gib: float | None, args) -> str:
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
                f"{p.gpu_gib:g} ({memory.usable_gib(p.gpu_gib):.1f}) | | | {why} |"
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
            + f" | {p.gpu_gib:g} ({memory.usable_gib(p.gpu_gib):.1f}) | {verdict_of(r, p, memory)} | {first} | "
            f"{'; '.join(notes)} |"
        )
    lines.append("")
    lines.append(
        "GiB throughout. Peaks from the first step on (building and the text-embedding cache before it are not "
        "counted); outside allocator: device memory in use beyond torch's reserved (CUDA context and libraries). "
        "Verdict: memory.py's rule on peak reserved + outside allocator."
    )
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# --unet: the hand-written SD1.5 UNet step, batch 1/4/8, with model FLOPs utilisation.
# ---------------------------------------------------------------------------------------------------------------

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
TEXT_TOKENS = 77

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


# ---------------------------------------------------------------------------------------------------------------


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
