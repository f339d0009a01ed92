"""Writing single files: the diffusers weights under the original keys AUTOMATIC1111, ComfyUI and Forge load.

No maintained package converts diffusers -> original, so this is ours: key tables derived from each
component's config (levels, layers, attention, transformer depth), checked so no weight is dropped or doubled.
"""

from __future__ import annotations

import datetime
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_file
from ..errors import ModelError, require
from .sd import SDComponents
from .single_file import _TEXT, _UNET, _VAE, SAVE_DTYPES

if TYPE_CHECKING:
    import torch

__all__ = ["original_keys", "original_state_dict", "original_unet_module", "save_single_file"]


# ---------------------------------------------------------------------------------------------------------
# Writing: the original key layout, one table per component derived from its config.
#
# Each module maps by prefix: a diffusers prefix (down_blocks.1.resnets.0) -> an original one
# (input_blocks.4.0) plus a kind that says how the names below it map (resnet renames, transformer blocks
# with the same names, VAE attention as 1x1 convs, ...). Any key no rule covers is an error, so no weight
# is dropped silently; every original key is checked to come from exactly one diffusers weight (the text
# encoders' q/k/v go to one merged in_proj).


@dataclass(frozen=True)
class _Entry:
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


def _unet_rules(config: Mapping[str, Any]) -> dict[str, tuple[str, Callable]]:
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
    (entry,) = _map_by_rules([f"{path}.weight"], _unet_rules(config), "UNet")
    return entry.original.removesuffix(".weight")


def _vae_rules(config: Mapping[str, Any]) -> dict[str, tuple[str, Callable]]:
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


def _unmapped(label: str, key: str) -> ModelError:
    hint = ""
    if "lora" in key.lower() or "base_layer" in key:
        hint = (
            " It is a LoRA adapter weight: merge the adapters into the model first (peft merge_and_unload)."
        )
    return ModelError(
        f"cannot write the {label} weight '{key}' in the original single-file layout: no original key "
        f"corresponds to it, and edtools drops no weights silently.{hint}"
    )


def _map_by_rules(keys: Iterable[str], rules: dict[str, tuple[str, Callable]], label: str) -> list[_Entry]:
    entries = []
    for key in keys:
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            rule = rules.get(".".join(parts[:cut]))
            if rule is not None:
                mapped = rule[1](".".join(parts[cut:]))
                if mapped is None:
                    raise _unmapped(label, key)
                entries.append(_Entry(f"{rule[0]}.{mapped[0]}", (key,), mapped[1]))
                break
        else:
            raise _unmapped(label, key)
    return entries


def _strip_text_model(key: str) -> str:
    """transformers >= 5.6 flattens CLIPTextModel (no text_model. level), not CLIPTextModelWithProjection."""
    return key.removeprefix("text_model.")


def _clip_entries(keys: Iterable[str], label: str) -> list[_Entry]:
    """OpenAI CLIP (SD 1.x, SDXL's first encoder): transformers names under text_model. as in real files."""
    entries = []
    for key in keys:
        name = _strip_text_model(key)
        if not _CLIP.fullmatch(name):
            raise _unmapped(label, key)
        entries.append(_Entry(f"text_model.{name}", (key,)))
    return entries


def _openclip_entries(keys: Iterable[str], label: str) -> list[_Entry]:
    """OpenCLIP (SD 2.x, SDXL's second encoder): resblocks with q/k/v merged into in_proj, text_projection
    transposed ([width, projection])."""
    entries, qkv = [], {}
    for key in keys:
        name = _strip_text_model(key)
        if name == "text_projection.weight":
            entries.append(_Entry("text_projection", (key,), "transpose"))
            continue
        if name in _OPENCLIP:
            entries.append(_Entry(_OPENCLIP[name], (key,)))
            continue
        found = re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
        if found is None:
            raise _unmapped(label, key)
        layer, module, param = found.groups()
        base = f"transformer.resblocks.{layer}"
        if module in _OPENCLIP_LAYER:
            entries.append(_Entry(f"{base}.{_OPENCLIP_LAYER[module]}.{param}", (key,)))
        elif module.startswith("self_attn.") and module[len("self_attn.") :] in _QKV:
            slots = qkv.setdefault(f"{base}.attn.in_proj_{param}", [None, None, None])
            slots[_QKV[module[len("self_attn.") :]]] = key
        else:
            raise _unmapped(label, key)
    for original, slots in qkv.items():
        if None in slots:
            raise ModelError(f"the {label} lacks one of q/k/v for {original}; the model is incomplete")
        entries.append(_Entry(original, tuple(slots), "cat"))
    return entries


def _components_architecture(components: SDComponents) -> str:
    if components.text_encoder_2 is not None:
        return "sdxl"
    # SD 2.x's OpenCLIP ViT-H uses gelu; OpenAI CLIP ViT-L (SD 1.x) quick_gelu
    return "sd2" if components.text_encoder.config.hidden_act == "gelu" else "sd1"


def _unwrap(module: Any) -> Any:
    """The model inside torch.compile / DistributedDataParallel wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif type(module).__name__ in ("DistributedDataParallel", "DataParallel"):
            module = module.module
        else:
            return module


def _layout(components: SDComponents) -> tuple[list[tuple[str, Any, list[_Entry]]], dict[str, Callable]]:
    """([(original prefix, module, entries)], {original key: make(written) -> tensor} for the keys real files
    have that diffusers does not keep)."""
    torch = require("torch")
    architecture = _components_architecture(components)
    unet, vae = _unwrap(components.unet), _unwrap(components.vae)
    parts = [
        (_UNET, unet, _map_by_rules(unet.state_dict(), _unet_rules(unet.config), "UNet")),
        (_VAE, vae, _map_by_rules(vae.state_dict(), _vae_rules(vae.config), "VAE")),
    ]
    text = [_unwrap(components.text_encoder)] + (
        [_unwrap(components.text_encoder_2)] if architecture == "sdxl" else []
    )
    extra: dict[str, Callable] = {}
    for i, (prefix, module) in enumerate(zip(_TEXT[architecture], text, strict=True)):
        label = f"text encoder{' ' + str(i + 1) if architecture == 'sdxl' else ''}"
        config = module.config
        if prefix.endswith(".transformer."):
            parts.append((prefix, module, _clip_entries(module.state_dict(), label)))
            # the position ids buffer (transformers no longer saves it) as real files and ComfyUI have it
            ids = torch.arange(config.max_position_embeddings)[None]
            extra[prefix + "text_model.embeddings.position_ids"] = lambda _, ids=ids: ids
            continue
        parts.append((prefix, module, _openclip_entries(module.state_dict(), label)))
        # OpenCLIP's CLIP-loss temperature: unused for images, kept by real files (ln 100, its trained value)
        extra[prefix + "logit_scale"] = lambda _: torch.tensor(math.log(100.0))
        if architecture == "sd2":
            # SD 2.x conditions on the penultimate layer of a 24-layer OpenCLIP ViT-H. diffusers keeps only
            # the 23 layers it uses (its converter skips resblocks.23 and text_projection), while real SD 2.x
            # files, ComfyUI's and Forge's 24-layer clip_h and A1111's open_clip model all carry the last
            # layer and text_projection. As kohya's sd-scripts does (model_util.
            # convert_text_encoder_state_dict_to_sd_v2), write a copy of the last kept layer and an identity
            # projection: penultimate-layer loaders use neither, and every loader finds the keys it expects.
            last, width = config.num_hidden_layers, config.hidden_size
            kept, copy = f"transformer.resblocks.{last - 1}.", f"transformer.resblocks.{last}."
            for entry in parts[-1][2]:
                if entry.original.startswith(kept):
                    name = entry.original[len(kept) :]
                    extra[prefix + copy + name] = lambda written, k=prefix + kept + name: written[k].clone()
            extra[prefix + "text_projection"] = lambda _, w=width: torch.eye(w)
    prediction = components.noise_scheduler.config
    if prediction.prediction_type == "v_prediction":  # ComfyUI's and Forge's marker of v-prediction models
        extra["v_pred"] = lambda _: torch.tensor([])
    if prediction.get("rescale_betas_zero_snr"):
        extra["ztsnr"] = lambda _: torch.tensor([])
    return parts, extra


def original_keys(components: SDComponents) -> tuple[set[str], set[str]]:
    """(keys written from diffusers weights, keys written as constants or copies) of the original layout."""
    parts, extra = _layout(components)
    return {prefix + e.original for prefix, _, entries in parts for e in entries}, set(extra)


def original_state_dict(
    components: SDComponents, *, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The components' weights under the original single-file keys (model.diffusion_model.*,
    first_stage_model.*, cond_stage_model.* or SDXL's conditioner.embedders.*), on the CPU; floating tensors
    in dtype (None = as they are). Every diffusers weight lands in exactly one original key."""
    torch = require("torch")
    parts, extra = _layout(components)
    written: dict[str, torch.Tensor] = {}
    for prefix, module, entries in parts:
        state = module.state_dict()
        for entry in entries:
            tensors = [state[source].detach() for source in entry.sources]
            if entry.op == "cat":
                tensor = torch.cat(tensors)
            elif entry.op == "transpose":
                tensor = tensors[0].t()
            elif entry.op == "conv1x1":
                tensor = tensors[0].reshape(*tensors[0].shape, 1, 1) if tensors[0].ndim == 2 else tensors[0]
            else:
                tensor = tensors[0]
            key = prefix + entry.original
            if key in written:
                raise ModelError(f"two weights map to the single-file key {key}; the model cannot be written")
            written[key] = tensor
    for key, make in extra.items():
        written[key] = make(written)
    out = {}
    for key, tensor in written.items():
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        out[key] = tensor.to(device="cpu", dtype=cast).contiguous()
    return out


def _modelspec(components: SDComponents, path: Path) -> dict[str, str]:
    """Stability's ModelSpec 1.0.0 keys for the model."""
    architecture = _components_architecture(components)
    v = components.prediction_type == "v_prediction"
    names = {
        "sd1": "stable-diffusion-v1",
        "sd2": "stable-diffusion-v2-768-v" if v else "stable-diffusion-v2-512",
        "sdxl": "stable-diffusion-xl-v1-base",
    }
    size = components.unet.config.sample_size
    latent_side = size[0] if isinstance(size, (list, tuple)) else size
    side = latent_side * 2 ** (len(components.vae.config.block_out_channels) - 1)  # VAE downsampling
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": names[architecture],
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": path.stem,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": "v" if v else "epsilon",
    }


def save_single_file(
    components: SDComponents,
    path: str | os.PathLike,
    *,
    dtype: str = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one .safetensors file in the original layout that AUTOMATIC1111, ComfyUI and Forge load.

    dtype: "fp16" (default), "bf16" or "fp32". metadata: extra string entries for the safetensors header
    (they may override title and date; architecture, prediction type and resolution always describe the
    model). Written to a temp file beside path and renamed, so path is either untouched or complete."""
    safetensors_torch = require("safetensors.torch")
    torch = require("torch")
    path = Path(path).expanduser().resolve()
    if path.suffix.lower() != ".safetensors":
        raise ModelError(
            f"single-file checkpoints are written as .safetensors; {path.name} has another suffix"
        )
    dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype not in dtypes:
        raise ValueError(f"dtype is '{dtype}'; allowed: {', '.join(SAVE_DTYPES)}")
    header = _modelspec(components, path)
    derived = {"modelspec.architecture", "modelspec.prediction_type", "modelspec.resolution"}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(
                f"safetensors metadata holds strings only; '{key}' is a {type(value).__name__} "
                "(pass str(value), or json.dumps(value) for tables)"
            )
        if key not in derived:
            header[key] = value
    tensors = original_state_dict(components, dtype=dtypes[dtype])
    with atomic_file(path) as tmp:
        safetensors_torch.save_file(tensors, str(tmp), metadata=header)
    return path
