"""Key tables between diffusers and the original (LDM / SGM) layout of single files, derived from each config.

Pure name maps over configs and key lists: the single-file reader and writer and the model families use them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ModelError

__all__ = [
    "UNET_PREFIX",
    "VAE_PREFIX",
    "Entry",
    "clip_entries",
    "map_by_rules",
    "openclip_entries",
    "original_unet_module",
    "unet_rules",
    "vae_rules",
]

# Where the UNet's and VAE's weights sit in a single file (the text encoders' prefixes are the families').
UNET_PREFIX, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."

# Each module maps by prefix: a diffusers prefix (down_blocks.1.resnets.0) -> an original one
# (input_blocks.4.0) plus a kind that says how the names below it map (resnet renames, transformer blocks
# with the same names, VAE attention as 1x1 convs, ...). Any key no rule covers is an error, so no weight
# is dropped silently; every original key is checked to come from exactly one diffusers weight (the text
# encoders' q/k/v go to one merged in_proj).


@dataclass(frozen=True)
class Entry:
    original: str  # key in the single file
    sources: tuple[str, ...]  # keys in the module's state dict
    op: str = ""  # "", "conv1x1" (linear -> [C, C, 1, 1]), "transpose", "cat" (q, k, v -> in_proj)


_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {
    "norm1": "norm1",
    "conv1": "conv1",
    "norm2": "norm2",
    "conv2": "conv2",
    "conv_shortcut": "nin_shortcut",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
# Transformer2DModel: the same names in diffusers and the original SpatialTransformer
_TRANSFORMER = re.compile(
    r"(norm|proj_in|proj_out)\.(weight|bias)|transformer_blocks\.\d+\."
    r"(norm[123]|attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2))\.(weight|bias)"
)
_CLIP = re.compile(
    r"embeddings\.(token_embedding|position_embedding)\.weight|final_layer_norm\.(weight|bias)|encoder\."
    r"layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|layer_norm[12]|mlp\.fc[12])\.(weight|bias)"
)
_OPENCLIP = {  # transformers CLIP name -> OpenCLIP name (SD 2.x and SDXL's second text encoder)
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_OPENCLIP_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}
_QKV = {"q_proj": 0, "k_proj": 1, "v_proj": 2}


def _leaf(suffix: str) -> tuple[str, str] | None:
    return (suffix, "") if suffix in ("weight", "bias") else None


def _renamed(table: dict[str, str]) -> Callable[[str], tuple[str, str] | None]:
    def rename(suffix: str) -> tuple[str, str] | None:
        module, _, param = suffix.rpartition(".")
        return (f"{table[module]}.{param}", "") if module in table and param in ("weight", "bias") else None

    return rename


def _transformer(suffix: str) -> tuple[str, str] | None:
    return (suffix, "") if _TRANSFORMER.fullmatch(suffix) else None


def _vae_attention(suffix: str) -> tuple[str, str] | None:
    module, _, param = suffix.rpartition(".")
    if module not in _VAE_ATTENTION or param not in ("weight", "bias"):
        return None
    conv = param == "weight" and module != "group_norm"  # the original stores q/k/v/proj_out as 1x1 convs
    return f"{_VAE_ATTENTION[module]}.{param}", "conv1x1" if conv else ""


def _per_level(value: Any, levels: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [int(value)] * levels


def unet_rules(config: Mapping[str, Any]) -> dict[str, tuple[str, Callable]]:
    """diffusers prefix -> (original prefix, suffix map) for a UNet2DConditionModel config: any number of
    levels and layers, attention on the levels whose blocks have it (SD 1.x/2.x: 4 levels, SDXL: 3)."""
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    known = {"DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"}
    mid = config.get("mid_block_type") or "UNetMidBlock2DCrossAttn"
    if not set(down + up) <= known or mid != "UNetMidBlock2DCrossAttn" or len(down) != len(up):
        raise ModelError(
            f"the UNet has blocks {down} / {mid} / {up}; the single-file writer knows Stable Diffusion's "
            "(Down/Up)Block2D, CrossAttn(Down/Up)Block2D and UNetMidBlock2DCrossAttn"
        )
    levels = len(down)
    layers = _per_level(config["layers_per_block"], levels)
    resnet, leaf = _renamed(_UNET_RESNET), _leaf
    rules: dict[str, tuple[str, Callable]] = {
        "conv_in": ("input_blocks.0.0", leaf),
        "time_embedding.linear_1": ("time_embed.0", leaf),
        "time_embedding.linear_2": ("time_embed.2", leaf),
        "add_embedding.linear_1": ("label_emb.0.0", leaf),  # SDXL size/crop/pooled-text conditioning
        "add_embedding.linear_2": ("label_emb.0.2", leaf),
        "class_embedding.linear_1": ("label_emb.0.0", leaf),
        "class_embedding.linear_2": ("label_emb.0.2", leaf),
        "conv_norm_out": ("out.0", leaf),
        "conv_out": ("out.2", leaf),
        "mid_block.resnets.0": ("middle_block.0", resnet),
        "mid_block.attentions.0": ("middle_block.1", _transformer),
        "mid_block.resnets.1": ("middle_block.2", resnet),
    }
    n = 1  # input_blocks.0 is conv_in
    for i, kind in enumerate(down):
        for j in range(layers[i]):
            rules[f"down_blocks.{i}.resnets.{j}"] = (f"input_blocks.{n}.0", resnet)
            if kind.startswith("CrossAttn"):
                rules[f"down_blocks.{i}.attentions.{j}"] = (f"input_blocks.{n}.1", _transformer)
            n += 1
        if i < levels - 1:
            rules[f"down_blocks.{i}.downsamplers.0.conv"] = (f"input_blocks.{n}.0.op", leaf)
            n += 1
    n = 0
    for i, kind in enumerate(up):
        attention = kind.startswith("CrossAttn")
        count = list(reversed(layers))[i] + 1
        for j in range(count):
            rules[f"up_blocks.{i}.resnets.{j}"] = (f"output_blocks.{n}.0", resnet)
            if attention:
                rules[f"up_blocks.{i}.attentions.{j}"] = (f"output_blocks.{n}.1", _transformer)
            if j == count - 1 and i < levels - 1:  # the upsampler comes after the attention block, if any
                upsampler = f"output_blocks.{n}.{2 if attention else 1}.conv"
                rules[f"up_blocks.{i}.upsamplers.0.conv"] = (upsampler, leaf)
            n += 1
    return rules


def original_unet_module(config: Mapping[str, Any], path: str) -> str:
    """A UNet module's path in the original (LDM / SGM) layout, e.g. for SDXL "down_blocks.1.attentions.0.
    transformer_blocks.0.attn1.to_q" -> "input_blocks.4.1.transformer_blocks.0.attn1.to_q": the names kohya's
    SDXL LoRA files use. A path no rule maps is a ModelError."""
    (entry,) = map_by_rules([f"{path}.weight"], unet_rules(config), "UNet")
    return entry.original.removesuffix(".weight")


def vae_rules(config: Mapping[str, Any]) -> dict[str, tuple[str, Callable]]:
    """diffusers prefix -> (original prefix, suffix map) for an AutoencoderKL config (decoder levels are
    numbered in reverse in the original)."""
    levels = len(config["block_out_channels"])
    layers = int(config["layers_per_block"])
    resnet, leaf = _renamed(_VAE_RESNET), _leaf
    rules: dict[str, tuple[str, Callable]] = {
        "quant_conv": ("quant_conv", leaf),
        "post_quant_conv": ("post_quant_conv", leaf),
    }
    for part in ("encoder", "decoder"):
        rules[f"{part}.conv_in"] = (f"{part}.conv_in", leaf)
        rules[f"{part}.conv_out"] = (f"{part}.conv_out", leaf)
        rules[f"{part}.conv_norm_out"] = (f"{part}.norm_out", leaf)
        rules[f"{part}.mid_block.resnets.0"] = (f"{part}.mid.block_1", resnet)
        rules[f"{part}.mid_block.resnets.1"] = (f"{part}.mid.block_2", resnet)
        rules[f"{part}.mid_block.attentions.0"] = (f"{part}.mid.attn_1", _vae_attention)
    for i in range(levels):
        for j in range(layers):
            rules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", resnet)
        for j in range(layers + 1):
            rules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", resnet)
        if i < levels - 1:
            rules[f"encoder.down_blocks.{i}.downsamplers.0.conv"] = (
                f"encoder.down.{i}.downsample.conv",
                leaf,
            )
            rules[f"decoder.up_blocks.{i}.upsamplers.0.conv"] = (
                f"decoder.up.{levels - 1 - i}.upsample.conv",
                leaf,
            )
    return rules


def unmapped(label: str, key: str) -> ModelError:
    hint = ""
    if "lora" in key.lower() or "base_layer" in key:
        hint = (
            " It is a LoRA adapter weight: merge the adapters into the model first (peft merge_and_unload)."
        )
    return ModelError(
        f"cannot write the {label} weight '{key}' in the original single-file layout: no original key "
        f"corresponds to it, and edtools drops no weights silently.{hint}"
    )


def map_by_rules(keys: Iterable[str], rules: dict[str, tuple[str, Callable]], label: str) -> list[Entry]:
    entries = []
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            rule = rules.get(".".join(parts[:cut]))
            if rule is not None:
                mapped = rule[1](".".join(parts[cut:]))
                if mapped is None:
                    raise unmapped(label, key)
                entries.append(Entry(f"{rule[0]}.{mapped[0]}", (key,), mapped[1]))
                break
        else:
            raise unmapped(label, key)
    return entries


def _strip_text_model(key: str) -> str:
    """transformers >= 5.6 flattens CLIPTextModel (no text_model. level), not CLIPTextModelWithProjection."""
    return key.removeprefix("text_model.")


def clip_entries(keys: Iterable[str], label: str) -> list[Entry]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder, SD3's both): transformers names under text_model. as in real
    files; a CLIPTextModelWithProjection's text_projection.weight as it is (SD3 files keep it so)."""
    entries = []
    for key in keys:
        if key == "text_projection.weight":
            entries.append(Entry(key, (key,)))
            continue
        name = _strip_text_model(key)
        if not _CLIP.fullmatch(name):
            raise unmapped(label, key)
        entries.append(Entry(f"text_model.{name}", (key,)))
    return entries


def openclip_entries(keys: Iterable[str], label: str) -> list[Entry]:
    """OpenCLIP (SD 2.x, SDXL's second encoder): resblocks with q/k/v merged into in_proj, text_projection
    transposed ([width, projection])."""
    entries, qkv = [], {}
    for key in keys:
        name = _strip_text_model(key)
        if name == "text_projection.weight":
            entries.append(Entry("text_projection", (key,), "transpose"))
            continue
        if name in _OPENCLIP:
            entries.append(Entry(_OPENCLIP[name], (key,)))
            continue
        found = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if found is None:
            raise unmapped(label, key)
        layer, module, param = found.groups()
        base = f"transformer.resblocks.{layer}"
        if module in _OPENCLIP_LAYER:
            entries.append(Entry(f"{base}.{_OPENCLIP_LAYER[module]}.{param}", (key,)))
        elif module.startswith("self_attn.") and module[len("self_attn.") :] in _QKV:
            slots = qkv.setdefault(f"{base}.attn.in_proj_{param}", [None, None, None])
            slots[_QKV[module[len("self_attn.") :]]] = key
        else:
            raise unmapped(label, key)
    for original, slots in qkv.items():
        if None in slots:
            raise ModelError(f"the {label} lacks one of q/k/v for {original}; the model is incomplete")
        entries.append(Entry(original, tuple(slots), "cat"))
    return entries
