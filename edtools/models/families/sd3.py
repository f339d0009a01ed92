"""Stable Diffusion 3 / 3.5: an MM-DiT transformer trained by flow matching on CLIP-L, CLIP-G and T5-XXL.

The "sd3" family. T5-XXL (text_encoder_3) loads when the model has it and TrainConfig.t5 does not drop it; without
it its tokens are zeros, exactly as StableDiffusion3Pipeline conditions then. LoRA files are diffusers'.
Single files are Stability's layout (keymap_sd3), whole or the transformer alone (the rest from model_config).
"""

from __future__ import annotations

import functools
import types
from collections.abc import Collection, Iterable, Mapping, Sequence
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
from .flow import FlowMatchingFamily, flow_sigmas
from .sd import device_of

if TYPE_CHECKING:
    import torch

__all__ = ["T5_TOKENS", "StableDiffusion3", "flow_sigmas", "t5_tokens"]

# Single files (sd3.5_medium.safetensors, ComfyUI's checkpoints): the MMDiT under model.diffusion_model.,
# the VAE under first_stage_model., the encoders under text_encoders.<name>.transformer.
_MMDIT = "model.diffusion_model."
_CLIP_L, _CLIP_G, _T5 = (f"text_encoders.{name}." for name in ("clip_l", "clip_g", "t5xxl"))
# StableDiffusion3Pipeline's max_sequence_length (its default), for the T5 tokens: training encodes at most this
# many (fewer when the tokenizer's model_max_length is smaller), so that the pipeline's defaults sample as trained
T5_TOKENS = 256
_TRANSFORMER = "SD3Transformer2DModel"
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
        stand_in, prompt=[""], max_sequence_length=T5_TOKENS, device=torch.device("cpu"), dtype=torch.float32
    )
    return int(zeros.shape[1])


def t5_tokens(tokenizer: Any) -> int:
    """How many T5 tokens training encodes: StableDiffusion3Pipeline's default max_sequence_length (T5_TOKENS),
    or the tokenizer's model_max_length where that is smaller (a pipeline call then passes that number)."""
    return min(int(tokenizer.model_max_length), T5_TOKENS)


def _t5_ids(ids: torch.Tensor, tokenizer: Any) -> torch.Tensor:
    """Token ids of the tokenizer's full length cut to t5_tokens, exactly as the tokenizer gives them at that
    max_length: a caption that runs past the cut ends in </s> there, as truncation ends it."""
    length = t5_tokens(tokenizer)
    if ids.shape[1] <= length:
        return ids
    cut = ids[:, :length].clone()
    ran_on = cut[:, -1] != tokenizer.pad_token_id
    cut[ran_on, -1] = tokenizer.eos_token_id
    return cut


class StableDiffusion3(FlowMatchingFamily):
    name = "sd3"
    label = "Stable Diffusion 3"
    short_label = "SD3"
    variants = ("sd3",)
    variant_labels = MappingProxyType({"sd3": "Stable Diffusion 3"})
    variant_articles = MappingProxyType({"sd3": "a Stable Diffusion 3"})
    text_encoders = (
        TextEncoderSpec("text_encoder", "CLIPTextModelWithProjection", "tokenizer"),
        TextEncoderSpec("text_encoder_2", "CLIPTextModelWithProjection", "tokenizer_2"),
        TextEncoderSpec("text_encoder_3", "T5EncoderModel", "tokenizer_3", "T5TokenizerFast", optional=True),
    )
    name_hints = ("stable-diffusion-3", "sd3")
    # T5 is frozen (never LoRA): its embeddings are cached and it is freed
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    # SD3 medium (diffusers): CLIP-L and -G, and T5-XXL's encoder (loaded by default, saved with full fine-tunes);
    # LoRA per unit of rank on the attention projections above
    typical_parameters = MappingProxyType(
        {
            "unet": 2_028_328_000,
            "text": 817_720_320 + 4_762_310_656,
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
    lora_file_format = "diffusers"
    denoiser_label = "transformer"
    single_file_partial = True
    config_repos = ("stabilityai/stable-diffusion-3.5-medium", "stabilityai/stable-diffusion-3.5-large")
    # a file's T5-XXL is read (config and tokenizer from model_config); without one, T5 loads from
    # model_config when that has it, else SD3 is conditioned on zero T5 tokens
    single_file_t5 = _T5
    quantizable = True

    # ---- loading

    def matches_index(self, index: Mapping[str, Any], model: str) -> bool:
        return (index.get("transformer") or [None, None])[1] == _TRANSFORMER

    def matches_parts(self, parts: Parts) -> bool:
        return type(unwrapped(parts.unet)).__name__ == _TRANSFORMER

    def guess_keys(self, keys: Collection[str]) -> bool:
        return has_prefix(keys, _MMDIT + "joint_blocks.")

    def detect_keys(self, keys: Collection[str]) -> str | None:
        """SD3 and SD3.5 (Medium: MMDiT-X, whose first blocks have a second attention; Large) alike: their
        joint blocks; a file may lack the VAE and text encoders (single_file_partial)."""
        return "sd3" if has_prefix(keys, _MMDIT + "joint_blocks.") else None

    def variant_of(self, parts: Parts) -> str:
        return "sd3"

    def variant_of_configs(self, unet_config: Mapping[str, Any], text_config: Any) -> str | None:
        return "sd3" if "joint_attention_dim" in unet_config else None

    def single_file_text(self, variant: str) -> tuple[TextLayout, ...]:
        """CLIP-L and CLIP-G, both in transformers' names (CLIP-L's pooled output is not projected: diffusers'
        reader sets its text_projection to the identity, as the SD3 folders on the hub have it)."""
        return (
            TextLayout(
                _CLIP_L + "transformer.", "text_encoder", "CLIP-L text encoder", identity_projection=True
            ),
            TextLayout(_CLIP_G + "transformer.", "text_encoder_2", "CLIP-G text encoder"),
        )

    def diffusers_model_type(self, variant: str) -> str:
        return "sd3"

    def diffusers_model_types(self, variant: str) -> tuple[str, ...]:
        return ("sd3", "sd35_medium", "sd35_large")

    def original_denoiser_entries(self, config: Mapping[str, Any], keys: Iterable[str]) -> list[Any]:
        from ..keymap_sd3 import mmdit_entries

        return mmdit_entries(config, keys)

    def modelspec_architecture(self, variant: str, v_prediction: bool) -> str:
        return "stable-diffusion-v3-medium"

    # ---- conditioning

    def encode_text(self, parts: Parts, input_ids: Sequence[torch.Tensor]) -> TextEmbeddings:
        """As StableDiffusion3Pipeline.encode_prompt: both CLIP encoders' penultimate hidden states
        concatenated, and their pooled (projected) outputs concatenated. With T5 (a third tensor of ids): the CLIP
        states padded to T5's width, then T5's last hidden states at t5_tokens tokens (no attention mask, as the
        pipeline), so `hidden` is the pipeline's prompt_embeds; without it the CLIP states alone (the zero T5
        tokens are added by unet_conditioning, so caches stay small)."""
        torch = require("torch")
        first, second = parts.text_encoder, parts.text_encoder_2
        out_1 = first(input_ids[0].to(device_of(first)), output_hidden_states=True)
        out_2 = second(input_ids[1].to(device_of(second)), output_hidden_states=True)
        hidden_2 = out_2.hidden_states[-2]
        hidden = torch.cat([out_1.hidden_states[-2].to(hidden_2.dtype), hidden_2], dim=-1)
        pooled = torch.cat([out_1.text_embeds.to(hidden_2.dtype), out_2.text_embeds], dim=-1)
        t5 = getattr(parts, "text_encoder_3", None)
        if t5 is not None and len(input_ids) > 2:
            ids = _t5_ids(input_ids[2], parts.tokenizer_3)
            states = t5(ids.to(device_of(t5)))[0]
            hidden = torch.nn.functional.pad(hidden, (0, states.shape[-1] - hidden.shape[-1]))
            hidden = torch.cat([hidden, states.to(hidden.dtype)], dim=-2)
        return TextEmbeddings(hidden, pooled)

    def unet_conditioning(
        self, parts: Parts, embeddings: TextEmbeddings, time_ids: torch.Tensor | None, *, device: Any
    ) -> dict[str, Any]:
        """encoder_hidden_states: embeddings with T5 as they are (already joint wide); CLIP states alone (narrower
        than the joint width) padded to it, then zero T5 tokens (as the pipeline without T5);
        pooled_projections: the pooled CLIP outputs. Sizes do not condition."""
        torch = require("torch")
        if embeddings.pooled is None:
            raise ValueError("a Stable Diffusion 3 transformer needs the pooled text embedding")
        hidden = embeddings.hidden.to(device)
        joint = int(unwrapped(parts.unet).config.joint_attention_dim)
        if hidden.shape[-1] != joint:
            clip = torch.nn.functional.pad(hidden, (0, joint - hidden.shape[-1]))
            t5 = torch.zeros(clip.shape[0], _zero_t5_tokens(), joint, device=device, dtype=clip.dtype)
            hidden = torch.cat([clip, t5], dim=-2)
        return {"encoder_hidden_states": hidden, "pooled_projections": embeddings.pooled.to(device)}

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
            text_encoder_3=getattr(parts, "text_encoder_3", None),
            tokenizer_3=getattr(parts, "tokenizer_3", None),
        )

    def pipeline_embeddings(
        self, parts: Parts, prompts: TextEmbeddings, negative: TextEmbeddings, *, device: Any
    ) -> dict[str, Any]:
        """prompt_embeds / pooled_prompt_embeds and their negatives: the transformer's conditioning, which is
        what encode_prompt gives the transformer."""
        positive = self.unet_conditioning(parts, prompts, None, device=device)
        empty = self.unet_conditioning(parts, negative, None, device=device)
        return {
            "prompt_embeds": positive["encoder_hidden_states"],
            "pooled_prompt_embeds": positive["pooled_projections"],
            "negative_prompt_embeds": empty["encoder_hidden_states"],
            "negative_pooled_prompt_embeds": empty["pooled_projections"],
        }

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
        """CLIP-L- and CLIP-G-like encoders with projections (pooled width 64; CLIP-L's the identity, as
        SD3's), a tiny T5 (width 128, 24 tokens), a 16-channel VAE with SD3's shift and scale, a transformer of 2
        joint blocks (patch 2; real_blocks: 3, the first with SD3.5's second attention, and its RMS q/k norm),
        joint width 128 (T5's; the CLIP states are padded to it)."""
        encoders = (
            TinyEncoder(width=32, layers=2, act="quick_gelu", projection=32, identity_projection=True),
            TinyEncoder(width=64, layers=2, act="gelu", projection=32, pad_token="!"),
            TinyEncoder(width=128, layers=1, act="gated-gelu", kind="t5", tokens=24),
        )
        heads, head_dim = 2, 8
        transformer: dict[str, Any] = dict(
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=3 if real_blocks else 2,
            attention_head_dim=head_dim,
            num_attention_heads=heads,
            joint_attention_dim=encoders[2].width,
            caption_projection_dim=heads * head_dim,
            pooled_projection_dim=sum(e.projection or 0 for e in encoders[:2]),
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
