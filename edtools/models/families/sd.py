"""Stable Diffusion 1.x and 2.x: one CLIP text encoder (OpenAI CLIP ViT-L for 1.x, OpenCLIP ViT-H for 2.x).

The "sd" family, variants "sd1" and "sd2"; told apart by the text encoder's activation (2.x: gelu).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, MutableMapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ...errors import require
from .base import (
    Family,
    Parts,
    TextEmbeddings,
    TextEncoderSpec,
    TextLayout,
    TinyEncoder,
    TinySpec,
    has_prefix,
    is_unet_index,
    unwrapped,
)

if TYPE_CHECKING:
    import torch

__all__ = ["StableDiffusion"]

_UNET = "model.diffusion_model."
_SD1_TEXT, _SD2_TEXT = "cond_stage_model.transformer.", "cond_stage_model.model."


def device_of(module: Any) -> Any:
    return next(module.parameters()).device


class StableDiffusion(Family):
    name = "sd"
    label = "Stable Diffusion"
    short_label = "SD"
    variants = ("sd1", "sd2")
    variant_labels = MappingProxyType({"sd1": "Stable Diffusion 1.x", "sd2": "Stable Diffusion 2.x"})
    variant_articles = MappingProxyType({"sd1": "a Stable Diffusion 1.x", "sd2": "a Stable Diffusion 2.x"})
    text_encoders = (TextEncoderSpec("text_encoder", "CLIPTextModel", "tokenizer"),)
    # diffusers' SD 1.5
    typical_parameters = MappingProxyType(
        {
            "unet": 859_520_964,
            "text": 123_060_480,
            "vae": 83_653_863,
            "lora_unet": 423_936,
            "lora_text": 165_888,
        }
    )
    kohya_renames = MappingProxyType({"lora_te1_": "lora_te_"})  # SD 1.x/2.x files have one "lora_te"

    def matches_index(self, index: Mapping[str, Any], model: str) -> bool:
        return is_unet_index(index) and "text_encoder_2" not in index

    def matches_parts(self, parts: Parts) -> bool:
        return parts.text_encoder_2 is None and hasattr(unwrapped(parts.unet).config, "cross_attention_dim")

    def guess_keys(self, keys: Collection[str]) -> bool:
        return has_prefix(keys, "cond_stage_model.") and not has_prefix(keys, "conditioner.embedders.1.")

    def detect_keys(self, keys: Collection[str]) -> str | None:
        # a class- or image-conditioned UNet (label_emb: unCLIP, upscalers) is not a text-to-image SD model
        if has_prefix(keys, _UNET + "label_emb.", "embedder.", "noise_augmentor."):
            return None
        if has_prefix(keys, _SD1_TEXT):
            return "sd1"
        if has_prefix(keys, _SD2_TEXT):
            return "sd2"
        return None

    def variant_of(self, parts: Parts) -> str:
        # SD 2.x's OpenCLIP ViT-H uses gelu; OpenAI CLIP ViT-L (SD 1.x) quick_gelu
        return "sd2" if getattr(parts.text_encoder.config, "hidden_act", "quick_gelu") == "gelu" else "sd1"

    def variant_of_configs(self, unet_config: Mapping[str, Any], text_config: Any) -> str | None:
        if unet_config.get("addition_embed_type") == "text_time":
            return None
        return "sd2" if text_config.hidden_act == "gelu" else "sd1"

    def single_file_text(self, variant: str) -> tuple[TextLayout, ...]:
        if variant == "sd1":
            return (TextLayout(_SD1_TEXT, "text_encoder", "text encoder"),)
        return (TextLayout(_SD2_TEXT, "text_encoder", "text encoder", pad_last_layer=True),)

    def diffusers_model_type(self, variant: str) -> str:
        return {"sd1": "v1", "sd2": "v2"}[variant]

    def normalise_keys(self, state_dict: MutableMapping[str, Any], variant: str) -> None:
        """Very old SD 1.x files lack transformers' text_model. level (ComfyUI adds it too)."""
        if variant == "sd1":
            old = _SD1_TEXT
            for key in [k for k in state_dict if k.startswith(old) and not k.startswith(old + "text_model.")]:
                state_dict[old + "text_model." + key[len(old) :]] = state_dict.pop(key)

    def modelspec_architecture(self, variant: str, v_prediction: bool) -> str:
        if variant == "sd2":
            return "stable-diffusion-v2-768-v" if v_prediction else "stable-diffusion-v2-512"
        return "stable-diffusion-v1"

    def encode_text(self, parts: Parts, input_ids: Sequence[torch.Tensor]) -> TextEmbeddings:
        """The text encoder's last hidden states."""
        encoder = parts.text_encoder
        return TextEmbeddings(encoder(input_ids[0].to(device_of(encoder)))[0])

    def make_pipeline(self, parts: Parts, scheduler: Any) -> Any:
        diffusers = require("diffusers")
        return diffusers.StableDiffusionPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            unet=parts.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    def lora_metadata(self, parts: Parts) -> dict[str, str]:
        """kohya's "sd_v1" / "sd_v2" (+ "_v" for v-prediction); modelspec as diffusers' LoRA files."""
        variant = self.variant_of(parts)
        v = parts.prediction_type == "v_prediction"
        return {
            "ss_base_model_version": ("sd_v2" if variant == "sd2" else "sd_v1") + ("_v" if v else ""),
            "ss_v2": str(variant == "sd2"),
            "modelspec.architecture": f"{self.modelspec_architecture(variant, v)}/lora",
            "modelspec.implementation": "diffusers",
        }

    def tiny(self, variant: str, *, real_blocks: bool) -> TinySpec:
        """sd1: CLIP text encoder (quick_gelu, width 32); sd2: OpenCLIP-style (gelu) and linear attention
        projections. real_blocks: 4 levels, 3 with cross-attention, 2 layers per block."""
        down = (
            ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
            if real_blocks
            else ("DownBlock2D", "CrossAttnDownBlock2D")
        )
        sd2 = variant == "sd2"
        encoder = TinyEncoder(width=32, layers=2, act="gelu" if sd2 else "quick_gelu")
        unet = dict(
            in_channels=4,
            out_channels=4,
            norm_num_groups=8,
            cross_attention_dim=encoder.width,
            block_out_channels=(8, 16, 16, 32) if real_blocks else (16, 32),
            layers_per_block=2 if real_blocks else 1,
            down_block_types=down,
            up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
            attention_head_dim=(2, 4, 4, 8) if sd2 and real_blocks else 4,
            use_linear_projection=sd2,
        )
        return TinySpec(unet, (encoder,), vae_scaling_factor=0.18215, vae_force_upcast=False)
