"""Stable Diffusion 1.x/2.x components: load a diffusers folder or hub id, save one atomically, sample.

Everything works on a plain diffusers folder (model_index.json + unet/vae/text_encoder/tokenizer/scheduler).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError, require

if TYPE_CHECKING:
    import torch

__all__ = ["PREDICTION_TYPES", "SDComponents", "load_components", "make_pipeline", "save_components"]

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


@dataclass
class SDComponents:
    """The five parts training touches. noise_scheduler is a DDPMScheduler built from the model's own
    scheduler config, so betas and prediction_type ("epsilon" / "v_prediction") are the model's."""

    unet: Any  # diffusers UNet2DConditionModel
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    vae: Any  # diffusers AutoencoderKL
    noise_scheduler: Any  # diffusers DDPMScheduler

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


# ---------------------------------------------------------------------------------------------------------
# Loading


def _check_model_folder(folder: Path) -> None:
    """Raise with what is missing and what to do when a folder is not a diffusers SD model."""
    index_file = folder / "model_index.json"
    if not index_file.is_file():
        raise ModelError(
            f"model folder {folder} has no model_index.json, so it is not a diffusers model folder. "
            "Point `model` at a diffusers Stable Diffusion folder (with unet/, vae/, text_encoder/, tokenizer/, "
            "scheduler/) or a Hugging Face hub id; convert a single .ckpt/.safetensors file first with "
            "diffusers' scripts/convert_original_stable_diffusion_to_diffusers.py"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ModelError(f"{index_file} is not valid JSON ({exc}); re-download or re-save the model") from exc
    if "text_encoder_2" in index or "transformer" in index:
        kind = index.get("_class_name", "this pipeline")
        raise ModelError(
            f"{folder} is a {kind} model; edtools trains Stable Diffusion 1.x/2.x "
            "(one CLIP text encoder and a UNet2DConditionModel)"
        )
    missing = [name for name in _SUBFOLDERS if not (folder / name).is_dir()]
    if missing:
        raise ModelError(
            f"model folder {folder} lacks {', '.join(s + '/' for s in missing)}; a Stable Diffusion diffusers "
            f"folder needs all of {', '.join(s + '/' for s in _SUBFOLDERS)}"
        )


def load_components(
    model: str, *, dtype: torch.dtype | None = None, local_files_only: bool | None = None
) -> SDComponents:
    """Load unet, vae, text encoder, tokenizer and a DDPM noise scheduler from a diffusers folder (always
    offline) or a Hugging Face hub id (local_files_only=None leaves the HF_HUB_OFFLINE setting in charge).

    dtype: torch dtype for the weights (None = float32).
    """
    torch = require("torch")
    diffusers = require("diffusers")
    transformers = require("transformers")

    path = Path(model).expanduser()
    if path.is_dir():
        _check_model_folder(path)
        source, local_files_only = str(path), True
    elif path.suffix.lower() in (".ckpt", ".safetensors", ".pt", ".bin") or path.exists():
        raise ModelError(
            f"model '{model}' is a single file; edtools loads diffusers folders. Convert it with diffusers' "
            "scripts/convert_original_stable_diffusion_to_diffusers.py and point `model` at the output folder"
        )
    elif model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ModelError(
            f"model '{model}' is neither an existing folder nor a hub id like 'owner/name'; "
            "check the path (it must be a diffusers Stable Diffusion folder)"
        )
    else:
        source = model
    dtype = torch.float32 if dtype is None else dtype
    hub = {} if local_files_only is None else {"local_files_only": bool(local_files_only)}
    try:
        unet = diffusers.UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=dtype, **hub
        )
        vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **hub)
        text_encoder = transformers.CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=dtype, **hub
        )
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
        noise_scheduler = diffusers.DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub)
    except OSError as exc:
        if path.is_dir():
            hint = "the folder is incomplete or damaged; re-save or re-download it"
        else:
            hint = (
                f"there is no folder '{model}' here, so it was read as a hub id: check the name, your network "
                "and the Hugging Face cache (with HF_HUB_OFFLINE=1 only the cache is read)"
            )
        raise ModelError(
            f"could not load Stable Diffusion model '{model}': {str(exc).rstrip('.')}. {hint}"
        ) from exc
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(
            f"model '{model}' has scheduler prediction_type '{prediction_type}'; "
            f"edtools trains {' or '.join(PREDICTION_TYPES)}"
        )
    return SDComponents(unet, text_encoder, tokenizer, vae, noise_scheduler)


# ---------------------------------------------------------------------------------------------------------
# Saving and sampling


def make_pipeline(components: SDComponents, *, device: str | torch.device | None = None) -> Any:
    """A StableDiffusionPipeline sharing the training modules (no copies), with a DDIM sampler built from
    the noise scheduler's config (same betas and prediction type; good images in few steps)."""
    diffusers = require("diffusers")
    pipeline = diffusers.StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        # set_alpha_to_one=False is SD's own sampler setting; a value in the config wins.
        scheduler=diffusers.DDIMScheduler.from_config(
            {"set_alpha_to_one": False, **components.noise_scheduler.config}
        ),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    if device is not None:
        pipeline.to(device)
    return pipeline


def save_components(components: SDComponents, out_dir: str | os.PathLike) -> Path:
    """Write a complete diffusers pipeline folder (safetensors) that StableDiffusionPipeline.from_pretrained
    and load_components read. Written into a temp folder beside out_dir and renamed at the end, so out_dir
    is either the old complete folder or the new complete one, never half written."""
    out = Path(out_dir).expanduser().resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    pipeline = make_pipeline(components)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    old = None
    try:
        pipeline.save_pretrained(tmp, safe_serialization=True)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".old"))
            os.replace(out, old / out.name)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and not out.exists() and (old / out.name).exists():
            os.replace(old / out.name, out)  # put the previous checkpoint back
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out
