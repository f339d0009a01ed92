"""Stable Diffusion 1.x/2.x components: load a diffusers folder or hub id, save one atomically, sample.

Everything works on a plain diffusers folder (model_index.json + unet/vae/text_encoder/tokenizer/scheduler).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_file, atomic_folder, write_text
from ..errors import ModelError, require

if TYPE_CHECKING:
    import torch

__all__ = [
    "PREDICTION_TYPES",
    "SINGLE_FILE_SUFFIXES",
    "Keep",
    "SDComponents",
    "guess_architecture",
    "load_components",
    "make_pipeline",
    "save_components",
    "write_components",
]

PREDICTION_TYPES = ("epsilon", "v_prediction")
_SUBFOLDERS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# Single-file checkpoints (A1111 / ComfyUI); .ckpt/.pt/.bin are read only as plain tensors, never unpickled code.
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


@dataclass
class SDComponents:
    """The parts training touches. noise_scheduler is a DDPMScheduler built from the model's own scheduler
    config, so betas and prediction_type ("epsilon" / "v_prediction") are the model's. SDXL models have a
    second text encoder (CLIPTextModelWithProjection, whose pooled output conditions the UNet) and tokenizer."""

    unet: Any  # diffusers UNet2DConditionModel
    text_encoder: Any  # transformers CLIPTextModel
    tokenizer: Any  # transformers CLIPTokenizer
    vae: Any  # diffusers AutoencoderKL
    noise_scheduler: Any  # diffusers DDPMScheduler
    text_encoder_2: Any = None  # SDXL only: transformers CLIPTextModelWithProjection
    tokenizer_2: Any = None  # SDXL only

    @property
    def architecture(self) -> str:
        """ "sdxl" (two text encoders, size and crop conditioning) or "sd" (SD 1.x / 2.x)."""
        return "sdxl" if self.text_encoder_2 is not None else "sd"

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def text_encoders(self) -> tuple[Any, ...]:
        return (
            (self.text_encoder,) if self.text_encoder_2 is None else (self.text_encoder, self.text_encoder_2)
        )

    @property
    def tokenizers(self) -> tuple[Any, ...]:
        return (self.tokenizer,) if self.tokenizer_2 is None else (self.tokenizer, self.tokenizer_2)


# ---------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class Keep:
    """How each part is kept, so that it is loaded that way and never through a float32 copy: frozen parts in
    `dtype` (None: float32), the parts named in `float32` (those that train fully) in float32, a VAE whose
    config asks for float32 (SDXL's force_upcast) in float32; each moved to `device` (a GPU) as soon as it is
    loaded, so that host memory holds one part at a time."""

    dtype: Any = None  # torch.float16 / torch.bfloat16 / None
    float32: frozenset[str] = frozenset()  # of "unet", "text_encoder", "text_encoder_2"
    device: Any = None

    def dtype_of(self, part: str, *, force_upcast: bool = False) -> torch.dtype:
        torch = require("torch")
        if self.dtype is None or part in self.float32 or (part == "vae" and force_upcast):
            return torch.float32
        return self.dtype

    def place(self, module: Any) -> Any:
        torch = require("torch")
        if self.device is not None and torch.device(self.device).type != "cpu":
            torch.nn.Module.to(module, self.device)  # torch's own: diffusers' override warns on every move
        return module


@contextmanager
def quiet_progress() -> Iterator[None]:
    """transformers' per-model "Loading weights" / "Writing model shards" bars off for a block (downloads keep
    theirs: those are huggingface_hub's)."""
    logging = require("transformers.utils.logging")
    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


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


def _architecture_of(index: dict, model: str) -> str:
    """ "sd" or "sdxl" from a model_index.json; every other pipeline is refused with what it is."""
    kind = index.get("_class_name", "this pipeline")
    unet = index.get("unet") or [None, None]
    text_encoder = index.get("text_encoder") or [None, None]
    if unet[1] != "UNet2DConditionModel" or "transformer" in index:
        raise ModelError(
            f"'{model}' is a {kind} model; edtools trains Stable Diffusion 1.x/2.x and SDXL "
            "(a UNet2DConditionModel with CLIP text encoders)"
        )
    if "text_encoder_2" in index:
        if text_encoder[0] is None:
            raise ModelError(
                f"'{model}' is an SDXL refiner ({kind}: no first text encoder); edtools trains SDXL base models"
            )
        return "sdxl"
    return "sd"


def _subfolders(architecture: str) -> tuple[str, ...]:
    return _SUBFOLDERS + (("text_encoder_2", "tokenizer_2") if architecture == "sdxl" else ())


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
    architecture = _architecture_of(_model_index(source, local=path.is_dir(), hub=hub), model)
    if path.is_dir():
        missing = [name for name in _subfolders(architecture) if not (path / name).is_dir()]
        if missing:
            raise ModelError(
                f"model folder {path} lacks {', '.join(s + '/' for s in missing)}; a diffusers "
                f"{'SDXL' if architecture == 'sdxl' else 'Stable Diffusion'} folder needs all of "
                f"{', '.join(s + '/' for s in _subfolders(architecture))}"
            )
    try:
        with quiet_progress():
            components = _load_parts(source, architecture, keep, hub)
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


def vae_force_upcast(source: str, hub: dict) -> bool:
    """Whether the VAE config of a diffusers folder or hub id asks to run in float32 (SDXL's)."""
    diffusers = require("diffusers")
    return bool(
        diffusers.AutoencoderKL.load_config(source, subfolder="vae", **hub).get("force_upcast", False)
    )


def _load_parts(source: str, architecture: str, keep: Keep, hub: dict) -> SDComponents:
    """Each part from its subfolder of a diffusers folder or hub id, loaded in the dtype it is kept in and
    placed before the next one is read."""
    diffusers = require("diffusers")
    transformers = require("transformers")
    upcast = vae_force_upcast(source, hub)
    unet = keep.place(
        diffusers.UNet2DConditionModel.from_pretrained(
            source, subfolder="unet", torch_dtype=keep.dtype_of("unet"), **hub
        )
    )
    vae = keep.place(
        diffusers.AutoencoderKL.from_pretrained(
            source, subfolder="vae", torch_dtype=keep.dtype_of("vae", force_upcast=upcast), **hub
        )
    )
    text_encoder = keep.place(
        transformers.CLIPTextModel.from_pretrained(
            source, subfolder="text_encoder", dtype=keep.dtype_of("text_encoder"), **hub
        )
    )
    tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **hub)
    noise_scheduler = diffusers.DDPMScheduler.from_pretrained(source, subfolder="scheduler", **hub)
    second = {}
    if architecture == "sdxl":
        second["text_encoder_2"] = keep.place(
            transformers.CLIPTextModelWithProjection.from_pretrained(
                source, subfolder="text_encoder_2", dtype=keep.dtype_of("text_encoder_2"), **hub
            )
        )
        second["tokenizer_2"] = transformers.CLIPTokenizer.from_pretrained(
            source, subfolder="tokenizer_2", **hub
        )
    return SDComponents(unet, text_encoder, tokenizer, vae, noise_scheduler, **second)


def guess_architecture(model: str) -> str | None:
    """ "sd" or "sdxl" from a model's files without loading weights (a folder's model_index.json, a
    .safetensors file's tensor names), or None when that cannot tell (hub ids, .ckpt files, broken files)."""
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            return "sdxl" if "text_encoder_2" in index else "sd"
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as file:
                keys = list(file.keys())
            if any(k.startswith("conditioner.embedders.1.") for k in keys):
                return "sdxl"
            if any(k.startswith("cond_stage_model.") for k in keys):
                return "sd"
    except (OSError, ValueError, ImportError):
        return None
    return None


def check_prediction_type(components: SDComponents, model: str) -> None:
    prediction_type = components.prediction_type
    if prediction_type not in PREDICTION_TYPES:
        raise ModelError(
            f"model '{model}' has scheduler prediction_type '{prediction_type}'; "
            f"edtools trains {' or '.join(PREDICTION_TYPES)}"
        )


# ---------------------------------------------------------------------------------------------------------
# Saving and sampling


def make_pipeline(components: SDComponents, *, device: str | torch.device | None = None) -> Any:
    """A StableDiffusionPipeline (SDXL: StableDiffusionXLPipeline) sharing the training modules (no copies),
    with a DDIM sampler built from the noise scheduler's config (same betas and prediction type)."""
    diffusers = require("diffusers")
    # set_alpha_to_one=False is SD's own sampler setting; a value in the config wins.
    scheduler = diffusers.DDIMScheduler.from_config(
        {"set_alpha_to_one": False, **components.noise_scheduler.config}
    )
    common = dict(vae=components.vae, text_encoder=components.text_encoder, tokenizer=components.tokenizer)
    if components.architecture == "sdxl":
        pipeline = diffusers.StableDiffusionXLPipeline(
            **common,
            text_encoder_2=components.text_encoder_2,
            tokenizer_2=components.tokenizer_2,
            unet=components.unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipeline = diffusers.StableDiffusionPipeline(
            **common,
            unet=components.unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipeline.set_progress_bar_config(disable=True)
    if device is not None:
        pipeline.to(device)
    return pipeline


def write_components(components: SDComponents, folder: str | os.PathLike) -> None:
    """Write the diffusers pipeline files (safetensors) into folder (not atomically: see save_components), in
    the form the hub's SD folders have, which transformers 4.x and 5.x both read (5.x writes another)."""
    folder = Path(folder)
    with quiet_progress():
        make_pipeline(components).save_pretrained(folder, safe_serialization=True)
    _prefix_text_model(folder / "text_encoder")
    for name, tokenizer in zip(("tokenizer", "tokenizer_2"), components.tokenizers, strict=False):
        _write_vocab_files(tokenizer, folder / name)


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
