"""What a run is built from before its first step: the config's automatic values decided for the model and
device, the scanned data and its held-out part, the plan of steps, frozen text embeddings, DDP wrappers.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

from ..balance.schedule import build_epoch
from ..config import ConfigError, TrainConfig
from ..dataset.scan import Dataset, scan
from ..errors import require
from .checkpoint import TrainState
from .runtime import Runtime
from .step import autocast

__all__ = [
    "fill_text_cache",
    "kept_as",
    "load_data",
    "load_model",
    "planned_steps",
    "resolve_config",
    "steps_in_epoch",
    "wrap_trained",
]

log = logging.getLogger("edtools.train")


def steps_in_epoch(n_batches: int, world_size: int, grad_accum: int) -> int:
    per_rank = -(-n_batches // world_size)
    return -(-per_rank // grad_accum)


def planned_steps(
    config: TrainConfig, dataset: Dataset, buckets: Any, state: TrainState, world_size: int
) -> int:
    """Optimizer steps of the whole run as it now looks: the steps taken before the current epoch, then every
    epoch from it on with the dataset's current values. (With live_balance the plan is redone each epoch.)"""
    done_in_epoch = -(-state.batch // config.grad_accum)
    steps = state.global_step - done_in_epoch
    for epoch in range(state.epoch, config.epochs):
        schedule = build_epoch(
            dataset, epoch=epoch, seed=config.seed, batch_size=config.batch_size, buckets=buckets
        )
        steps += steps_in_epoch(schedule.n_batches, world_size, config.grad_accum)
    return max(steps, 1)


def kept_as(config: TrainConfig, runtime: Runtime) -> Any:
    """How the run keeps each part (models.Keep), decided before loading so nothing is loaded in float32 only to
    be cast down: frozen parts in the mixed-precision dtype, what trains fully (the UNet and the text encoders
    asked for, never under LoRA, whose adapters are added later) in float32, each on the run's device."""
    torch = require("torch")
    from ..models import Keep
    from ..presets import auto_precision

    device = torch.device(runtime.device)
    precision = auto_precision(
        config.mixed_precision, device.type, device.type == "cuda" and torch.cuda.is_bf16_supported()
    )
    trained = set()
    if config.lora_rank == 0:  # auto_settings' rule for train_text_encoder_2: as train_text_encoder
        second = (
            config.train_text_encoder if config.train_text_encoder_2 is None else config.train_text_encoder_2
        )
        wanted = {"unet": True, "text_encoder": config.train_text_encoder, "text_encoder_2": second}
        trained = {part for part, train in wanted.items() if train}
    frozen = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(precision)
    # LoRA with cached captions: the frozen denoiser waits on the CPU in its half dtype until the encoders are done
    # (prepare_modules places it; a full fine-tune's float32 one goes at once, and a quantised one loads onto the GPU)
    waits = config.cache_text_embeddings and config.lora_rank > 0 and config.quantize_base == "none"
    later = frozenset({"unet"}) if waits else frozenset()
    return Keep(
        dtype=frozen,
        float32=frozenset(trained),
        device=runtime.device,
        quantize=config.quantize_base,
        t5=config.t5,
        later=later,
    )


def load_model(config: TrainConfig, runtime: Runtime, resume_from: Path | None = None) -> Any:
    """The model as the run keeps it: a full fine-tune resumes from the checkpoint's own weights, LoRA from the
    base model (its adapters come from the checkpoint)."""
    from ..models import load_components
    from ..models.quantize import check_quantization, check_t5_quantization

    keep = kept_as(config, runtime)
    # a machine that cannot quantise (no GPU) fails here, before any weight is read
    check_quantization(config.quantize_base, keep.dtype_of("unet"))
    check_t5_quantization(config.t5)
    if resume_from is not None and config.lora_rank == 0:
        return load_components(str(resume_from), keep=keep)
    return load_components(config.model, model_config=config.model_config, keep=keep)


def resolve_config(config: TrainConfig, components: Any, runtime: Runtime) -> TrainConfig:
    """The config with its automatic values (resolution, precision, checkpointing) decided for this model and
    device; checkpoints store the decided values, so a resumed run compares like with like."""
    torch = require("torch")
    from ..models.families import family_of
    from ..presets import auto_settings

    device = torch.device(runtime.device)
    cuda = device.type == "cuda"
    family = family_of(components)
    resolved = auto_settings(
        config,
        architecture=family.name,
        native_resolution=family.native_resolution(components),
        device_type=device.type,
        bf16_supported=cuda and torch.cuda.is_bf16_supported(),
        gpu_gib=torch.cuda.get_device_properties(device).total_memory / 2**30 if cuda else None,
    )
    if resolved.resolution % 64:
        raise ConfigError(
            f"the model's own resolution is {resolved.resolution}, not a multiple of 64: set resolution, e.g. 512"
        )
    if resolved.save_single_file and not resolved.lora_rank and not family.single_files:
        raise ConfigError(
            f"save_single_file is set, but edtools writes {family.label} models as diffusers folders only (each "
            "checkpoint is one): set save_single_file false"
        )
    return resolved


def cache_folder(config: TrainConfig) -> Path:
    """Where disk caches live: cache_dir, else <data_root>/.edtools_cache (hidden: scans skip it). Checked
    writable, with what to do when it is not (a read-only or slow drive)."""
    folder = Path(config.cache_dir or Path(config.data_root) / ".edtools_cache").expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(
            f"cache_latents is disk but {folder} cannot be written ({exc.strerror or exc}); set cache_dir to a "
            "writable folder (on Colab a local one such as /content/edtools_cache), or cache_latents memory"
        ) from None
    return folder


def make_latent_cache(config: TrainConfig, components: Any) -> Any:
    """The run's LatentCache: none (a fresh sample each step), in memory, or on disk under the cache folder
    in a subfolder named for the VAE."""
    from ..data import LatentCache, LatentStore, vae_key

    if config.cache_latents == "off":
        return LatentCache(None)
    if config.cache_latents == "memory":
        return LatentCache(LatentStore("memory"))
    return LatentCache(LatentStore("disk", cache_folder(config), vae_key(components.vae)))


_FLOW_DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def configure_noise(components: Any, config: TrainConfig) -> None:
    """The noise scheduler the run trains with: the model's, with the chosen prediction type and zero terminal
    SNR, or for a flow-matching model its flow_shift (recorded in its config, so saved models say what they
    were trained for). Settings of the other kind of objective are refused."""
    from ..models.components import FLOW_MATCHING
    from .noise import noise_scheduler_for

    if components.prediction_type == FLOW_MATCHING:
        asked = {
            "prediction_type": config.prediction_type,
            "zero_terminal_snr": config.zero_terminal_snr or None,
            "min_snr_gamma": config.min_snr_gamma,
        }
        asked = {name: value for name, value in asked.items() if value is not None}
        if asked:
            settings = ", ".join(f"{name} {value}" for name, value in asked.items())
            raise ConfigError(
                f"the model {config.model} is trained by flow matching (it learns noise - latents at shifted "
                f"sigmas), which has no DDPM noise schedule: {settings} do not apply to it; leave them unset"
            )
        scheduler = components.noise_scheduler
        if config.flow_shift is not None and scheduler.config.get("use_dynamic_shifting", False):
            raise ConfigError(
                f"flow_shift is {config.flow_shift}, but the model {config.model} shifts its noise levels by "
                "image size when sampling (use_dynamic_shifting, as Flux.1 does) and trains on unshifted ones, "
                "as diffusers' training scripts do; leave flow_shift unset"
            )
        if config.flow_shift is not None:  # recorded in the scheduler's config: saved models say it
            components.noise_scheduler = type(scheduler).from_config(
                {**scheduler.config, "shift": config.flow_shift}
            )
        return
    flow = {
        name: getattr(config, name)
        for name in (
            "timestep_sampling",
            "logit_mean",
            "logit_std",
            "mode_scale",
            "flow_shift",
            "flow_loss_weighting",
        )
        if getattr(config, name) != _FLOW_DEFAULTS[name]
    }
    if flow:
        settings = ", ".join(f"{name} {value}" for name, value in flow.items())
        raise ConfigError(
            f"{settings}: these settings are for flow-matching models (SD3); the model {config.model} is "
            f"trained on a DDPM noise schedule ({components.prediction_type}). Leave them at their defaults"
        )
    components.noise_scheduler = noise_scheduler_for(
        components.noise_scheduler,
        prediction_type=config.prediction_type,
        zero_terminal_snr=config.zero_terminal_snr,
    )
    if config.zero_terminal_snr and components.prediction_type != "v_prediction":
        raise ConfigError(
            f"zero_terminal_snr is set but the model {config.model} predicts epsilon: at zero SNR an epsilon model "
            "has nothing to predict. Set prediction_type v_prediction (the model then learns a new target: train "
            "longer), or zero_terminal_snr false"
        )


def fill_text_cache(components: Any, captions: tuple[str, ...], config: TrainConfig, runtime: Runtime) -> Any:
    """Encode every caption (training and validation, the sample prompts, and the empty one: dropped captions,
    samples' negative prompt, a stand-in batch) once with the frozen text encoders. Then a LoRA run frees its T5
    encoders (deleted, not moved: host RAM does not keep ~9 GB; samples read the cache, and a resumed run loads
    T5 again), and the other encoders move to the CPU: the steps read the cache (samples bring those encoders
    back for a moment). A full fine-tune keeps its T5 on the CPU: the model it saves includes it."""
    import gc

    from ..models.conditioning import TextEmbeddingCache, encoders_key
    from ..models.families import family_of

    folder = None
    if config.cache_latents == "disk":  # a disk cache keeps the captions' embeddings beside the latents
        folder = cache_folder(config) / "text" / encoders_key(components)
    cache = TextEmbeddingCache(folder)
    with autocast(config, runtime.device):
        cache.fill(components, captions + tuple(config.sample_prompts) + ("",))
    if config.lora_rank > 0:
        for spec in family_of(components).text_encoders:
            if spec.is_t5 and getattr(components, spec.part) is not None:
                setattr(components, spec.part, None)
                setattr(components, spec.tokenizer, None)
                cache.freed += (spec.part,)
        if cache.freed:
            gc.collect()
            torch = require("torch")
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            log.info("text embeddings cached; freed %s", ", ".join(cache.freed))
    for encoder in components.text_encoders:
        encoder.to("cpu")
    return cache


def wrap_trained(components: Any, runtime: Runtime) -> Any:
    """The components with every module that has trainable weights wrapped for several processes (DDP)."""

    def trains(module: Any) -> bool:
        return module is not None and any(p.requires_grad for p in module.parameters())

    changes = {
        name: runtime.wrap(getattr(components, name))
        for name in ("unet", "text_encoder", "text_encoder_2")
        if trains(getattr(components, name))
    }
    return dataclasses.replace(components, **changes)


def load_data(config: TrainConfig, main: bool) -> tuple[Dataset, Dataset | None]:
    """Scan the data root (logging each applied multiply.txt / loss_scale.txt and each warning on the main
    process), refuse errors, apply the config's overrides, hold out the validation images. Returns
    (training images, validation images or None)."""
    from ..balance.holdout import match_validation_root, split_validation
    from ..data import concept_caption_settings
    from ..dataset.scan import DatasetError

    result = scan(config.data_root, kohya_repeats=config.kohya_repeats)
    for line in result.log:
        log.log(logging.INFO if main else logging.DEBUG, line)
    for problem in result.warnings:
        log.log(logging.WARNING if main else logging.DEBUG, "%s", problem)
    dataset = result.raise_for_errors()
    try:
        dataset = dataset.with_values(config.multiplier_overrides, config.loss_scale_overrides)
    except DatasetError as exc:
        raise ConfigError(f"multipliers / loss_scales: {exc}") from None
    concept_caption_settings(config, dataset.concept_paths)  # a folder misnamed there fails before loading
    if config.validation_root:
        return dataset, match_validation_root(dataset, scan(config.validation_root).raise_for_errors())
    if config.validation_split:
        return split_validation(dataset, config.validation_split, config.seed)
    return dataset, None
