"""One training step: train_step (latents, noise, text encoder, UNet, loss_scale-weighted loss, optimizer step)
and what it needs: the optimizer, the LR and fp16 loss-scale schedules, autocast, the step's generator.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import TrainConfig
from ..errors import MissingDependency, quiet_harmless_warnings, require
from ..models.families import family_of

if TYPE_CHECKING:
    import torch

    from ..models import SDComponents
    from ..models.families.base import FlowSettings

__all__ = [
    "StepResult",
    "flow_settings",
    "make_grad_scaler",
    "make_lr_scheduler",
    "learning_rate",
    "make_optimizer",
    "prepare_modules",
    "step_generator",
    "train_step",
]

log = logging.getLogger("edtools.train")

_TAG_STEP = 0xB0  # keeps the noise/timestep streams apart from the schedule's and the augmentations'


@dataclass
class StepResult:
    """One batch's outcome. loss is the batch's objective (loss_scale, batch weight and Min-SNR applied);
    per_sample is each image's plain MSE. stepped: this batch closed an accumulation group and the optimizer
    stepped; skipped: it closed one and the step was skipped (non-finite loss or gradient)."""

    loss: float
    per_sample: Any  # torch.Tensor float32 [n] on the CPU
    nonfinite: bool
    stepped: bool = False
    skipped: bool = False
    grad_norm: float | None = None
    lr: float | None = None


def flow_settings(config: TrainConfig) -> FlowSettings:
    """A flow-matching family's training density and loss weighting, from the run's settings."""
    from ..models.families.base import FlowSettings

    return FlowSettings(
        timestep_sampling=config.timestep_sampling,
        logit_mean=config.logit_mean,
        logit_std=config.logit_std,
        mode_scale=config.mode_scale,
        loss_weighting=config.flow_loss_weighting,
    )


def step_generator(seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The CPU generator of one batch's noise, timesteps and VAE sample: a pure function of its arguments."""
    torch = require("torch")
    words = np.random.SeedSequence([seed, _TAG_STEP, epoch, rank, batch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator("cpu")
    generator.manual_seed(((int(words[0]) << 32) | int(words[1])) & (2**63 - 1))
    return generator


def _import_bitsandbytes() -> Any:
    """bitsandbytes >= 0.50 (its 8-bit AdamW runs on CPU and GPU), or an error that says what to do."""
    quiet_harmless_warnings()
    try:
        import bitsandbytes
    except ImportError as exc:
        raise MissingDependency(
            "optimizer adamw8bit needs bitsandbytes >= 0.50: pip install -U 'bitsandbytes>=0.50' "
            "(or set optimizer: adamw, which takes 4x the optimizer memory)"
        ) from exc
    version = tuple(int(p) for p in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if version < (0, 50):
        raise MissingDependency(
            f"optimizer adamw8bit needs bitsandbytes >= 0.50 (found {bitsandbytes.__version__}): "
            "pip install -U 'bitsandbytes>=0.50' (or set optimizer: adamw)"
        )
    return bitsandbytes


def learning_rate(config: TrainConfig) -> float:
    """The peak learning rate of what trains: lora_lr for LoRA adapters, lr for a full fine-tune."""
    return config.lora_lr if config.lora_rank > 0 else config.lr


def make_optimizer(
    config: TrainConfig, params: Sequence[Any], text_encoder_params: Sequence[Any] = ()
) -> Any:
    """The optimizer by name, from maintained libraries only: bitsandbytes' AdamW8bit, PagedAdamW8bit and
    Lion8bit (8-bit state for tensors of 4096+ values), torch's AdamW, prodigyopt's Prodigy (which finds its own
    step size: lr 1.0). text_encoder_params (a subset of params) get text_encoder_lr when it is set."""
    lr = learning_rate(config)
    text = {id(p) for p in text_encoder_params}
    groups: list[dict[str, Any]] = [{"params": [p for p in params if id(p) not in text], "lr": lr}]
    if text:
        te_lr = lr if config.text_encoder_lr is None else config.text_encoder_lr
        groups.append({"params": [p for p in params if id(p) in text], "lr": te_lr})
    groups = [g for g in groups if g["params"]]
    name, decay = config.optimizer, config.weight_decay
    if name in ("adamw8bit", "paged_adamw8bit", "lion8bit"):
        bnb = _import_bitsandbytes()
        optimizer_class = {
            "adamw8bit": bnb.optim.AdamW8bit,
            "paged_adamw8bit": bnb.optim.PagedAdamW8bit,
            "lion8bit": bnb.optim.Lion8bit,
        }[name]
        return optimizer_class(groups, lr=lr, weight_decay=decay)
    if name == "prodigy":
        prodigyopt = require("prodigyopt", feature="optimizer prodigy")
        return prodigyopt.Prodigy(groups, lr=lr, weight_decay=decay)
    torch = require("torch")
    return torch.optim.AdamW(groups, lr=lr, weight_decay=decay)


def make_lr_scheduler(config: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    """diffusers' schedule by name, with warmup, over the run's total optimizer steps."""
    optimization = require("diffusers.optimization")
    return optimization.get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max(int(total_steps), 1),
    )


def make_grad_scaler(config: TrainConfig, device: Any) -> Any:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    torch = require("torch")
    device_type = torch.device(device).type
    enabled = config.mixed_precision == "fp16"
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")  # torch < 2.3


def autocast(config: TrainConfig, device: Any):
    torch = require("torch")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _cuda_devices(device: Any) -> list[int]:
    torch = require("torch")
    device = torch.device(device)
    return [device.index or 0] if device.type == "cuda" else []


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when it is True on any (one all-reduce; just `flag` when not distributed)."""
    if not _distributed():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _grad_norm(params: list, max_norm: float | None) -> float:
    """Total gradient norm before clipping; clips to max_norm when given."""
    torch = require("torch")
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params]
    if hasattr(torch.nn.utils, "get_total_norm"):
        return float(torch.nn.utils.get_total_norm(grads))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


def weight_dtype(config: TrainConfig) -> torch.dtype:
    """The dtype of frozen weights: the mixed-precision dtype (half the memory), float32 without it."""
    torch = require("torch")
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision, torch.float32)


def _place(module: Any, device: Any, dtype: torch.dtype | None) -> None:
    """Move and cast a module. torch's own Module.to: diffusers' override warns on every cast, even of models
    that keep nothing in float32."""
    torch = require("torch")
    torch.nn.Module.to(module, device=device, dtype=dtype)


def _checkpoint_text_encoder(text_encoder: Any) -> None:
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
        text_encoder.activation_checkpointing_enable({"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_modules(components: SDComponents, config: TrainConfig, device: Any) -> list:
    """Move to the device, freeze what does not train, add LoRA adapters when lora_rank > 0, turn on gradient
    checkpointing if asked. Trained weights are float32 (autocast computes in half precision); frozen ones are
    stored in the mixed-precision dtype, except a VAE whose config asks for float32 (SDXL's force_upcast).
    Attention stays on diffusers' default processor, which runs torch's scaled_dot_product_attention.
    Returns the trainable parameters: UNet first, then the text encoder(s); for LoRA only the adapters."""
    torch = require("torch")
    frozen = weight_dtype(config)
    vae_dtype = torch.float32 if getattr(components.vae.config, "force_upcast", False) else frozen
    _place(components.vae.requires_grad_(False).eval(), device, vae_dtype)
    encoders = components.text_encoders
    # cached captions (train.setup.fill_text_cache, done before): the frozen encoders wait on the CPU
    text_device = "cpu" if config.cache_text_embeddings else device
    if config.lora_rank > 0:
        from ..models.lora import add_lora
        from ..models.quantize import is_quantized

        # a quantised denoiser keeps its 4-bit weights (loaded on the device), and its other layers the dtype
        # they were loaded in: the mixed-precision one
        quantized = is_quantized(components.unet)
        _place(components.unet.requires_grad_(False), device, None if quantized else frozen)
        for encoder in encoders:  # an 8-bit T5 stays as bitsandbytes placed it (int8 weights are not cast)
            _place(
                encoder.requires_grad_(False).eval(), text_device, None if is_quantized(encoder) else frozen
            )
        params = add_lora(
            components,
            rank=config.lora_rank,
            alpha=config.lora_alpha,
            dropout=config.lora_dropout,
            text_encoders=config.lora_text_encoder,
            seed=config.seed,
        )
        for param in params:  # adapters train in float32 beside their half-precision base layers
            param.data = param.data.float()
        components.unet.train()
        adapted = family_of(components).trainable_text_encoders  # add_lora adapts these
        trained_encoders = tuple(
            getattr(components, name) for name in adapted if getattr(components, name) is not None
        )
        trained_encoders = trained_encoders if config.lora_text_encoder else ()
    else:
        _place(components.unet.requires_grad_(True).train(), device, torch.float32)
        params = list(components.unet.parameters())
        wanted = (config.train_text_encoder, bool(config.train_text_encoder_2))
        trained_encoders = tuple(e for e, train in zip(encoders, wanted, strict=False) if train)
        for encoder in encoders:
            if encoder in trained_encoders:
                _place(encoder.requires_grad_(True).train(), device, torch.float32)
                params += list(encoder.parameters())
            else:
                _place(encoder.requires_grad_(False).eval(), text_device, frozen)
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
        for encoder in trained_encoders:
            encoder.train()
            _checkpoint_text_encoder(encoder)
    return params


def _stand_in_batch(components: SDComponents, batch: dict, text_cache: Any) -> dict:
    """A batch of weight 0 in place of one whose every image failed to decode, for a rank under DDP: its
    forward and backward join the gradient all-reduce of the other ranks' step and add nothing to it.
    One zero latent of the batch's size, the empty caption, the image's own size as SDXL time ids."""
    torch = require("torch")
    from ..data import token_ids

    height, width = batch["pixel_values"].shape[-2:]
    vae = components.vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latents = torch.zeros(1, vae.config.latent_channels, height // scale, width // scale, device=vae.device)
    if text_cache is not None:
        text_cache.fill(components, [""])
    stand_in = {
        "latents": latents,
        "captions": [""],
        "time_ids": torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.int64),
        "loss_scale": torch.zeros(1),
        "concept": torch.zeros(1, dtype=torch.int64),
        "image_index": torch.zeros(1, dtype=torch.int64),
        "batch_weight": 0.0,
    }
    for n, tokenizer in enumerate(components.tokenizers):
        stand_in["input_ids" if n == 0 else f"input_ids_{n + 1}"] = token_ids(tokenizer, [""])
    return {**batch, **stand_in}


def train_step(
    components: SDComponents,
    optimizer: Any,
    batch: dict,
    *,
    config: TrainConfig,
    lr_scheduler: Any,
    scaler: Any,
    latent_cache: Any,
    generator: torch.Generator,
    sync: bool = True,
    nonfinite_before: bool = False,
    text_cache: Any = None,
) -> StepResult:
    """Train one batch: VAE latents (no grad) -> noise and timesteps from `generator` -> add_noise -> text
    encoder -> UNet -> target by prediction type -> per-image MSE -> optional Min-SNR weights -> loss with
    loss_scale, batch weight and the nominal batch size -> backward of loss / grad_accum.

    sync: this batch closes an accumulation group (always when grad_accum is 1); then gradients are unscaled
    (fp16), checked, clipped, and the optimizer and LR scheduler step. A non-finite loss in the group (this
    batch, or an earlier one: nonfinite_before) or a non-finite gradient skips the optimizer step: weights and
    optimizer state stay untouched and the gradients are dropped. components.unet / text encoders may be
    DistributedDataParallel wrappers: gradients then sync on the closing batch only. text_cache: a filled
    models.conditioning.TextEmbeddingCache (frozen text encoders), else the encoders run on the batch.
    """
    torch = require("torch")
    from ..models.conditioning import encode_text, unet_conditioning
    from ..models.families import family_of
    from .loss import batch_loss, compute_snr, min_snr_weights, per_sample_mse
    from .noise import training_noise

    unet, vae, noise_scheduler = components.unet, components.vae, components.noise_scheduler
    encoders = components.text_encoders
    text_grad = any(p.requires_grad for encoder in encoders for p in encoder.parameters())
    fp16 = scaler is not None and scaler.is_enabled()
    device = vae.device
    distributed = _distributed()
    stand_in = len(batch["image_index"]) == 0 and distributed
    if stand_in:  # every image failed to decode, but the other ranks' backward all-reduces: join it
        batch = _stand_in_batch(components, batch, text_cache)
    if len(batch["image_index"]) == 0:  # every image of the batch failed to decode: nothing to learn here
        per_sample, loss_value, nonfinite = torch.zeros(0), 0.0, False
    else:
        with ExitStack() as stack:
            # Dropout (LoRA's, a model's own) draws from torch's global generator: seed it from this batch's
            # generator for the step, and give the caller's state back afterwards. Resume stays exact.
            stack.enter_context(torch.random.fork_rng(devices=_cuda_devices(device)))
            torch.manual_seed(generator.initial_seed())
            if not sync:  # no gradient all-reduce until the group's last batch
                for module in (unet, *encoders):
                    if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                        stack.enter_context(module.no_sync())
            family = family_of(components)
            if stand_in:
                latents = batch["latents"]
            else:
                latents = latent_cache.latents(batch, vae, vae.config.scaling_factor, generator=generator)
                latents = family.shift_latents(vae, latents)
            latents = latents.float()
            n = latents.shape[0]
            noise = training_noise(
                tuple(latents.shape),
                generator,
                offset=config.offset_noise,
                pyramid_discount=config.pyramid_noise_discount,
            ).to(device)
            # schedule positions: DDPM timesteps, or indices of a flow-matching model's sigmas
            flow = flow_settings(config)
            timesteps = family.training_positions(noise_scheduler, n, generator, flow).to(device)
            noisy, model_timesteps = family.noisy_input(noise_scheduler, latents, noise, timesteps)
            target = family.prediction_target(noise_scheduler, latents, noise, timesteps)
            with autocast(config, device):
                if text_cache is not None:
                    embeddings = text_cache.get(batch["captions"])
                else:
                    ids = [batch[key] for key in ("input_ids", "input_ids_2", "input_ids_3") if key in batch]
                    with torch.set_grad_enabled(text_grad):
                        embeddings = encode_text(components, ids)
                conditioning = unet_conditioning(components, embeddings, batch.get("time_ids"), device=device)
                model_pred = family.denoise(unet, noisy, model_timesteps, conditioning)
            per_sample = per_sample_mse(model_pred, target)
            snr_weights = family.loss_weights(noise_scheduler, timesteps, flow)  # flow matching's weighting
            if config.min_snr_gamma is not None:
                snr_weights = min_snr_weights(
                    compute_snr(noise_scheduler, timesteps),
                    config.min_snr_gamma,
                    noise_scheduler.config.prediction_type,
                )
            loss = batch_loss(
                per_sample,
                batch["loss_scale"],
                nominal_batch_size=config.batch_size,
                batch_weight=float(batch["batch_weight"]),
                snr_weights=snr_weights,
            )
            loss_value = float(loss.detach())
            nonfinite = not math.isfinite(loss_value)
            if nonfinite:
                log.warning(
                    "loss is %s at epoch %s batch %s: this optimizer step is skipped (weights and optimizer "
                    "state unchanged)",
                    loss_value,
                    batch.get("epoch"),
                    batch.get("batch"),
                )
            # Under DDP the closing batch's backward all-reduces gradients, so every rank must run it; the
            # non-finite gradients it then holds are dropped below on all ranks alike.
            if not nonfinite or (distributed and sync):
                scaled = loss / config.grad_accum
                (scaler.scale(scaled) if fp16 else scaled).backward()
    if stand_in:
        per_sample = per_sample[:0]  # the stand-in is no image: nothing to count
    result = StepResult(loss=loss_value, per_sample=per_sample.detach().float().cpu(), nonfinite=nonfinite)
    if not sync:
        return result

    result.lr = float(lr_scheduler.get_last_lr()[0])
    skip = _any_rank(nonfinite_before or nonfinite, device)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if fp16:
        scaler.unscale_(optimizer)
    if not skip and params:
        result.grad_norm = _grad_norm(params, config.max_grad_norm)
        if not math.isfinite(result.grad_norm):
            skip = True
            level = logging.INFO if fp16 else logging.WARNING  # fp16 overflow is routine: the scale backs off
            log.log(level, "gradient norm is %s: this optimizer step is skipped", result.grad_norm)
    if skip:
        optimizer.zero_grad(set_to_none=True)
        if fp16:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    else:
        if fp16:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()  # also on a skipped step: the LR curve follows the schedule's steps
    result.stepped, result.skipped = not skip, skip
    return result
