"""Writing single files: the diffusers weights under the original keys AUTOMATIC1111, ComfyUI and Forge load.

No maintained package converts diffusers -> original, so this is ours: key tables derived from each
component's config (levels, layers, attention, transformer depth), checked so no weight is dropped or doubled.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_file
from ..errors import ModelError, require
from .components import SDComponents, unwrap
from .families import family_of
from .keymap import UNET_PREFIX as _UNET
from .keymap import VAE_PREFIX as _VAE
from .keymap import (
    Entry,
    clip_entries,
    map_by_rules,
    openclip_entries,
    original_unet_module,
    vae_rules,
)

if TYPE_CHECKING:
    import torch

__all__ = ["SAVE_DTYPES", "original_keys", "original_state_dict", "original_unet_module", "save_single_file"]


SAVE_DTYPES = ("fp16", "bf16", "fp32")
# ModelSpec's modelspec.prediction_type of each prediction type (flow matching: "flow", as LoRA files say)
_PREDICTION_NAMES = {"epsilon": "epsilon", "v_prediction": "v", "flow_matching": "flow"}
logger = logging.getLogger("edtools.models")


# ---------------------------------------------------------------------------------------------------------
# Writing: the original key layout, one table per component derived from its config (models.keymap), the
# text encoders where their family puts them.


def _layout(components: SDComponents) -> tuple[list[tuple[str, Any, list[Entry]]], dict[str, Callable]]:
    """([(original prefix, module, entries)], {original key: make(written) -> tensor} for the keys real files
    have that diffusers does not keep)."""
    torch = require("torch")
    family = family_of(components)
    unet, vae = unwrap(components.unet), unwrap(components.vae)
    parts = [
        (_UNET, unet, family.original_denoiser_entries(unet.config, unet.state_dict())),
        (_VAE, vae, map_by_rules(vae.state_dict(), vae_rules(vae.config), "VAE")),
    ]
    extra: dict[str, Callable] = {}
    for layout in family.single_file_text(family.variant_of(components)):
        prefix, label = layout.prefix, layout.label
        module = unwrap(getattr(components, layout.part))
        config = module.config
        if prefix.endswith(".transformer."):
            parts.append((prefix, module, clip_entries(module.state_dict(), label)))
            if layout.identity_projection:
                _check_identity_projection(module, label)
            # the position ids buffer (transformers no longer saves it) as real files and ComfyUI have it
            ids = torch.arange(config.max_position_embeddings)[None]
            extra[prefix + "text_model.embeddings.position_ids"] = lambda _, ids=ids: ids
            continue
        parts.append((prefix, module, openclip_entries(module.state_dict(), label)))
        # OpenCLIP's CLIP-loss temperature: unused for images, kept by real files (ln 100, its trained value)
        extra[prefix + "logit_scale"] = lambda _: torch.tensor(math.log(100.0))
        if layout.pad_last_layer:
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
    if components.prediction_type == "v_prediction":  # ComfyUI's and Forge's marker of v-prediction models
        extra["v_pred"] = lambda _: torch.tensor([])
    if prediction.get("rescale_betas_zero_snr"):
        extra["ztsnr"] = lambda _: torch.tensor([])
    return parts, extra


def _check_identity_projection(module: Any, label: str) -> None:
    """Warn when a text projection that readers of the layout take as the identity is another."""
    torch = require("torch")
    weight = getattr(getattr(module, "text_projection", None), "weight", None)
    if weight is None:
        return
    eye = torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype, device=weight.device)
    if not torch.equal(weight.detach(), eye):
        logger.warning(
            "the %s's text_projection is not the identity; single-file readers (diffusers, ComfyUI) use the "
            "identity there, so its pooled output will differ from this model's",
            label,
        )


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
            elif entry.op == "swap":  # adaLN (scale, shift) <-> (shift, scale): its own inverse
                first, second = tensors[0].chunk(2, dim=0)
                tensor = torch.cat([second, first], dim=0)
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
    family = family_of(components)
    prediction = components.prediction_type
    v = prediction == "v_prediction"
    side = family.native_resolution(components)
    return {
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": family.modelspec_architecture(family.variant_of(components), v),
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models",
        "modelspec.title": path.stem,
        "modelspec.date": datetime.date.today().isoformat(),
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": _PREDICTION_NAMES.get(prediction, prediction),
    }


def save_single_file(
    components: SDComponents,
    path: str | os.PathLike,
    *,
    dtype: str = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write one .safetensors file in the original layout that AUTOMATIC1111, ComfyUI and Forge load (SD3/3.5:
    the layout of Stability's own files, which ComfyUI and Forge load; T5-XXL is not written, as edtools keeps none).

        dtype: "fp16" (default), "bf16" or "fp32". metadata: extra string entries for the safetensors header
        (they may override title and date; architecture, prediction type and resolution always describe the
        model). Written to a temp file beside path and renamed, so path is either untouched or complete."""
    family = family_of(components)
    if not family.single_files:
        raise ModelError(
            f"edtools writes {family.label} models as diffusers folders, not single files: "
            "set save_single_file false (the checkpoint folder is a diffusers folder)"
        )
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
