"""One training step and the caching pass of a preset's settings, simulated on fake tensors at the real sizes.

Weights and optimizer state are exact bytes; the step's peak is the live-bytes tracker's over forward + backward.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import dataclass, field

from memory_budget import allowance as budget_allowance
from memory_bytes import optimizer_state_bytes
from memory_trace import (
    cuda_autocast_rules,
    gpu_attention,
    live_tracker_class,
    saved_tensor_bytes,
    tensors_of,
    to_fake,
)
from models import ARCH_LABEL, ARCHS, TEXT_TOKENS, build_text, build_unet, build_vae

__all__ = ["CachingPass", "Setup", "StepMemory", "simulate_caching", "simulate_step"]


@dataclass
class Setup:
    arch: str
    resolution: int
    batch_size: int
    mixed_precision: str  # fp16 | bf16 | no
    gradient_checkpointing: bool
    optimizer: str = "adamw8bit"
    lora_rank: int = 0
    lora_alpha: float | None = None
    train_text_encoder: bool = False
    train_text_encoder_2: bool = False
    cache_latents: bool = True
    cache_text_embeddings: bool = False
    half_weights: bool = False  # trained weights and their gradients in the mixed dtype, no fp32 master copy

    @classmethod
    def from_preset(cls, preset, **changes) -> Setup:
        s = dict(preset.settings)
        fields = dict(
            arch=preset.architecture,
            resolution=s["resolution"],
            batch_size=s["batch_size"],
            mixed_precision=s["mixed_precision"],
            gradient_checkpointing=bool(s["gradient_checkpointing"]),
            optimizer=s["optimizer"],
            lora_rank=s.get("lora_rank", 0),
            lora_alpha=s.get("lora_alpha"),
            train_text_encoder=bool(s.get("train_text_encoder", False)),
            train_text_encoder_2=bool(s.get("train_text_encoder_2", s.get("train_text_encoder", False)))
            and len(ARCHS[preset.architecture].texts) > 1,
            cache_latents=bool(s.get("cache_latents", False)),
            cache_text_embeddings=bool(s.get("cache_text_embeddings", False)),
        )
        fields.update(changes)
        return cls(**fields)

    def describe(self) -> str:
        mode = f"LoRA r{self.lora_rank}" if self.lora_rank else "full"
        if self.half_weights:
            mode += f" ({self.mixed_precision} weights, no fp32 master)"
        ckpt = "ckpt" if self.gradient_checkpointing else "no ckpt"
        return f"{ARCH_LABEL[self.arch]} {mode} {self.resolution}px b{self.batch_size} {self.mixed_precision} {ckpt}"


@dataclass
class StepMemory:
    setup: Setup
    weights: dict = field(default_factory=dict)  # component -> bytes resident during steps
    trainable_params: int = 0
    grads: int = 0  # fp32 gradients of every trainable parameter (inside step_peak)
    optimizer: int = 0
    held_after_forward: int = 0  # tracked bytes alive when the forward ends (activations for backward)
    saved_for_backward: int | None = None  # saved-tensor hook sum (without checkpointing only)
    step_peak: int = 0  # tracked peak over one forward + backward, above the resident weights
    seconds: float = 0.0

    @property
    def resident(self) -> int:
        return sum(self.weights.values()) + self.optimizer

    @property
    def tensor_peak(self) -> int:
        return self.resident + self.step_peak

    @property
    def allowance(self) -> int:
        return budget_allowance(self.tensor_peak)

    @property
    def estimate(self) -> int:
        return self.tensor_peak + self.allowance


def _dtype(precision: str):
    import torch

    return {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]


def _autocast(precision: str):
    import torch

    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=_dtype(precision))


def _enable_text_checkpointing(text_encoder) -> None:
    if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
        text_encoder.activation_checkpointing_enable({"use_reentrant": False})
    else:
        text_encoder.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def simulate_step(setup: Setup, attention: str = "efficient") -> StepMemory:
    """Resident weights and optimizer state (exact), and one training step's tracked memory (fake tensors)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    arch = ARCHS[setup.arch]
    low = _dtype(setup.mixed_precision)
    result = StepMemory(setup)
    mode = FakeTensorMode()
    trainable = []

    unet = build_unet(setup.arch, setup.lora_rank, setup.lora_alpha)
    # full: fp32 master weights; LoRA: frozen base in the mixed dtype, adapters in fp32
    trained_dtype = low if setup.half_weights else torch.float32
    to_fake(unet, mode, lambda p: trained_dtype if p.requires_grad else low)
    if setup.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    unet.train()
    unet_params = list(unet.parameters())
    trainable += [p for p in unet_params if p.requires_grad]
    result.weights["unet"] = sum(p.numel() * p.element_size() for p in unet_params)

    encoders = []
    for name, config, projection in arch.texts:
        trained = setup.train_text_encoder if name == "text_encoder" else setup.train_text_encoder_2
        if not trained and setup.cache_text_embeddings:
            continue  # cached: the encoder leaves the GPU after the caching pass
        encoder = build_text(config, projection)
        encoder.requires_grad_(trained)
        to_fake(encoder, mode, lambda p, trained=trained: trained_dtype if trained else low)
        if trained:
            encoder.train()
            if setup.gradient_checkpointing:
                _enable_text_checkpointing(encoder)
            trainable += list(encoder.parameters())
        else:
            encoder.eval()
        encoders.append((name, encoder, trained))
        result.weights[name] = sum(p.numel() * p.element_size() for p in encoder.parameters())

    vae = None
    if not setup.cache_latents:
        vae = build_vae(setup.arch)
        vae.requires_grad_(False).eval()
        to_fake(vae, mode, lambda p: torch.float32 if arch.vae_fp32 else low)
        result.weights["vae"] = sum(p.numel() * p.element_size() for p in vae.parameters())

    result.trainable_params = sum(p.numel() for p in trainable)
    result.grads = sum(p.numel() * p.element_size() for p in trainable)
    result.optimizer = optimizer_state_bytes(setup.optimizer, trainable)

    b, side = setup.batch_size, setup.resolution // 8
    LiveBytes = live_tracker_class()
    with mode, cuda_autocast_rules(), gpu_attention(attention) as attention_calls:
        live = LiveBytes(tensors_of(unet, vae, *(e for _, e, _ in encoders)))
        with live:
            if vae is not None:  # a fresh encode each step; its transient is over before the forward starts
                with torch.no_grad():
                    pixels = torch.empty(b, 3, setup.resolution, setup.resolution, dtype=vae.dtype)
                    latents = vae.encode(pixels).latent_dist.sample().float()
                del pixels
            else:  # cached latents, moved to the GPU per batch
                latents = torch.empty(b, 4, side, side)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, 1000, (b,))
            noisy = latents + noise
            input_ids = torch.zeros(b, TEXT_TOKENS, dtype=torch.long)
            hook_params = unet_params + [p for _, e, _ in encoders for p in e.parameters()]
            hooks = (
                saved_tensor_bytes(hook_params)
                if not setup.gradient_checkpointing
                else contextlib.nullcontext([None])
            )
            with hooks as saved, _autocast(setup.mixed_precision):
                hidden_parts, pooled = [], None
                for name, config, projection in arch.texts:
                    found = [(e, t) for n, e, t in encoders if n == name]
                    if not found:  # cached embeddings
                        hidden_parts.append(torch.empty(b, TEXT_TOKENS, config["hidden_size"]))
                        if projection:
                            pooled = torch.empty(b, 1280)
                        continue
                    encoder, trained = found[0]
                    with torch.set_grad_enabled(trained):
                        out = encoder(input_ids, output_hidden_states=arch.penultimate_hidden)
                    hidden_parts.append(out.hidden_states[-2] if arch.penultimate_hidden else out[0])
                    if projection:
                        pooled = out.text_embeds
                hidden = torch.cat(hidden_parts, dim=-1) if len(hidden_parts) > 1 else hidden_parts[0]
                kwargs = {}
                if arch.added_conditioning:
                    kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": torch.empty(b, 6)}
                pred = unet(noisy, timesteps, hidden, **kwargs).sample
            result.held_after_forward = live.current
            result.saved_for_backward = saved[0]
            per_sample = ((pred.float() - noise) ** 2).mean(dim=(1, 2, 3))
            loss = per_sample.mean()
            loss.backward()
            del pred, per_sample, loss, hidden, hidden_parts, pooled, noisy, noise, latents
        result.step_peak = live.peak
    if attention_calls[0] == 0:
        raise RuntimeError("the attention patch was never called: the estimate would use another kernel")
    result.seconds = time.perf_counter() - start
    del unet, encoders, vae, trainable, unet_params, hook_params
    gc.collect()
    return result


@dataclass
class CachingPass:
    resident: dict  # component -> bytes on the GPU while caching
    vae_transient: int  # tracked peak of one VAE encode of a batch
    text_transient: int
    seconds: float = 0.0

    @property
    def tensor_peak(self) -> int:
        return sum(self.resident.values()) + max(self.vae_transient, self.text_transient)

    @property
    def estimate(self) -> int:
        return self.tensor_peak + budget_allowance(self.tensor_peak)


def simulate_caching(setup: Setup, step: StepMemory) -> CachingPass:
    """The caching pass, before training: the VAE (fp32 for SDXL: force_upcast; else the mixed dtype) encodes one
    image at a time at the training resolution (as edtools' LatentCache does), frozen text encoders (mixed dtype) encode one batch of captions, under
    no_grad. Assumed resident meanwhile: the UNet as it trains (no gradients or optimizer state yet) and every
    text encoder (trained ones in fp32)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    start = time.perf_counter()
    arch = ARCHS[setup.arch]
    low = _dtype(setup.mixed_precision)
    trained_dtype = low if setup.half_weights else torch.float32
    mode = FakeTensorMode()
    resident = {"unet": step.weights["unet"]}
    LiveBytes = live_tracker_class()
    b, res = setup.batch_size, setup.resolution
    vae_transient = text_transient = 0
    with mode, gpu_attention("efficient"), torch.no_grad():
        if setup.cache_latents:
            vae = build_vae(setup.arch)
            vae_dtype = torch.float32 if arch.vae_fp32 else low
            to_fake(vae, mode, lambda p: vae_dtype)
            resident["vae"] = sum(p.numel() * p.element_size() for p in vae.parameters())
            live = LiveBytes(tensors_of(vae))
            with live:
                pixels = torch.empty(1, 3, res, res, dtype=vae_dtype)
                vae.encode(pixels).latent_dist.mode()
                del pixels
            vae_transient = live.peak
            del vae
        for name, config, projection in arch.texts:
            trained = setup.train_text_encoder if name == "text_encoder" else setup.train_text_encoder_2
            encoder = build_text(config, projection)
            to_fake(encoder, mode, lambda p, trained=trained: trained_dtype if trained else low)
            resident[name] = sum(p.numel() * p.element_size() for p in encoder.parameters())
            if setup.cache_text_embeddings and not trained:
                live = LiveBytes(tensors_of(encoder))
                with live:
                    encoder(torch.zeros(b, TEXT_TOKENS, dtype=torch.long), output_hidden_states=True)
                text_transient = max(text_transient, live.peak)
            del encoder
    gc.collect()
    return CachingPass(resident, vae_transient, text_transient, time.perf_counter() - start)
