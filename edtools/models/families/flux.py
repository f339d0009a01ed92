"""Flux.1 (dev and schnell): an MM-DiT transformer on packed 2x2 latent patches, trained by flow matching,
conditioned on T5-XXL's hidden states and CLIP-L's pooled output; dev also on a distilled guidance value.

The "flux" family. The T5 encoder is always frozen (its embeddings are cached, then it is freed); LoRA files are
diffusers' (FluxPipeline.load_lora_weights, ComfyUI's "transformer." form); single files BFL's or ComfyUI's.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Iterable, Mapping, MutableMapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ...errors import require
from .base import (
    Parts,
    TextEmbeddings,
    TextEncoderSpec,
    TextLayout,
    TinyEncoder,
    TinySpec,
    has_prefix,
    unwrapped,
)
from .flow import FlowMatchingFamily
from .sd import device_of

if TYPE_CHECKING:
    import torch

__all__ = ["Flux", "pack_latents", "unpack_latents"]

_TRANSFORMER = "FluxTransformer2DModel"
# Single files: Black Forest Labs' flux1-dev.safetensors holds the transformer alone, its keys bare
# (double_blocks.N...); ComfyUI's checkpoints put it under model.diffusion_model., the VAE under
# first_stage_model. and the encoders under text_encoders.<name>.transformer.
_DIT = "model.diffusion_model."
_BARE = (
    "double_blocks.", "single_blocks.", "img_in.", "txt_in.", "time_in.", "vector_in.", "guidance_in.",
    "final_layer.",
)  # fmt: skip
_CLIP_L, _T5 = "text_encoders.clip_l.", "text_encoders.t5xxl."
# The guidance value Flux.1 dev's distilled guidance input is given while training. kohya's sd-scripts and
# ai-toolkit train dev LoRAs at 1.0 (diffusers' DreamBooth script defaults to 3.5); sampling uses the
# pipeline's own guidance_scale. schnell has no guidance input.
TRAINING_GUIDANCE = 1.0
# Every linear layer of the double-stream blocks (both streams' attention and feed-forward) and the single-stream
# blocks' attention and MLP: the set kohya's and ai-toolkit's Flux LoRAs train.
_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
    "proj_mlp", "proj_out",
)  # fmt: skip
_LORA_PATTERN = (
    r"transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)"
    r"|ff\.net\.(?:0\.proj|2)|ff_context\.net\.(?:0\.proj|2))"
    r"|single_transformer_blocks\.\d+\.(?:attn\.(?:to_q|to_k|to_v)|proj_mlp|proj_out)"
)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] latents as the transformer's tokens [B, (H/2)(W/2), 4C]: each 2x2 patch one token, its
    channels in (C, row, column) order, as FluxPipeline packs them."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """pack_latents undone: tokens [B, (H/2)(W/2), 4C] as latents [B, C, H, W]."""
    b, _, channels = tokens.shape
    patches = tokens.view(b, height // 2, width // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels // 4, height, width)


def _positions(rows: int, columns: int, *, device: Any, dtype: Any) -> torch.Tensor:
    """The image tokens' rotary position ids [rows * columns, 3]: (0, row, column), as FluxPipeline's."""
    torch = require("torch")
    ids = torch.zeros(rows, columns, 3)
    ids[..., 1] = torch.arange(rows)[:, None]
    ids[..., 2] = torch.arange(columns)[None, :]
    return ids.reshape(rows * columns, 3).to(device=device, dtype=dtype)


@functools.cache
def _batched_ids() -> bool:
    """Whether the installed FluxTransformer2DModel takes position ids with a batch dimension (diffusers 0.30;
    later versions take [tokens, 3] and warn about the batched form): FluxPipeline's own ids tell."""
    torch = require("torch")
    diffusers = require("diffusers")
    ids = diffusers.FluxPipeline._prepare_latent_image_ids(1, 2, 2, torch.device("cpu"), torch.float32)
    return ids.ndim == 3


class Flux(FlowMatchingFamily):
    name = "flux"
    label = "Flux.1"
    short_label = "Flux"
    variants = ("flux-dev", "flux-schnell")
    variant_labels = MappingProxyType({"flux-dev": "Flux.1 dev", "flux-schnell": "Flux.1 schnell"})
    variant_articles = MappingProxyType({"flux-dev": "a Flux.1 dev", "flux-schnell": "a Flux.1 schnell"})
    text_encoders = (
        TextEncoderSpec("text_encoder", "CLIPTextModel", "tokenizer"),
        TextEncoderSpec("text_encoder_2", "T5EncoderModel", "tokenizer_2", "T5TokenizerFast"),
    )
    name_hints = ("flux",)
    # Flux.1 dev: the transformer; CLIP-L and T5-XXL's encoder; the VAE; LoRA per unit of rank on the targets
    # above (418 layers) and on CLIP-L
    typical_parameters = MappingProxyType(
        {
            "unet": 11_901_408_320,
            "text": 123_060_480 + 4_762_310_656,
            "vae": 83_819_683,
            "lora_unet": 4_085_760,
            "lora_text": 165_888,
        }
    )
    gradient_checkpointing_always = True
    unet_lora_targets = _LORA_TARGETS
    unet_lora_pattern = _LORA_PATTERN
    trainable_text_encoders = ("text_encoder",)
    quantizable = True
    denoiser_part = "transformer"
    denoiser_class = _TRANSFORMER
    lora_file_format = "diffusers"
    denoiser_label = "transformer"
    single_file_partial = True
    config_repos = ("black-forest-labs/FLUX.1-dev", "black-forest-labs/FLUX.1-schnell")
    single_file_t5 = _T5

    # ---- loading

    def matches_index(self, index: Mapping[str, Any], model: str) -> bool:
        return (index.get("transformer") or [None, None])[1] == _TRANSFORMER

    def matches_parts(self, parts: Parts) -> bool:
        return type(unwrapped(parts.unet)).__name__ == _TRANSFORMER

    def guess_keys(self, keys: Collection[str]) -> bool:
        return has_prefix(keys, "double_blocks.", _DIT + "double_blocks.")

    def detect_keys(self, keys: Collection[str]) -> str | None:
        """dev or schnell from the transformer's blocks, bare (BFL's files) or under model.diffusion_model.
        (ComfyUI's): dev has the guidance embedder."""
        if not self.guess_keys(keys) or not has_prefix(keys, "single_blocks.", _DIT + "single_blocks."):
            return None
        return "flux-dev" if has_prefix(keys, "guidance_in.", _DIT + "guidance_in.") else "flux-schnell"

    def normalise_keys(self, state_dict: MutableMapping[str, Any], variant: str) -> None:
        """BFL's bare transformer keys under model.diffusion_model., as ComfyUI's files have them (diffusers'
        reader takes both; the loader finds the transformer by that prefix)."""
        for key in [k for k in state_dict if k.startswith(_BARE)]:
            state_dict[_DIT + key] = state_dict.pop(key)

    def variant_of(self, parts: Parts) -> str:
        return "flux-dev" if unwrapped(parts.unet).config.guidance_embeds else "flux-schnell"

    def variant_of_configs(self, unet_config: Mapping[str, Any], text_config: Any) -> str | None:
        if "num_single_layers" not in unet_config:
            return None
        return "flux-dev" if unet_config.get("guidance_embeds") else "flux-schnell"

    def single_file_text(self, variant: str) -> tuple[TextLayout, ...]:
        """CLIP-L, in transformers' names (diffusers' CLIP reader); T5 is read apart (single_file_t5)."""
        return (TextLayout(_CLIP_L + "transformer.", "text_encoder", "CLIP-L text encoder"),)

    def diffusers_model_type(self, variant: str) -> str:
        return variant

    def original_denoiser_entries(self, config: Mapping[str, Any], keys: Iterable[str]) -> list[Any]:
        from ..keymap_flux import flux_entries

        return flux_entries(config, keys)

    def modelspec_architecture(self, variant: str, v_prediction: bool) -> str:
        return {"flux-dev": "flux-1-dev", "flux-schnell": "flux-1-schnell"}[variant]

    # ---- conditioning

    def encode_text(self, parts: Parts, input_ids: Sequence[torch.Tensor]) -> TextEmbeddings:
        """As FluxPipeline.encode_prompt: T5's last hidden states, and CLIP-L's pooled output."""
        clip, t5 = parts.text_encoder, parts.text_encoder_2
        pooled = clip(input_ids[0].to(device_of(clip)), output_hidden_states=False).pooler_output
        hidden = t5(input_ids[1].to(device_of(t5)), output_hidden_states=False)[0]
        return TextEmbeddings(hidden, pooled.to(hidden.dtype))

    def unet_conditioning(
        self, parts: Parts, embeddings: TextEmbeddings, time_ids: torch.Tensor | None, *, device: Any
    ) -> dict[str, Any]:
        """encoder_hidden_states (T5), pooled_projections (CLIP), the text tokens' position ids (zeros) and, for
        dev, the guidance value (TRAINING_GUIDANCE). Sizes do not condition."""
        torch = require("torch")
        if embeddings.pooled is None:
            raise ValueError("a Flux transformer needs the pooled CLIP embedding")
        hidden = embeddings.hidden.to(device)
        batch, tokens = hidden.shape[:2]
        text_ids = torch.zeros(tokens, 3, device=device, dtype=hidden.dtype)
        conditioning = {
            "encoder_hidden_states": hidden,
            "pooled_projections": embeddings.pooled.to(device),
            "txt_ids": text_ids.expand(batch, -1, -1) if _batched_ids() else text_ids,
        }
        if unwrapped(parts.unet).config.guidance_embeds:
            conditioning["guidance"] = torch.full((batch,), TRAINING_GUIDANCE, device=device)
        return conditioning

    def denoise(self, model: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping) -> Any:
        """The velocity on [B, C, H, W] latents: packed into tokens with their position ids, timesteps as
        sigmas (the transformer scales them by 1000 itself, as FluxPipeline passes them), unpacked again."""
        batch, _, height, width = noisy.shape
        ids = _positions(height // 2, width // 2, device=noisy.device, dtype=noisy.dtype)
        out = model(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(noisy.dtype) / 1000,
            img_ids=ids.expand(batch, -1, -1) if _batched_ids() else ids,
            **conditioning,
        ).sample
        return unpack_latents(out, height, width)

    def native_resolution(self, parts: Parts) -> int:
        """1024: Flux.1's training side (its transformer's config has no sample size; it takes any)."""
        return 1024

    # ---- sampling

    def make_pipeline(self, parts: Parts, scheduler: Any) -> Any:
        diffusers = require("diffusers")
        return diffusers.FluxPipeline(
            transformer=parts.unet,
            scheduler=scheduler,
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=parts.tokenizer_2,
        )

    def pipeline_embeddings(
        self, parts: Parts, prompts: TextEmbeddings, negative: TextEmbeddings, *, device: Any
    ) -> dict[str, Any]:
        """prompt_embeds (T5) and pooled_prompt_embeds (CLIP): what FluxPipeline.encode_prompt gives (its guidance
        is distilled, so no negative prompt is encoded)."""
        if prompts.pooled is None:
            raise ValueError("a Flux transformer needs the pooled CLIP embedding")
        return {"prompt_embeds": prompts.hidden.to(device), "pooled_prompt_embeds": prompts.pooled.to(device)}

    # ---- LoRA

    def lora_metadata(self, parts: Parts) -> dict[str, str]:
        variant = self.variant_of(parts)
        return {
            "ss_base_model_version": "flux1",  # as kohya's Flux LoRAs say
            "ss_v2": "False",
            "modelspec.architecture": f"{self.modelspec_architecture(variant, False)}/lora",
            "modelspec.implementation": "diffusers",
        }

    # ---- tests

    def tiny(self, variant: str, *, real_blocks: bool) -> TinySpec:
        """A CLIP-L-like encoder (pooled width 32) and a tiny T5 (width 32, 32 tokens), a 16-channel VAE with
        Flux's shift and scale, a transformer of 1 double- and 1 single-stream block (real_blocks: 2 and 2), two
        heads of 8 with rotary axes (2, 2, 4); dev has the guidance input. Flux's schedule shifts by size."""
        encoders = (
            TinyEncoder(width=32, layers=2, act="quick_gelu"),
            TinyEncoder(width=32, layers=2, act="gated-gelu", kind="t5", tokens=32),
        )
        transformer: dict[str, Any] = dict(
            patch_size=1,
            in_channels=64,
            num_layers=2 if real_blocks else 1,
            num_single_layers=2 if real_blocks else 1,
            attention_head_dim=8,
            num_attention_heads=2,
            joint_attention_dim=encoders[1].width,
            pooled_projection_dim=encoders[0].width,
            guidance_embeds=variant == "flux-dev",
            axes_dims_rope=(2, 2, 4),
        )
        scheduler = {
            "num_train_timesteps": 1000,
            "shift": 3.0,
            "use_dynamic_shifting": True,
            "base_shift": 0.5,
            "max_shift": 1.15,
            "base_image_seq_len": 256,
            "max_image_seq_len": 4096,
        }
        return TinySpec(
            transformer,
            encoders,
            vae_scaling_factor=0.3611,
            vae_force_upcast=False,
            vae_latent_channels=16,
            vae_shift_factor=0.1159,
            vae_quant_conv=False,
            scheduler=scheduler,
        )
