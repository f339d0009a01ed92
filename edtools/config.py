"""Training settings: one frozen, validated TrainConfig, filled alike from YAML/JSON, the CLI or widgets.

Every field has a type, a default and a help line; the CLI's flags are generated from them (edtools.flags).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .coerce import PAIR_FIELDS, coerce
from .errors import ConfigError
from .presets import PRESET_NAMES, PRESETS

__all__ = [
    "ConfigError",
    "LR_SCHEDULERS",
    "OPTIMIZERS",
    "TrainConfig",
    "read_config_file",
    "with_preset",
]

# diffusers.optimization schedules that need nothing beyond warmup steps and the total step count.
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
OPTIMIZERS = ("adamw8bit", "paged_adamw8bit", "lion8bit", "adamw", "prodigy")
_DEVICE = re.compile(r"^(cpu|mps|(cuda|xpu)(:\d+)?)$")


def _opt(default: Any, help: str) -> Any:
    """A dataclass field with a default and the one-line help the CLI shows."""
    return field(default=default, metadata={"help": help})


def _required(help: str) -> Any:
    return field(metadata={"help": help})


@dataclass(frozen=True)
class TrainConfig:
    """Everything one training run needs. Frozen and hashable; `dataclasses.replace` makes variants."""

    data_root: str = _required("folder of image folders (with multiply.txt / loss_scale.txt)")
    model: str = _required(
        "SD 1.x/2.x or SDXL: a diffusers folder, a single .safetensors/.ckpt file, or a Hugging Face hub id"
    )
    out: str = _required("output folder: checkpoints/, samples/, schedules/")
    model_config: str | None = _opt(
        None,
        "for a single-file model: a diffusers folder or hub id with its component configs (none = infer)",
    )
    preset: str | None = _opt(
        None, f"settings sized for a GPU, for those not given: {', '.join(PRESET_NAMES)} ('none' = no preset)"
    )
    epochs: int = _opt(10, "passes over the data root's schedule")
    batch_size: int = _opt(4, "images per batch (per process under accelerate launch)")
    resolution: int | None = _opt(
        None,
        "training side length in pixels, a multiple of 64 (aspect buckets keep the area); "
        "none = the model's own (512 SD 1.x, 768 SD 2.x-v, 1024 SDXL)",
    )
    lr: float = _opt(1e-6, "peak learning rate of a full fine-tune")
    optimizer: Literal[OPTIMIZERS] = _opt(
        "adamw8bit",
        "adamw8bit, paged_adamw8bit, lion8bit (bitsandbytes), adamw (torch) or prodigy (prodigyopt; lr 1.0)",
    )
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = _opt(
        "auto",
        "auto (bf16 where the GPU has it, else fp16; fp32 on the CPU), no, fp16 (gradient scaler) or bf16",
    )
    seed: int = _opt(555, "seed of the schedule, noise, timesteps, crops and samples")
    gradient_checkpointing: bool | None = _opt(
        None, "recompute activations in backward: less memory, slower (none = on for SDXL and GPUs <= 16 GB)"
    )
    grad_accum: int = _opt(1, "batches per optimizer step (gradient accumulation)")
    max_grad_norm: float | None = _opt(1.0, "clip the gradient norm to this ('none' = no clipping)")
    lr_scheduler: Literal[LR_SCHEDULERS] = _opt("constant", f"one of {', '.join(LR_SCHEDULERS)}")
    lr_warmup_steps: int = _opt(
        0, "optimizer steps of linear warmup (needs a *_with_warmup or decaying schedule)"
    )
    train_text_encoder: bool = _opt(True, "train the (first) text encoder too (else it is frozen)")
    text_encoder_lr: float | None = _opt(
        None,
        "learning rate of the text encoder(s) ('none' = lr; 0 keeps them as they are while the UNet trains)",
    )
    train_text_encoder_2: bool | None = _opt(
        None, "SDXL: train the second text encoder ('none' = as train_text_encoder)"
    )
    cache_text_embeddings: bool = _opt(
        False, "frozen text encoders: encode each caption once and keep it, so the encoders leave the GPU"
    )
    lora_rank: int = _opt(
        0, "train LoRA adapters of this rank instead of the whole model (0 = full fine-tune)"
    )
    lora_alpha: float | None = _opt(None, "LoRA alpha: the adapters' scale is alpha / rank ('none' = rank)")
    lora_dropout: float = _opt(0.0, "dropout on the LoRA adapters' input, 0 to < 1")
    lora_text_encoder: bool = _opt(False, "LoRA: adapters on the text encoder(s) too")
    lora_lr: float = _opt(1e-4, "peak learning rate of LoRA adapters")
    quantize_base: Literal["none", "nf4"] = _opt(
        "none",
        "LoRA on SD3 / Flux: nf4 keeps the frozen transformer in 4-bit (QLoRA, bitsandbytes; needs a CUDA GPU)",
    )
    t5: Literal["load", "8bit", "drop"] = _opt(
        "load",
        "T5-XXL text encoder (SD3, Flux): load, 8bit (bitsandbytes, CUDA GPU; needs cache_text_embeddings) or "
        "drop (SD3 only: zero T5 tokens)",
    )
    min_snr_gamma: float | None = _opt(None, "Min-SNR-gamma loss weighting, e.g. 5 ('none' = off)")
    prediction_type: Literal["epsilon", "v_prediction"] | None = _opt(
        None, "the training target: epsilon or v_prediction ('none' = the model's own)"
    )
    zero_terminal_snr: bool = _opt(
        False, "rescale the noise schedule to zero SNR at its last step (needs v_prediction)"
    )
    timestep_sampling: Literal["logit_normal", "mode", "uniform"] = _opt(
        "logit_normal",
        "flow-matching models (SD3): how training draws noise levels (diffusers' "
        "compute_density_for_timestep_sampling)",
    )
    logit_mean: float = _opt(
        0.0,
        "timestep_sampling logit_normal: the normal's mean (> 0 favours less noise, as diffusers indexes it)",
    )
    logit_std: float = _opt(1.0, "timestep_sampling logit_normal: the normal's standard deviation")
    mode_scale: float = _opt(1.29, "timestep_sampling mode: its scale (0 = uniform)")
    flow_shift: float | None = _opt(
        None, "flow-matching models: the noise schedule's shift (SD3: 3.0; 'none' = the model's own)"
    )
    flow_loss_weighting: Literal["none", "sigma_sqrt", "cosmap"] = _opt(
        "none",
        "flow-matching models: the loss weighting per noise level (diffusers' compute_loss_weighting_for_sd3)",
    )
    offset_noise: float = _opt(
        0.0, "offset noise, e.g. 0.05: lets the model learn very dark and bright images"
    )
    pyramid_noise_discount: float = _opt(0.0, "pyramid (multi-resolution) noise discount, e.g. 0.3 (0 = off)")
    caption_dropout: float = _opt(0.0, "share of images trained with an empty caption (0 to 1)")
    shuffle_tags: bool = _opt(
        False, "shuffle each caption's comma-separated tags per image and epoch (seeded)"
    )
    keep_tags: int = _opt(0, "with shuffle_tags: the first N tags keep their place")
    caption_dropouts: tuple[tuple[str, float], ...] = _opt(
        (), "caption_dropout per folder: concept=share ... (other folders: caption_dropout)"
    )
    shuffle_tags_concepts: tuple[str, ...] = _opt(
        (), "shuffle the tags of these folders' captions (other folders: shuffle_tags)"
    )
    ema_decay: float | None = _opt(
        None, "keep an exponential moving average of the trained weights, e.g. 0.999 ('none' = off)"
    )
    ema_on_cpu: bool = _opt(False, "keep the EMA weights in CPU memory (saves GPU memory, slower)")
    sample_prompts: tuple[str, ...] = _opt((), "prompts for sample images (a PNG grid per sampling)")
    sample_every_steps: int = _opt(0, "sample every N optimizer steps (0 = only at the end)")
    sample_steps: int = _opt(20, "denoising steps per sample image")
    sample_guidance_scale: float = _opt(7.5, "classifier-free guidance scale of sample images")
    checkpoint_every_epochs: int = _opt(1, "save a checkpoint every N epochs (0 = only at the end)")
    checkpoint_every_minutes: float = _opt(0.0, "also save every N minutes of training (0 = off)")
    keep_checkpoints: int = _opt(0, "keep only the newest N checkpoints (0 = keep all)")
    save_single_file: bool = _opt(
        False, "also write checkpoints/step-N.safetensors (fp16) that AUTOMATIC1111 and ComfyUI load"
    )
    max_steps: int | None = _opt(None, "stop after this many optimizer steps, resumable ('none' = no limit)")
    resume: bool = _opt(False, "continue from the newest complete checkpoint in out")
    overwrite: bool = _opt(False, "start afresh in an out folder that holds checkpoints (deletes them)")
    num_workers: int | None = _opt(
        None,
        "image decoding worker processes (0 = in the training process; none = 1 while a GPU trains and the "
        "machine has 2+ CPUs, as on Colab, else 0)",
    )
    cache_latents: Literal["off", "memory", "disk"] = _opt(
        "off", "VAE latents: off, memory (this run), or disk (across runs; each crop and flip used is kept)"
    )
    cache_dir: str | None = _opt(
        None,
        "where disk caches live ('none' = <data_root>/.edtools_cache; move it off a read-only or slow drive)",
    )
    center_crop: bool = _opt(True, "crop images at the centre (else at a seeded random place)")
    flip_p: float = _opt(0.0, "probability of a horizontal flip per image")
    write_schedule: bool = _opt(False, "write ep{N}_batch_schedule.txt per epoch into out/schedules/")
    validation_split: float = _opt(
        0.0, "share of each concept folder held out for validation loss per concept (0 = none; e.g. 0.1)"
    )
    validation_root: str | None = _opt(
        None,
        "instead of a split: a data root of validation images in folders named like the training concepts",
    )
    validate_every_epochs: int = _opt(
        1, "validation loss every N epochs, and before training (0 = not per epoch)"
    )
    validate_every_steps: int = _opt(0, "also every N optimizer steps (0 = off)")
    bleed_images: int = _opt(
        8,
        "held-out images per concept also scored under every other concept's prompt (concept bleed; 0 = off)",
    )
    concept_prompts: tuple[tuple[str, str], ...] = _opt(
        (), "each concept's prompt for the bleed measure: concept=prompt ... (else its most frequent caption)"
    )
    live_balance: bool = _opt(
        False, "re-read multiply.txt / loss_scale.txt at every epoch's start: edits apply from the next epoch"
    )
    auto_balance: bool = _opt(
        False,
        "at every epoch's start set each concept's multiplier from the validation history (raise a lagging "
        "concept, lower one that memorises or bleeds); needs a validation",
    )
    auto_balance_bounds: tuple[float, float] = _opt(
        (0.25, 4.0), "auto_balance keeps each multiplier within LOW HIGH times the user's value"
    )
    kohya_repeats: bool = _opt(
        False,
        "folders named the kohya way (10_alice) repeat their images N times where no multiply.txt exists",
    )
    multipliers: tuple[tuple[str, float], ...] = _opt((), "override multiply.txt: concept=value ...")
    loss_scales: tuple[tuple[str, float], ...] = _opt((), "override loss_scale.txt: concept=value ...")
    device: str | None = _opt(None, "cpu, cuda, cuda:1, mps ('none' = cuda when available, else cpu)")
    progress_bar: bool = _opt(True, "show a tqdm progress bar")
    log_with: Literal["none", "tensorboard"] = _opt(
        "none", "tensorboard: loss, loss per concept, learning rate, images/s, validation under out/logs/"
    )

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name), field_types()[f.name]))
        _check_ranges(self)

    # ---- conversions

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> TrainConfig:
        """A config from plain values (a parsed YAML/JSON file, widget values). Unknown keys are errors."""
        if not isinstance(values, Mapping):
            raise ConfigError(
                f"a training config must be a mapping of setting: value, got {type(values).__name__}"
            )
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ConfigError(
                f"unknown setting(s) {', '.join(map(repr, unknown))}; known settings: {', '.join(known)}"
            )
        values = with_preset(values)
        missing = [
            f.name
            for f in dataclasses.fields(cls)
            if f.default is dataclasses.MISSING and f.name not in values
        ]
        if missing:
            raise ConfigError(f"missing required setting(s): {', '.join(missing)}")
        return cls(**values)

    @classmethod
    def from_file(cls, path: str | Path) -> TrainConfig:
        """Read a .yaml/.yml or .json file of settings (all required settings included)."""
        try:
            return cls.from_dict(read_config_file(path))
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/YAML-ready values: tuples as lists, multipliers / loss_scales as {concept: value}."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in PAIR_FIELDS:
                value = dict(value)
            elif isinstance(value, tuple):
                value = list(value)
            out[f.name] = value
        return out

    def to_file(self, path: str | Path) -> Path:
        """Write the settings as YAML (.yaml/.yml) or JSON (.json); from_file reads them back equal."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix == ".json":
            text = json.dumps(self.to_dict(), indent=2, ensure_ascii=False) + "\n"
        elif suffix in (".yaml", ".yml"):
            import yaml

            text = yaml.safe_dump(self.to_dict(), sort_keys=False, allow_unicode=True)
        else:
            raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    @property
    def multiplier_overrides(self) -> dict[str, float]:
        return dict(self.multipliers)

    @property
    def loss_scale_overrides(self) -> dict[str, float]:
        return dict(self.loss_scales)

    @property
    def drops_captions(self) -> bool:
        """Whether some images train with the empty caption (globally or in some folder)."""
        return self.caption_dropout > 0 or any(share > 0 for _, share in self.caption_dropouts)

    @property
    def prompt_overrides(self) -> dict[str, str]:
        return dict(self.concept_prompts)


# ---------------------------------------------------------------------------------------------------------
# Types: each field's annotation decides what it accepts (edtools.coerce).

_HINTS: dict[str, Any] = {}


def field_types() -> dict[str, Any]:
    if not _HINTS:
        _HINTS.update(typing.get_type_hints(TrainConfig))
    return _HINTS


def _check_ranges(c: TrainConfig) -> None:
    """Value ranges and combinations; the message says the field, the value and what is allowed."""

    def need(ok: bool, name: str, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"{name} is {getattr(c, name)!r}; {allowed}")

    for name in ("data_root", "model", "out"):
        need(bool(getattr(c, name).strip()), name, "it must name a folder (or for model a hub id)")
    need(c.epochs >= 1, "epochs", "it must be >= 1")
    need(c.batch_size >= 1, "batch_size", "it must be >= 1")
    need(
        c.resolution is None or (c.resolution >= 64 and c.resolution % 64 == 0),
        "resolution",
        "it must be a multiple of 64, e.g. 512, or none for the model's own",
    )
    need(c.lr > 0, "lr", "the learning rate must be > 0, e.g. 1e-6")
    need(c.preset is None or c.preset in PRESETS, "preset", f"known presets: {', '.join(PRESET_NAMES)}")
    need(c.lora_rank >= 0, "lora_rank", "it must be >= 0 (0 = full fine-tune; 4 to 128 is usual for LoRA)")
    need(c.lora_alpha is None or c.lora_alpha > 0, "lora_alpha", "it must be > 0, or none for alpha = rank")
    need(0.0 <= c.lora_dropout < 1.0, "lora_dropout", "it must be from 0 to below 1")
    need(c.lora_lr > 0, "lora_lr", "the learning rate must be > 0, e.g. 1e-4")
    need(
        c.quantize_base == "none" or c.lora_rank > 0,
        "quantize_base",
        "a quantised base trains only LoRA adapters on top (QLoRA): set lora_rank > 0 (e.g. 16), or none",
    )
    need(
        c.t5 != "8bit" or c.cache_text_embeddings,
        "t5",
        "an 8-bit T5 encodes the captions once and is then freed: set cache_text_embeddings true too",
    )
    need(
        c.t5 != "8bit" or c.lora_rank > 0,
        "t5",
        "a full fine-tune saves the whole model, T5 included, which must not be rounded to 8 bits: set t5 load, "
        "or train LoRA (lora_rank > 0)",
    )
    need(
        not c.lora_text_encoder or c.lora_rank > 0,
        "lora_text_encoder",
        "it adds LoRA adapters to the text encoders: set lora_rank > 0 too",
    )
    need(
        not (
            c.cache_text_embeddings
            and (c.train_text_encoder or c.train_text_encoder_2 or c.lora_text_encoder)
        ),
        "cache_text_embeddings",
        "cached embeddings need frozen text encoders: set train_text_encoder false (and train_text_encoder_2, "
        "lora_text_encoder false), or cache_text_embeddings false",
    )
    need(c.weight_decay >= 0, "weight_decay", "it must be >= 0")
    need(c.seed >= 0, "seed", "it must be a whole number >= 0")
    need(c.grad_accum >= 1, "grad_accum", "it must be >= 1 (1 = no accumulation)")
    need(
        c.max_grad_norm is None or c.max_grad_norm > 0,
        "max_grad_norm",
        "it must be > 0, or none for no clipping",
    )
    need(c.lr_warmup_steps >= 0, "lr_warmup_steps", "it must be >= 0")
    need(
        c.lr_warmup_steps == 0 or c.lr_scheduler != "constant",
        "lr_warmup_steps",
        "the 'constant' schedule has no warmup: use lr_scheduler constant_with_warmup (or another schedule)",
    )
    need(
        c.min_snr_gamma is None or c.min_snr_gamma > 0,
        "min_snr_gamma",
        "it must be > 0 (5 is usual), or none",
    )
    need(c.logit_std > 0, "logit_std", "it must be > 0 (1 is usual)")
    need(math.isfinite(c.logit_mean), "logit_mean", "it must be a number (0 is usual)")
    need(math.isfinite(c.mode_scale), "mode_scale", "it must be a number (1.29 is usual)")
    need(c.flow_shift is None or c.flow_shift > 0, "flow_shift", "it must be > 0 (3.0 is SD3's), or none")
    need(c.sample_every_steps >= 0, "sample_every_steps", "it must be >= 0 (0 = only at the end)")
    need(c.sample_steps >= 1, "sample_steps", "it must be >= 1")
    need(c.sample_guidance_scale >= 0, "sample_guidance_scale", "it must be >= 0 (1 = no guidance)")
    need(c.checkpoint_every_epochs >= 0, "checkpoint_every_epochs", "it must be >= 0 (0 = only at the end)")
    need(c.checkpoint_every_minutes >= 0, "checkpoint_every_minutes", "it must be >= 0 (0 = off)")
    need(c.keep_checkpoints >= 0, "keep_checkpoints", "it must be >= 0 (0 = keep all)")
    need(c.max_steps is None or c.max_steps >= 1, "max_steps", "it must be >= 1, or none for no limit")
    need(not (c.resume and c.overwrite), "overwrite", "resume and overwrite exclude each other: choose one")
    need(c.num_workers is None or c.num_workers >= 0, "num_workers", "it must be >= 0, or none for automatic")
    need(0.0 <= c.flip_p <= 1.0, "flip_p", "it is a probability: 0 to 1")
    need(
        c.text_encoder_lr is None or c.text_encoder_lr >= 0,
        "text_encoder_lr",
        "it must be >= 0 (0 keeps the text encoders as they are), or none for lr",
    )
    need(
        not c.zero_terminal_snr or c.prediction_type != "epsilon",
        "zero_terminal_snr",
        "zero terminal SNR makes the last step pure noise, where an epsilon model has nothing to predict: "
        "set prediction_type v_prediction, or zero_terminal_snr false",
    )
    for name in ("offset_noise", "pyramid_noise_discount", "caption_dropout"):
        need(0.0 <= getattr(c, name) <= 1.0, name, "it must be from 0 to 1 (0 = off)")
    need(c.keep_tags >= 0, "keep_tags", "it must be >= 0")
    for name in ("shuffle_tags", "shuffle_tags_concepts"):
        need(
            not (getattr(c, name) and c.cache_text_embeddings),
            name,
            "shuffled tags make a new caption every epoch, so their embeddings cannot be cached: set "
            "cache_text_embeddings false",
        )
    for concept, share in c.caption_dropouts:
        if not 0.0 <= share <= 1.0:
            raise ConfigError(
                f"caption_dropouts['{concept}'] is {share:g}; it must be from 0 to 1 (0 = keep every caption)"
            )
    if len(set(c.shuffle_tags_concepts)) != len(c.shuffle_tags_concepts):
        raise ConfigError(
            f"shuffle_tags_concepts is {list(c.shuffle_tags_concepts)!r}; it names a folder twice"
        )
    need(c.ema_decay is None or 0 < c.ema_decay < 1, "ema_decay", "it must be between 0 and 1, e.g. 0.999")
    need(
        0.0 <= c.validation_split < 1.0,
        "validation_split",
        "it must be from 0 to below 1 (0.1 holds out 10%)",
    )
    need(
        not (c.validation_split and c.validation_root),
        "validation_root",
        "give validation_split or validation_root, not both",
    )
    need(c.validate_every_epochs >= 0, "validate_every_epochs", "it must be >= 0 (0 = not per epoch)")
    need(c.validate_every_steps >= 0, "validate_every_steps", "it must be >= 0 (0 = off)")
    low, high = c.auto_balance_bounds
    need(
        0 < low <= 1 <= high,
        "auto_balance_bounds",
        "it must be two factors of the user's multiplier with 0 < low <= 1 <= high, e.g. 0.25 4",
    )
    need(
        not c.auto_balance or bool(c.validation_split or c.validation_root),
        "auto_balance",
        "it decides from the validation loss per concept: set validation_split (e.g. 0.1) or validation_root",
    )
    need(
        not c.auto_balance or bool(c.validate_every_epochs or c.validate_every_steps),
        "auto_balance",
        "it decides from the validation loss per concept: set validate_every_epochs (e.g. 1)",
    )
    need(c.bleed_images >= 0, "bleed_images", "it must be >= 0 (0 = no bleed measure; 8 is the default)")
    for concept, value in c.multipliers:
        if value <= 0:
            raise ConfigError(
                f"multipliers['{concept}'] is {value:g}; a multiplier must be > 0 "
                "(e.g. 2 to repeat twice, 0.1 for a tenth of the folder per epoch)"
            )
    need(
        c.device is None or bool(_DEVICE.match(c.device)),
        "device",
        "use cpu, cuda, cuda:N, mps, or none (auto)",
    )


# ---------------------------------------------------------------------------------------------------------
# Files


def with_preset(values: Mapping[str, Any]) -> dict[str, Any]:
    """The values with their preset's settings filled in where the values do not give them."""
    values = dict(values)
    name = values.get("preset")
    if name is None:
        return values
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"preset is {name!r}; known presets: {', '.join(PRESET_NAMES)}")
    return {**PRESETS[name].settings, **values}


def _yaml_error() -> type[Exception]:
    import yaml

    return yaml.YAMLError


def _load_yaml(text: str) -> Any:
    """YAML with 1e-6 read as a number (plain YAML 1.1 reads it as text without a dot: 1.0e-6)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(
            r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
            |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
            |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
            |[-+]?\.(?:inf|Inf|INF)
            |\.(?:nan|NaN|NAN))$""",
            re.X,
        ),
        list("-+0123456789."),
    )
    return yaml.load(text, Loader=Loader)  # noqa: S506 - a SafeLoader subclass


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a .yaml/.yml or .json file as a plain mapping (not yet checked: see from_dict)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"config file {path} must end in .yaml, .yml or .json")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    try:
        values = json.loads(text) if suffix == ".json" else _load_yaml(text)
    except (ValueError, _yaml_error()) as exc:
        raise ConfigError(f"config file {path} is not valid {suffix[1:].upper()}: {exc}") from exc
    if values is None:
        return {}
    if not isinstance(values, Mapping):
        raise ConfigError(f"config file {path} must hold a mapping of setting: value")
    return dict(values)
