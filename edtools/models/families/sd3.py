"""Stable Diffusion 3 / 3.5: an MM-DiT transformer trained by flow matching, CLIP-L and CLIP-G (pooled and joint).

The "sd3" family. T5-XXL is dropped (text_encoder_3 None), as diffusers' StableDiffusion3Pipeline allows: its
tokens are zeros, exactly as the pipeline conditions without it; LoRA files are diffusers' (load_lora_weights).
"""

from __future__ import annotations

import functools
import math
import types
from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ...errors import ModelError, require
from .base import (
    Family,
    FlowSettings,
    Parts,
    TextEmbeddings,
    TextEncoderSpec,
    TextLayout,
    TinyEncoder,
    TinySpec,
    unwrapped,
)
from .sd import device_of

if TYPE_CHECKING:
    import torch

__all__ = ["StableDiffusion3", "flow_sigmas"]

# StableDiffusion3Pipeline's max_sequence_length (its default), for the T5 tokens
_T5_TOKENS = 256
_TRANSFORMER = "SD3Transformer2DModel"
_DEFAULT_FLOW = FlowSettings()
_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0",
)  # fmt: skip
# diffusers' SD3 LoRA scripts' targets: every joint attention's projections, image and text side (attn2: SD3.5's
# second, image-only attention in its first blocks)
_LORA_PATTERN = (
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|attn2\.(?:to_q|to_k|to_v|to_out\.0))"
)


def flow_sigmas(config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of a FlowMatchEulerDiscreteScheduler config at its num_train_timesteps positions,
    computed from the config alone as the scheduler's own __init__ does: position i has t = (N - i) / N,
    sigma = shift * t / (1 + (shift - 1) * t), timestep = sigma * N (position 0 is pure noise)."""
    torch = require("torch")
    if config.get("use_dynamic_shifting", False):
        raise ModelError(
            "this flow-matching scheduler shifts by resolution (use_dynamic_shifting); edtools does not"
        )
    steps = int(config["num_train_timesteps"])
    shift = float(config.get("shift", 1.0))
    t = torch.linspace(1, steps, steps, dtype=torch.float32).flip(0) / steps
    sigmas = shift * t / (1 + (shift - 1) * t)
    return sigmas, sigmas * steps


@functools.cache
def _zero_t5_tokens() -> int:
    """How many zero T5 tokens the installed StableDiffusion3Pipeline conditions on without T5: its own
    _get_t5_prompt_embeds, asked on a stand-in (diffusers 0.30 uses the CLIP length 77, 0.42 its
    max_sequence_length 256). Training then sees what this diffusers' sampling sees."""
    torch = require("torch")
    diffusers = require("diffusers")
    stand_in = types.SimpleNamespace(
        text_encoder_3=None,
        tokenizer_max_length=77,
        transformer=types.SimpleNamespace(config=types.SimpleNamespace(joint_attention_dim=1)),
    )
    zeros = diffusers.StableDiffusion3Pipeline._get_t5_prompt_embeds(
        stand_in, prompt=[""], max_sequence_length=_T5_TOKENS, device=torch.device("cpu"), dtype=torch.float32
    )
    return int(zeros.shape[1])


def _density(flow: FlowSettings, count: int, generator: torch.Generator) -> torch.Tensor:
    """diffusers' compute_density_for_timestep_sampling drawing from `generator`; older diffusers (0.30) take
    no generator, and then its formulas are used here as they are there."""
    import inspect

    torch = require("torch")
    training_utils = require("diffusers.training_utils")
    density = training_utils.compute_density_for_timestep_sampling
    kwargs = dict(
        weighting_scheme=flow.timestep_sampling,
        batch_size=count,
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        mode_scale=flow.mode_scale,
    )
    if "generator" in inspect.signature(density).parameters:
        return density(**kwargs, generator=generator)
    if flow.timestep_sampling == "logit_normal":
        normal = torch.normal(flow.logit_mean, flow.logit_std, size=(count,), generator=generator)
        return torch.sigmoid(normal)
    u = torch.rand(size=(count,), generator=generator)
    if flow.timestep_sampling == "mode":
        u = 1 - u - flow.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


class StableDiffusion3(Family):
    name = "sd3"
    label = "Stable Diffusion 3"
    short_label = "SD3"
    variants = ("sd3",)
    variant_labels = MappingProxyType({"sd3": "Stable Diffusion 3"})
    variant_articles = MappingProxyType({"sd3": "a Stable Diffusion 3"})
    text_encoders = (
        TextEncoderSpec("text_encoder", "CLIPTextModelWithProjection", "tokenizer"),
        TextEncoderSpec("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2"),
    )
    name_hints = ("stable-diffusion-3", "sd3")
    # SD3 medium (diffusers), without T5; LoRA per unit of rank on the attention projections above
    typical_parameters = MappingProxyType(
        {
            "unet": 2_028_328_000,
            "text": 817_720_320,
            "vae": 83_819_683,
            "lora_unet": 586_752,
            "lora_text": 903_168,
        }
    )
    gradient_checkpointing_always = True
    unet_lora_targets = _LORA_TARGETS
    unet_lora_pattern = _LORA_PATTERN
    denoiser_part = "transformer"
    denoiser_class = _TRANSFORMER
    noise_scheduler_class = "FlowMatchEulerDiscreteScheduler"
    lora_file_format = "diffusers"
    single_files = False
    quantizable = True

    # ---- loading

    def matches_index(self, index: Mapping[str, Any], model: str) -> bool:
        return (index.get("transformer") or [None, None])[1] == _TRANSFORMER

    def matches_parts(self, parts: Parts) -> bool:
        return type(unwrapped(parts.unet)).__name__ == _TRANSFORMER

    def guess_keys(self, keys: Collection[str]) -> bool:
        return False  # single files of SD3 are not read yet

    def detect_keys(self, keys: Collection[str]) -> str | None:
        return None

    def variant_of(self, parts: Parts) -> str:
        return "sd3"

    def variant_of_configs(self, unet_config: Mapping[str, Any], text_config: Any) -> str | None:
        return None

    def single_file_text(self, variant: str) -> tuple[TextLayout, ...]:
        raise ModelError(
            "edtools reads Stable Diffusion 3 as diffusers folders and hub ids, not single files"
        )

    def diffusers_model_type(self, variant: str) -> str:
        return "sd3"

    def modelspec_architecture(self, variant: str, v_prediction: bool) -> str:
        return "stable-diffusion-v3-medium"

    # ---- conditioning

    def encode_text(self, parts: Parts, input_ids: Sequence[torch.Tensor]) -> TextEmbeddings:
        """As StableDiffusion3Pipeline.encode_prompt's CLIP half: both encoders' penultimate hidden states
        concatenated, and their pooled (projected) outputs concatenated."""
        torch = require("torch")
        first, second = parts.text_encoder, parts.text_encoder_2
        out_1 = first(input_ids[0].to(device_of(first)), output_hidden_states=True)
        out_2 = second(input_ids[1].to(device_of(second)), output_hidden_states=True)
        hidden_2 = out_2.hidden_states[-2]
        hidden = torch.cat([out_1.hidden_states[-2].to(hidden_2.dtype), hidden_2], dim=-1)
        pooled = torch.cat([out_1.text_embeds.to(hidden_2.dtype), out_2.text_embeds], dim=-1)
        return TextEmbeddings(hidden, pooled)

    def unet_conditioning(
        self, parts: Parts, embeddings: TextEmbeddings, time_ids: torch.Tensor | None, *, device: Any
    ) -> dict[str, Any]:
        """encoder_hidden_states: the CLIP states padded to the joint width, then the T5 tokens, zeros
        without T5 (as the pipeline); pooled_projections: the pooled CLIP outputs. Sizes do not condition."""
        torch = require("torch")
        if embeddings.pooled is None:
            raise ValueError("a Stable Diffusion 3 transformer needs the pooled text embedding")
        clip = embeddings.hidden.to(device)
        joint = int(unwrapped(parts.unet).config.joint_attention_dim)
        clip = torch.nn.functional.pad(clip, (0, joint - clip.shape[-1]))
        t5 = torch.zeros(clip.shape[0], _zero_t5_tokens(), joint, device=device, dtype=clip.dtype)
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": embeddings.pooled.to(device),
        }

    # ---- the flow-matching objective

    def training_positions(
        self, noise_scheduler: Any, count: int, generator: torch.Generator, flow: FlowSettings = _DEFAULT_FLOW
    ) -> torch.Tensor:
        """Positions from diffusers' compute_density_for_timestep_sampling (flow's density; the SD3 paper's
        logit-normal(0, 1) by default), as its SD3 training scripts turn them into indices of the shifted
        schedule."""
        torch = require("torch")
        u = _density(flow, count, generator)
        steps = noise_scheduler.config.num_train_timesteps
        return (u * steps).long().clamp(0, steps - 1).to(torch.int64)

    def _sigmas(self, noise_scheduler: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas, timesteps = flow_sigmas(noise_scheduler.config)
        index = positions.cpu().long()
        return sigmas[index].to(positions.device), timesteps[index].to(positions.device)

    def noisy_input(
        self, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - sigma) * latents + sigma * noise, and the timesteps sigma * N."""
        sigmas, timesteps = self._sigmas(noise_scheduler, positions)
        sigma = sigmas.to(latents.dtype).reshape(-1, *([1] * (latents.ndim - 1)))
        return (1 - sigma) * latents + sigma * noise, timesteps

    def prediction_target(
        self, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The velocity noise - latents."""
        return noise - latents

    def loss_weights(
        self, noise_scheduler: Any, positions: torch.Tensor, flow: FlowSettings = _DEFAULT_FLOW
    ) -> torch.Tensor | None:
        """compute_loss_weighting_for_sd3 at the positions' sigmas (None for "none": all ones; the density
        already weights the noise levels)."""
        if flow.loss_weighting == "none":
            return None
        training_utils = require("diffusers.training_utils")
        sigmas, _ = self._sigmas(noise_scheduler, positions)
        return training_utils.compute_loss_weighting_for_sd3(flow.loss_weighting, sigmas).float()

    def denoise(self, model: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping) -> Any:
        return model(hidden_states=noisy, timestep=timesteps, **conditioning).sample

    def shift_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """(latents - shift_factor) * scaling_factor, as the pipeline and the training scripts."""
        shift = vae.config.get("shift_factor") or 0.0
        return latents - shift * vae.config.scaling_factor if shift else latents

    # ---- sampling

    def sampling_scheduler(self, noise_scheduler: Any) -> Any:
        diffusers = require("diffusers")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)

    def make_pipeline(self, parts: Parts, scheduler: Any) -> Any:
        diffusers = require("diffusers")
        return diffusers.StableDiffusion3Pipeline(
            transformer=parts.unet,
            scheduler=scheduler,
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=parts.tokenizer_2,
            text_encoder_3=None,
            tokenizer_3=None,
        )

    # ---- LoRA

    def lora_metadata(self, parts: Parts) -> dict[str, str]:
        return {
            "ss_base_model_version": "sd3",
            "ss_v2": "False",
            "modelspec.architecture": f"{self.modelspec_architecture('sd3', False)}/lora",
            "modelspec.implementation": "diffusers",
        }

    # ---- tests

    def tiny(self, variant: str, *, real_blocks: bool) -> TinySpec:
        """CLIP-L- and CLIP-G-like encoders with projections (pooled width 64), a 16-channel VAE with SD3's
        shift and scale, a transformer of 2 joint blocks (patch 2; real_blocks: 3, the first with SD3.5's
        second attention, and its RMS q/k norm), joint width 128 (the CLIP states are padded to it)."""
        encoders = (
            TinyEncoder(width=32, layers=2, act="quick_gelu", projection=32),
            TinyEncoder(width=64, layers=2, act="gelu", projection=32, pad_token="!"),
        )
        heads, head_dim = 2, 8
        transformer: dict[str, Any] = dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=3 if real_blocks else 2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=128,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=sum(e.projection or 0 for e in encoders),
            pos_embed_max_size=32,
        )
        if real_blocks:
            transformer.update(dual_attention_layers=(0,), qk_norm="rms_norm")
        return TinySpec(
            transformer,
            encoders,
            vae_scaling_factor=1.5305,
            vae_force_upcast=False,
            vae_latent_channels=16,
            vae_shift_factor=0.0609,
            vae_quant_conv=False,
            scheduler={"num_train_timesteps": 1000, "shift": 3.0},
        )
