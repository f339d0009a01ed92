"""Loading a diffusers folder or hub id of any registered model family, saving one atomically, sampling.

Everything works on a plain diffusers folder (model_index.json + unet/vae/text_encoder/tokenizer/scheduler);
what differs between families (subfolders, text encoders, pipeline) the family says (models.families).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_file, atomic_folder, write_text
from ..errors import ModelError, require
from .components import (
    PREDICTION_TYPES,
    Keep,
    SDComponents,
    check_prediction_type,
    quiet_progress,
    vae_force_upcast,
)
from .families import Family, family_of, family_of_index, guess_architecture
from .quantize import check_quantizable, quantized_loading
from .text_parts import check_t5_setting, load_text_encoder, wanted

if TYPE_CHECKING:
    import torch

__all__ = [
    "PREDICTION_TYPES",
    "SINGLE_FILE_SUFFIXES",
    "Keep",
    "SDComponents",
    "check_prediction_type",
    "guess_architecture",
    "load_components",
    "make_pipeline",
    "quiet_progress",
    "save_components",
    "vae_force_upcast",
    "write_components",
]

# Single-file checkpoints (A1111 / ComfyUI); .ckpt/.pt/.bin are read only as plain tensors, never unpickled code.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


def _model_index(source: str, *, local: bool, hub: dict) -> dict:
    """model_index.json of a diffusers folder or hub id, with a message for each way it can be wrong."""
    diffusers = require("diffusers")
    if local:
        index_file = Path(source) / "model_index.json"
        if not index_file.is_file():
            raise ModelError(
                f"model folder {source} has no model_index.json, so it is not a diffusers model folder. "
                "Point `model` at a diffusers Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, "
                "scheduler/), a single .safetensors/.ckpt file, or a Hugging Face hub id"
            )
        try:
            return json.loads(index_file.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise ModelError(
                f"{index_file} is not valid JSON ({exc}); re-download or re-save the model"
            ) from exc
    try:
        return dict(diffusers.DiffusionPipeline.load_config(source, **hub))
    except (OSError, ValueError) as exc:
        raise ModelError(
            f"could not load Stable Diffusion model '{source}': {str(exc).rstrip('.')}. There is no folder "
            f"'{source}' here, so it was read as a hub id: check the name, your network and the Hugging Face "
            "cache (with HF_HUB_OFFLINE=1 only the cache is read)"
        ) from exc


def _family_of(index: dict, model: str) -> Family:
    """The model family of a model_index.json; every other pipeline is refused with what it is."""
    kind = index.get("_class_name", "this pipeline")
    found = family_of_index(index, model)
    if found is None:
        raise ModelError(
            f"'{model}' is a {kind} model; edtools trains Stable Diffusion 1.x/2.x, SDXL "
            "(a UNet2DConditionModel with CLIP text encoders), Stable Diffusion 3 and Flux.1"
        )
    return found


def load_components(
    model: str,
    *,
    model_config: str | None = None,
    dtype: torch.dtype | None = None,
    keep: Keep | None = None,
    local_files_only: bool | None = None,
) -> SDComponents:
    """Load a Stable Diffusion 1.x/2.x or SDXL model: a diffusers folder (always offline), a single
    .safetensors/.ckpt file (see models.single_file; model_config gives its component configs), or a
    Hugging Face hub id (local_files_only=None leaves the HF_HUB_OFFLINE setting in charge).

    keep: each part's dtype and device (see Keep). dtype alone is Keep(dtype): every part in it (None: float32)
    but a VAE that asks for float32.
    """
    keep = Keep(dtype) if keep is None else keep
    path = Path(model).expanduser()
    if path.is_file() or (not path.is_dir() and path.suffix.lower() in SINGLE_FILE_SUFFIXES):
        from .single_file import load_single_file

        return load_single_file(path, model_config=model_config, keep=keep, local_files_only=local_files_only)
    if path.is_dir():
        source, local_files_only = str(path), True
    elif model.count("/") != 1 or model.startswith(("/", ".", "~")):
        raise ModelError(
            f"model '{model}' is neither an existing folder or file nor a hub id like 'owner/name'; "
            "check the path (a diffusers folder, or a single .safetensors/.ckpt file)"
        )
    else:
        source = model
    hub = {} if local_files_only is None else {"local_files_only": bool(local_files_only)}
    index = _model_index(source, local=path.is_dir(), hub=hub)
    family = _family_of(index, model)
    check_quantizable(family, keep.quantize, model)
    check_t5_setting(family, keep, model)
    if path.is_dir():
        missing = [name for name in family.subfolders if not (path / name).is_dir()]
        if missing:
            raise ModelError(
                f"model folder {path} lacks {', '.join(s + '/' for s in missing)}; a diffusers "
                f"{family.label} folder needs all of {', '.join(s + '/' for s in family.subfolders)}"
            )
    try:
        with quiet_progress():
            components = _load_parts(source, family, keep, hub, index)
    except (OSError, ValueError) as exc:
        if path.is_dir():
            hint = "the folder is incomplete or damaged; re-save or re-download it"
        else:
            hint = (
                "check your network and the Hugging Face cache (with HF_HUB_OFFLINE=1 only the cache is read)"
            )
        raise ModelError(
            f"could not load Stable Diffusion model '{model}': {str(exc).rstrip('.')}. {hint}"
        ) from exc
    check_prediction_type(components, model)
    return components


def _load_parts(source: str, family: Family, keep: Keep, hub: dict, index: dict) -> SDComponents:
    """Each part from its subfolder of a diffusers folder or hub id, loaded in the dtype it is kept in and
    placed before the next one is read; the text encoders and tokenizers are the family's (an optional one when
    model_index.json has it and keep.t5 does not drop it). With keep.quantize the denoiser is quantised while it
    loads, straight onto keep.device (models.quantize)."""
    diffusers = require("diffusers")
    transformers = require("transformers")

    upcast = vae_force_upcast(source, hub)
    compute = keep.dtype if keep.dtype is not None else keep.dtype_of("unet")
    unet = keep.place(
        getattr(diffusers, family.denoiser_class).from_pretrained(
            source,
            subfolder=family.denoiser_part,
            torch_dtype=keep.dtype_of("unet"),
            **quantized_loading(keep.quantize, compute, keep.device),
            **hub,
        ),
        "unet",
    )
    vae = keep.place(
        diffusers.AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=keep.dtype_of("vae", force_upcast=upcast), **hub
        )
    )
    text: dict[str, Any] = {}
    for spec in family.text_encoders:
        if spec.optional and not wanted(spec, keep, index):
            continue
        text[spec.part] = load_text_encoder(source, spec, keep, hub)
        text[spec.tokenizer] = getattr(transformers, spec.tokenizer_class).from_pretrained(
            source, subfolder=spec.tokenizer, **hub
        )
    scheduler_class = getattr(diffusers, family.noise_scheduler_class)
    noise_scheduler = scheduler_class.from_pretrained(source, subfolder="scheduler", **hub)
    return SDComponents(unet=unet, vae=vae, noise_scheduler=noise_scheduler, **text)


# ---------------------------------------------------------------------------------------------------------
# Saving and sampling


def make_pipeline(components: SDComponents, *, device: str | torch.device | None = None) -> Any:
    """The family's pipeline (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline)
    sharing the training modules (no copies), with the family's sampler built from the noise scheduler's config
    (DDIM with the same betas and prediction type; SD3: its flow-matching Euler sampler with the same shift)."""
    family = family_of(components)
    pipeline = family.make_pipeline(components, family.sampling_scheduler(components.noise_scheduler))
    pipeline.set_progress_bar_config(disable=True)
    if device is not None:
        pipeline.to(device)
    return pipeline


def write_components(components: SDComponents, folder: str | os.PathLike) -> None:
    """Write the diffusers pipeline files (safetensors) into folder (not atomically: see save_components), in
    the form the hub's SD folders have, which transformers 4.x and 5.x both read (5.x writes another)."""
    folder = Path(folder)
    saving = logging.getLogger("diffusers.pipelines.pipeline_utils")
    absent = _AbsentPartFilter()
    saving.addFilter(absent)
    try:
        with quiet_progress():
            make_pipeline(components).save_pretrained(folder, safe_serialization=True)
    finally:
        saving.removeFilter(absent)
    for spec in family_of(components).text_encoders:
        if spec.model_class == "CLIPTextModel":  # WithProjection keeps text_model. and has text_projection
            _prefix_text_model(folder / spec.part)
        if spec.tokenizer_class == "CLIPTokenizer":
            _write_vocab_files(getattr(components, spec.tokenizer), folder / spec.tokenizer)


class _AbsentPartFilter(logging.Filter):
    """Drops diffusers' warning for a part a pipeline holds as None (SD3 without T5): model_index.json
    records it as absent, which is what is meant."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.endswith("cannot be saved.") and "=None of type" in message)


def _write_vocab_files(tokenizer: Any, folder: Path) -> None:
    """vocab.json and merges.txt of a CLIP tokenizer: transformers 5.x saves only tokenizer.json, which 4.x's
    CLIPTokenizer (the class model_index.json names) cannot read, failing to load at all."""
    if not (folder / "vocab.json").is_file():
        tokenizer.backend_tokenizer.model.save(str(folder))


# transformers 5.x saves a CLIPTextModel without its text_model. level, and 4.x (Colab's, kohya's) then loads
# such an encoder with random weights and only a warning. Every version reads the prefixed names, the hub's own.
_TEXT_MODEL = "text_model."


def _prefixed(name: str) -> str:
    return name if name.startswith(_TEXT_MODEL) else _TEXT_MODEL + name


def _prefix_text_model(folder: Path) -> None:
    """Name a saved CLIPTextModel's weights text_model.*: in each safetensors file and a sharded model's index.
    Files already named so (written by transformers 4.x) are left as they are."""
    for path in sorted(folder.glob("*.safetensors")):
        _rename_tensors(path, _prefixed)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        content = json.loads(index.read_text(encoding="utf-8"))
        weight_map = {_prefixed(name): file for name, file in content["weight_map"].items()}
        if weight_map != content["weight_map"]:
            write_text(
                index, json.dumps({**content, "weight_map": weight_map}, indent=2, sort_keys=True) + "\n"
            )


def _rename_tensors(path: Path, rename: Callable[[str], str]) -> None:
    """Rename the tensors of a safetensors file in place (atomically). Only the JSON header changes (an 8-byte
    little-endian length, then the header): the tensor bytes are copied as they are, never held in memory."""
    with open(path, "rb") as file:
        header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        renamed = {name if name == "__metadata__" else rename(name): entry for name, entry in header.items()}
        if list(renamed) == list(header):
            return
        text = json.dumps(renamed, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # padded like safetensors' own, so the tensors stay 8-byte aligned
        with atomic_file(path) as tmp, open(tmp, "wb") as out:
            out.write(len(text).to_bytes(8, "little") + text)
            shutil.copyfileobj(file, out)


def save_components(components: SDComponents, out_dir: str | os.PathLike) -> Path:
    """Write a complete diffusers pipeline folder (safetensors) that StableDiffusionPipeline.from_pretrained
    and load_components read, atomically: out_dir is either the old complete folder or the new one."""
    out = Path(out_dir).expanduser().resolve()
    with atomic_folder(out) as tmp:
        write_components(components, tmp)
    return out
