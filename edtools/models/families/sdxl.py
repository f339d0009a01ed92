"""SDXL base: two text encoders (CLIP ViT-L and OpenCLIP ViT-bigG with projection), size/crop conditioning.

The "sdxl" family, variant "sdxl". Its single files and LoRA files name the UNet in the original SGM layout.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ...errors import ModelError, require
from ..keymap import original_unet_module
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
from .sd import device_of

if TYPE_CHECKING:
    import torch

__all__ = ["StableDiffusionXL"]

_TE2_PROJECTION = 32  # the tiny second encoder's projection width


class StableDiffusionXL(Family):
    name = "sdxl"
    label = "SDXL"
    short_label = "SDXL"
    variants = ("sdxl",)
    variant_labels = MappingProxyType({"sdxl": "SDXL"})
    variant_articles = MappingProxyType({"sdxl": "an SDXL"})
    text_encoders = (
        TextEncoderSpec("text_encoder", "CLIPTextModel", "tokenizer"),
        TextEncoderSpec("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2"),
    )
    name_hints = ("xl",)
    # diffusers' SDXL base 1.0
    typical_parameters = MappingProxyType(
        {
            "unet": 2_567_463_684,
            "text": 817_720_320,
            "vae": 83_653_863,
            "lora_unet": 2_659_840,
            "lora_text": 903_168,
        }
    )
    gradient_checkpointing_always = True

    def matches_index(self, index: Mapping[str, Any], model: str) -> bool:
        if not is_unet_index(index) or "text_encoder_2" not in index:
            return False
        if (index.get("text_encoder") or [None, None])[0] is None:
            kind = index.get("_class_name", "this pipeline")
            raise ModelError(
                f"'{model}' is an SDXL refiner ({kind}: no first text encoder); edtools trains SDXL base models"
            )
        return True

    def matches_parts(self, parts: Parts) -> bool:
        unet_config = unwrapped(parts.unet).config
        return parts.text_encoder_2 is not None and hasattr(unet_config, "cross_attention_dim")

    def guess_keys(self, keys: Collection[str]) -> bool:
        return has_prefix(keys, "conditioner.embedders.1.")

    def detect_keys(self, keys: Collection[str]) -> str | None:
        both = has_prefix(keys, "conditioner.embedders.1.") and has_prefix(keys, "conditioner.embedders.0.")
        return "sdxl" if both else None

    def variant_of(self, parts: Parts) -> str:
        return "sdxl"

    def variant_of_configs(self, unet_config: Mapping[str, Any], text_config: Any) -> str | None:
        return "sdxl" if unet_config.get("addition_embed_type") == "text_time" else None

    def single_file_text(self, variant: str) -> tuple[TextLayout, ...]:
        return (
            TextLayout("conditioner.embedders.0.transformer.", "text_encoder", "text encoder 1"),
            TextLayout("conditioner.embedders.1.model.", "text_encoder_2", "text encoder 2"),
        )

    def diffusers_model_type(self, variant: str) -> str:
        return "xl_base"

    def modelspec_architecture(self, variant: str, v_prediction: bool) -> str:
        return "stable-diffusion-xl-v1-base"

    def encode_text(self, parts: Parts, input_ids: Sequence[torch.Tensor]) -> TextEmbeddings:
        """As StableDiffusionXLPipeline.encode_prompt: both encoders' penultimate hidden states concatenated,
        and the second's pooled (projected) output."""
        torch = require("torch")
        first, second = parts.text_encoder, parts.text_encoder_2
        out_1 = first(input_ids[0].to(device_of(first)), output_hidden_states=True)
        out_2 = second(input_ids[1].to(device_of(second)), output_hidden_states=True)
        hidden_2 = out_2.hidden_states[-2]
        hidden = torch.cat([out_1.hidden_states[-2].to(hidden_2.dtype), hidden_2], dim=-1)
        return TextEmbeddings(hidden, out_2.text_embeds)

    def unet_conditioning(
        self, parts: Parts, embeddings: TextEmbeddings, time_ids: torch.Tensor | None, *, device: Any
    ) -> dict[str, Any]:
        """The text, the pooled text and the time ids (original size, crop top-left, target size of each
        image, as data.Crop.time_ids)."""
        kwargs = super().unet_conditioning(parts, embeddings, time_ids, device=device)
        if time_ids is None or embeddings.pooled is None:
            raise ValueError("an SDXL UNet needs the pooled text embedding and each image's time ids")
        pooled = embeddings.pooled.to(device)
        kwargs["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": time_ids.to(device, pooled.dtype)}
        return kwargs

    def make_pipeline(self, parts: Parts, scheduler: Any) -> Any:
        diffusers = require("diffusers")
        return diffusers.StableDiffusionXLPipeline(
            vae=parts.vae,
            text_encoder=parts.text_encoder,
            tokenizer=parts.tokenizer,
            text_encoder_2=parts.text_encoder_2,
            tokenizer_2=parts.tokenizer_2,
            unet=parts.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )

    def kohya_unet_module(self, unet_config: Mapping[str, Any], path: str) -> str:
        """The original SGM path ("input_blocks_4_1_..."): kohya's SDXL scripts resume and merge only that
        spelling."""
        return original_unet_module(unet_config, path)

    def lora_metadata(self, parts: Parts) -> dict[str, str]:
        return {
            "ss_base_model_version": "sdxl_base_v1-0",
            "ss_v2": "False",
            "modelspec.architecture": f"{self.modelspec_architecture('sdxl', False)}/lora",
            "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        }

    def tiny(self, variant: str, *, real_blocks: bool) -> TinySpec:
        """A second text encoder with projection (width 64; 10 layers when real: diffusers recognises SDXL
        files by its 10th block) and size/crop conditioning; real_blocks: 3 levels with transformer depths
        1, 2, 3 and 2 layers per block."""
        encoders = (
            TinyEncoder(width=32, layers=2, act="quick_gelu"),
            TinyEncoder(
                width=64,
                layers=10 if real_blocks else 2,
                act="gelu",
                projection=_TE2_PROJECTION,
                pad_token="!",
            ),
        )
        levels = 3 if real_blocks else 2
        down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (levels - 1)
        unet = dict(
            in_channels=4,
            out_channels=4,
            norm_num_groups=8,
            cross_attention_dim=sum(e.width for e in encoders),
            block_out_channels=(8, 16, 32)[-levels:] if real_blocks else (16, 32),
            layers_per_block=2 if real_blocks else 1,
            down_block_types=down,
            up_block_types=tuple(d.replace("Down", "Up") for d in reversed(down)),
            transformer_layers_per_block=(1, 2, 3)[:levels] if real_blocks else (1, 2),
            attention_head_dim=(2, 4, 8)[:levels],
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=_TE2_PROJECTION + 6 * 8,
        )
        return TinySpec(unet, encoders, vae_scaling_factor=0.13025, vae_force_upcast=True)
