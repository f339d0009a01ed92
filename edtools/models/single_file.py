"""Single-file Stable Diffusion checkpoints: the .safetensors / .ckpt files AUTOMATIC1111, ComfyUI, Forge use.

Read without running pickled code, told apart (each model family knows its keys), loaded by diffusers'
converters. (Writing them is single_file_layout's job.)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Collection, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import ModelError, require
from .components import Keep, SDComponents, check_prediction_type, vae_force_upcast
from .families import Family, detect_variant, family, variant_of_configs, variant_of_model_type
from .float8 import dequantise_scaled
from .keymap import UNET_PREFIX as _UNET
from .keymap import VAE_PREFIX as _VAE
from .quantize import check_quantizable, quantize_loaded
from .single_file_layout import SAVE_DTYPES, original_keys
from .single_file_prediction import with_sampling
from .single_file_t5 import load_t5_from_file, t5_weights
from .text_parts import check_t5_setting, optional_text_parts

if TYPE_CHECKING:
    import torch

__all__ = ["SAVE_DTYPES", "detect_architecture", "load_single_file", "read_state_dict"]

logger = logging.getLogger("edtools.models")

_PREFIXES = ("cond_stage_model.", "conditioner.embedders.")  # every SD/SDXL text encoder's weights
_ACCEPTS = (
    "edtools loads single-file Stable Diffusion 1.x, 2.x and SDXL base checkpoints (model.diffusion_model.*, "
    "first_stage_model.* and cond_stage_model.* or conditioner.embedders.* weights, as AUTOMATIC1111, ComfyUI "
    "and Forge save them), SD3/SD3.5 files (model.diffusion_model.joint_blocks.*, with or without the VAE and "
    "text_encoders.*), or a diffusers folder"
)


# ---------------------------------------------------------------------------------------------------------
# Reading


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a .safetensors or .ckpt/.pt/.pth/.bin file and its safetensors header metadata ({} for
    pickles). Pickled files are read with torch.load(weights_only=True) only: one that needs any other Python
    object is refused, never executed. Nested "state_dict" wrappers are removed, non-tensors dropped."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model file {path} does not exist; check the path")
    if not path.is_file():
        raise ModelError(f"{path} is not a file; give a .safetensors/.ckpt file or a diffusers folder")
    size = path.stat().st_size
    if size == 0:
        raise ModelError(
            f"model file {path} is empty (0 bytes): the download or copy did not finish; fetch the file again"
        )
    if _is_safetensors(path):
        tensors, metadata = _read_safetensors(path)
    else:
        tensors, metadata = _read_pickle(path), {}
    if not tensors:
        raise ModelError(f"{path} holds no tensors, so it is not a model checkpoint. {_ACCEPTS}")
    return tensors, metadata


def _is_safetensors(path: Path) -> bool:
    """By name, or by content: an 8-byte little-endian header length, then the JSON header."""
    with open(path, "rb") as file:
        head = file.read(9)
    return path.suffix.lower() == ".safetensors" or (len(head) == 9 and head[8:9] == b"{")


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    safetensors = require("safetensors")
    try:
        with safetensors.safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            tensors = {key: file.get_tensor(key) for key in file.keys()}  # noqa: SIM118 (not a dict)
    except (safetensors.SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"cannot read {path} as safetensors ({exc}): the file is truncated or damaged, or not a "
            "safetensors file; download it again"
        ) from exc
    return tensors, metadata


def _read_pickle(path: Path) -> dict[str, torch.Tensor]:
    torch = require("torch")
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - untrusted bytes fail in many ways; all mean "cannot use"
        if "weights only load failed" in str(exc).lower():
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            what = f" (it refers to {found.group(1)})" if found else ""
            raise ModelError(
                f"{path} contains Python code or objects beyond tensors{what}. Loading it would run that "
                "code, and edtools will not do that. Get a .safetensors version of this model (most model "
                "sites offer one), or convert the file yourself only if you trust where it came from"
            ) from None
        raise ModelError(
            f"cannot read {path} as a PyTorch checkpoint ({type(exc).__name__}: {str(exc)[:200]}): the file is "
            "truncated or damaged, or not a model checkpoint; download it again"
        ) from exc
    while isinstance(loaded, Mapping) and isinstance(loaded.get("state_dict"), Mapping):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, Mapping):
        raise ModelError(
            f"{path} holds a {type(loaded).__name__}, not named tensors, so it is not a model checkpoint. "
            f"{_ACCEPTS}"
        )
    return {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}


# ---------------------------------------------------------------------------------------------------------
# Detection


def _has(keys: Iterable[str], *prefixes: str) -> bool:
    return any(key.startswith(prefixes) for key in keys)


def detect_architecture(state_dict: Mapping[str, Any], *, source: str | os.PathLike | None = None) -> str:
    """The variant ("sd1", "sd2", "sdxl", "sd3": see models.families) from the key layout of an
    original-layout checkpoint (not from tensor widths, so tiny test models are recognised too). Anything else
    is a ModelError that says what the file looks like (LoRA, VAE, refiner, inpainting, FLUX, a diffusers
    component, ...) and what edtools accepts."""
    name = str(source) if source is not None else "this checkpoint"
    keys = list(state_dict)

    def refuse(what: str, hint: str = "") -> ModelError:
        return ModelError(f"{name} is {what}, not a model edtools can train. {hint}{_ACCEPTS}")

    if not keys:
        raise ModelError(f"{name} holds no tensors, so it is not a model checkpoint. {_ACCEPTS}")
    lora_marks = (".lora_down.", ".lora_up.", ".lora_A.", ".lora_B.", ".hada_w1_a", ".lokr_w1")
    if _has(keys, "lora_unet_", "lora_te", "lora_") or any(m in k for k in keys for m in lora_marks):
        raise refuse(
            "a LoRA (or LyCORIS) adapter file",
            "Load it on top of its base model in your UI; to fine-tune, give edtools the base model. ",
        )
    if len(keys) <= 4 and not any("." in k for k in keys):
        raise refuse("a textual-inversion embedding (a few token vectors, no model)")
    if "edm_mean" in state_dict:
        raise refuse("a Playground v2.5 model (EDM formulation; edtools trains DDPM epsilon/v models)")
    # a family whose denoiser is no UNet (SD3's MMDiT) is told by its own block names; the UNet checks below
    # are not for it
    variant = detect_variant(keys)
    if variant is not None and family(variant).denoiser_part != "unet":
        return variant
    other = _other_model_type(state_dict)
    if other:
        raise refuse(other)
    if not _has(keys, _UNET):
        if _has(keys, "down_blocks.", "conv_in.", "time_embedding.", "mid_block."):
            raise refuse(
                "a diffusers-format UNet state dict (one component of a diffusers folder)",
                "Give edtools the whole diffusers folder (model_index.json, unet/, vae/, ...) instead. ",
            )
        if _has(keys, "encoder.down_blocks.", "decoder.up_blocks."):
            raise refuse("a diffusers-format VAE state dict", "Give edtools the whole diffusers folder. ")
        if _has(keys, "text_model.", "encoder.layers.", "embeddings.token_embedding."):
            raise refuse(
                "a transformers text encoder state dict", "Give edtools the whole diffusers folder. "
            )
        if _has(keys, _VAE, "encoder.down.", "decoder.up.", "encoder.conv_in.", "decoder.conv_in."):
            raise refuse(
                "a VAE file (the autoencoder alone)",
                "Load it as a VAE in your UI; edtools needs a full model. ",
            )
        prefixes = sorted({k.split(".")[0] for k in keys})[:5]
        raise ModelError(
            f"{name} does not look like a Stable Diffusion checkpoint: it has no model.diffusion_model.* (UNet) "
            f"weights; its keys start with {', '.join(prefixes)}. {_ACCEPTS}"
        )
    conv_in = state_dict.get(_UNET + "input_blocks.0.0.weight")
    if conv_in is not None and getattr(conv_in, "ndim", 0) == 4 and conv_in.shape[1] != 4:
        channels = int(conv_in.shape[1])
        kind = {
            9: "an inpainting model",
            8: "an instruct-pix2pix (image-conditioned) model",
            7: "an upscaler",
        }
        raise refuse(
            f"{kind.get(channels, 'a model')} ({channels} UNet input channels)",
            "edtools trains text-to-image models (4 latent input channels). ",
        )
    variant = detect_variant(keys)
    if variant is not None:
        return variant
    if _has(keys, "conditioner.embedders.0.model.") and _has(keys, _UNET + "label_emb."):
        raise refuse(
            "an SDXL refiner (one OpenCLIP text encoder; it refines SDXL base images)",
            "edtools trains SDXL base models. ",
        )
    if _has(keys, _UNET + "label_emb.") or _has(keys, "embedder.", "noise_augmentor."):
        raise refuse("an image- or class-conditioned model (unCLIP, upscaler)")
    raise ModelError(
        f"{name} has a UNet (model.diffusion_model.*) but no text encoder weights that edtools knows "
        "(cond_stage_model.transformer.* for SD 1.x, cond_stage_model.model.* for SD 2.x, conditioner.embedders.* "
        f"for SDXL): it is a UNet-only or unusual file; give a full checkpoint. {_ACCEPTS}"
    )


def _other_model_type(state_dict: Mapping[str, Any]) -> str | None:
    """What diffusers recognises a file as, when that is not a Stable Diffusion UNet model."""
    keys = state_dict.keys()
    if _has(keys, "control_model.", "controlnet_cond_embedding."):
        return "a ControlNet"
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "a Stable Diffusion 3 transformer in another layout than model.diffusion_model.joint_blocks.*"
    if any("double_blocks." in k for k in keys):
        return "a FLUX model in a layout edtools does not read (not Black Forest Labs' or ComfyUI's)"
    try:
        utils = require("diffusers.loaders.single_file_utils")
        model_type = utils.infer_diffusers_model_type(state_dict)
    except Exception:  # noqa: BLE001 - diffusers' guess is only used to name the model
        return None
    if model_type.startswith(("v1", "v2", "xl_", "inpainting", "upscale", "instruct", "playground")):
        return None  # Stable Diffusion family: told apart below, by key layout
    family = {"sd3": "Stable Diffusion 3", "sd35": "Stable Diffusion 3.5", "flux": "FLUX", "wan": "Wan video"}
    for start, label in family.items():
        if model_type.startswith(start):
            return f"a {label} model ({model_type})"
    return f"a {model_type} model"


# ---------------------------------------------------------------------------------------------------------
# Loading


def load_single_file(
    path: str | os.PathLike,
    *,
    model_config: str | os.PathLike | None = None,
    keep: Keep | None = None,
    local_files_only: bool | None = None,
) -> SDComponents:
    """Load a single-file SD 1.x/2.x, SDXL, SD3/3.5 or Flux.1 checkpoint with diffusers' converters.

    model_config: a diffusers folder or hub id whose component configs and tokenizers fit the file (no weights
    are read from it, but for the parts an SD3/3.5 or Flux file lacks: those load from it, so such files need
    it). A T5-XXL in the file is read (single_file_t5); float8 weights are cast, scaled ones dequantised (float8).
    None: diffusers' default repo for the detected type, from the Hugging Face cache or the hub
    (local_files_only None = HF_HUB_OFFLINE decides). keep: each part's dtype and device (None: float32).
    The file's tensors are memory-mapped: a part kept in the file's dtype is not copied, and each part's
    tensors are let go once it is loaded and placed.
    Prediction type (DDPM families): model_config's scheduler when given, else the file's metadata (modelspec,
    kohya) or v_pred key, else a <stem>.yaml beside the file (A1111), else the inferred config's scheduler.
    """
    diffusers = require("diffusers")
    utils = require("diffusers.loaders.single_file_utils")
    hub_constants = require("huggingface_hub.constants")

    path = Path(path).expanduser()
    state_dict, metadata = read_state_dict(path)
    variant = detect_architecture(state_dict, source=path)
    fam = family(variant)
    keep = Keep() if keep is None else keep
    check_quantizable(fam, keep.quantize, str(path))
    check_t5_setting(fam, keep, str(path))
    if any(key.startswith("model_ema.") for key in state_dict):
        logger.info("%s: has EMA weights too (model_ema.*); loading the training weights", path)
    _normalise(state_dict, fam, variant)
    dequantise_scaled(
        state_dict,
        _UNET,
        keep.dtype_of("unet"),
        fam.denoiser_label,
        str(path),
        fam.single_file_t5,
    )
    absent = _check_parts(state_dict, fam, variant, path, model_config)

    offline = bool(hub_constants.HF_HUB_OFFLINE) if local_files_only is None else bool(local_files_only)
    explicit = model_config is not None
    if explicit:
        source, offline = _config_source(model_config, offline)
    else:
        source = _default_config(state_dict, fam, variant)
        logger.info("%s: no model_config given; using the configs of %s", path, source)
    hub = {"local_files_only": offline}
    _check_config(path, fam, variant, source, explicit, hub)
    if absent:
        logger.info("%s: has no %s weights; loading them from %s", path, ", ".join(absent), source)

    compute = keep.dtype if keep.dtype is not None else keep.dtype_of("unet")
    in_file = frozenset(state_dict)  # the tensors go part by part below; the checks need only the names
    try:
        unet = getattr(diffusers, fam.denoiser_class).from_single_file(
            state_dict,
            config=source,
            subfolder=fam.denoiser_part,
            torch_dtype=keep.dtype_of("unet"),
            **hub,
        )
        if keep.quantize == "none":
            unet = keep.place(unet, "unet")
        state_dict = _next_part(state_dict, _UNET, path, fam, variant)
        vae = _load_vae(state_dict, source, keep, hub)
        state_dict = _next_part(state_dict, _VAE, path, fam, variant)
        text: dict[str, Any] = {}
        layouts = {layout.part: layout for layout in fam.single_file_text(variant)}
        # CLIP through diffusers' reader; a T5 from the file when it holds one (single_file_t5), else a required
        # one (Flux's) from model_config, an optional one (SD3's) from model_config when that has it
        for spec in (spec for spec in fam.text_encoders if not spec.optional):
            file_t5 = t5_weights(state_dict, fam.single_file_t5) if spec.is_t5 else None
            if file_t5 is not None:
                text.update(load_t5_from_file(file_t5, spec, source, keep, hub, str(path)))
                del file_t5  # its tensors hold the map's pages: the next part reads a fresh one
                state_dict = _next_part(state_dict, fam.single_file_t5, path, fam, variant)
                continue
            layout = layouts.get(spec.part)
            text.update(_load_text_encoder(state_dict, spec, layout, source, keep, hub))
            if layout is not None:
                state_dict = _next_part(state_dict, layout.prefix, path, fam, variant)
        optional_t5 = [spec for spec in fam.text_encoders if spec.optional and spec.is_t5]
        file_t5 = t5_weights(state_dict, fam.single_file_t5) if optional_t5 else None
        if file_t5 is not None and keep.t5 == "drop":
            logger.info("%s: not loading the T5-XXL text encoder in the file (t5 drop)", path)
        elif file_t5 is not None:
            for spec in optional_t5:
                text.update(load_t5_from_file(file_t5, spec, source, keep, hub, str(path)))
        read = frozenset(spec.part for spec in optional_t5) if file_t5 is not None else frozenset()
        text.update(optional_text_parts(source, fam, keep, hub, skip=read))
        scheduler_class = getattr(diffusers, fam.noise_scheduler_class)
        scheduler = scheduler_class.from_pretrained(source, subfolder="scheduler", **hub)
    except ModelError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, IndexError, utils.SingleFileComponentError) as exc:
        if "meta tensor" in str(exc):  # a weight the configs describe stayed unloaded
            raise ModelError(
                f"{path} lacks weights that the component configs of {source} describe: the file is incomplete, "
                f"or the configs are of a bigger model; give a model_config that fits the file "
                f"(for a full {fam.variant_label(variant)} checkpoint e.g. {_example_repos(fam, variant)})"
            ) from exc
        raise ModelError(
            f"could not load {path} with the component configs of {source} ({_brief(exc)}). The configs do "
            "not fit the file (other layer sizes or counts) or are incomplete; give a model_config of the same "
            "model as the file "
            f"({fam.variant_article(variant)} diffusers folder or hub id, e.g. {_example_repos(fam, variant)})"
        ) from exc

    for module in (unet, vae):  # from_single_file's one-device placement record; from_pretrained leaves none
        if len(getattr(module, "hf_device_map", None) or {}) == 1:
            del module.hf_device_map
    scheduler = with_sampling(scheduler, path, in_file, metadata, explicit, source)
    components = SDComponents(unet=unet, vae=vae, noise_scheduler=scheduler, **text)
    check_prediction_type(components, str(path))
    _check_loaded(components, in_file, path, source, fam, variant)
    # QLoRA after the checks, which map the file's keys to the unquantised model's: quantised weight by weight
    # from the file's memory-mapped tensors, never placed unquantised
    if keep.quantize != "none":
        quantized = keep.place(quantize_loaded(components.unet, keep.quantize, compute, keep.device), "unet")
        components = dataclasses.replace(components, unet=quantized)
    return components


def _load_vae(state_dict: Mapping[str, Any], source: str, keep: Keep, hub: dict) -> Any:
    """The VAE from the file's first_stage_model.* weights, or from model_config when the file has none (a
    family whose files may lack it), in the dtype it is kept in."""
    diffusers = require("diffusers")
    dtype = keep.dtype_of("vae", force_upcast=vae_force_upcast(source, hub))
    if _has(state_dict, _VAE):
        vae = diffusers.AutoencoderKL.from_single_file(
            state_dict, config=source, subfolder="vae", torch_dtype=dtype, **hub
        )
    else:
        vae = diffusers.AutoencoderKL.from_pretrained(source, subfolder="vae", torch_dtype=dtype, **hub)
    return keep.place(vae)


def _load_text_encoder(
    state_dict: Mapping[str, Any], spec: Any, layout: Any, source: str, keep: Keep, hub: dict
) -> dict[str, Any]:
    """{encoder part: the encoder, tokenizer part: its tokenizer}: the encoder from the file's weights under
    the layout's prefix (diffusers' CLIP reader), or from model_config when the file has none or the family
    reads it from no file (layout None); the tokenizer always from model_config (files hold none)."""
    transformers = require("transformers")
    utils = require("diffusers.loaders.single_file_utils")
    model_class = getattr(transformers, spec.model_class)
    dtype = keep.dtype_of(spec.part)
    if layout is not None and _has(state_dict, layout.prefix):
        encoder = utils.create_diffusers_clip_model_from_ldm(
            model_class,
            state_dict,
            subfolder=spec.part,
            config=source,
            torch_dtype=dtype,
            local_files_only=hub["local_files_only"],
        )
    else:
        encoder = model_class.from_pretrained(source, subfolder=spec.part, dtype=dtype, **hub)
    tokenizer = getattr(transformers, spec.tokenizer_class).from_pretrained(
        source, subfolder=spec.tokenizer, **hub
    )
    return {spec.part: keep.place(encoder), spec.tokenizer: tokenizer}


def _normalise(state_dict: dict[str, Any], fam: Family, variant: str) -> None:
    """Drop EMA weights (the training weights are loaded); rename keys as the family needs (very old SD1
    files get transformers' text_model. level)."""
    for key in [k for k in state_dict if k.startswith("model_ema.")]:
        del state_dict[key]
    fam.normalise_keys(state_dict, variant)


def _next_part(
    state_dict: dict[str, Any], loaded: str, path: Path, fam: Family, variant: str
) -> dict[str, Any]:
    """The tensors still to load, without the part under `loaded` (a part placed on the GPU frees its host copy
    at once). A safetensors file's rest comes from a fresh memory map: the pages that loading the part read
    stay resident while any tensor of their map lives (a later part kept in the file's dtype is one), so
    the old map goes and takes them along; a part kept as the file holds it keeps its own pages."""
    rest = [key for key in state_dict if not key.startswith(loaded)]
    if not _is_safetensors(path):
        return {key: state_dict[key] for key in rest}
    state_dict.clear()
    fresh, _ = read_state_dict(path)
    _normalise(fresh, fam, variant)
    return {key: fresh[key] for key in rest}


def _brief(exc: BaseException) -> str:
    """A library error in a sentence, without advice that does not apply here (diffusers' mismatch flags)."""
    text = re.sub(r"\s+", " ", str(exc)).split(". If you want")[0].replace("Cannot load because ", "")
    return f"{type(exc).__name__}: {text.strip()[:240]}"


def _check_parts(
    state_dict: Mapping[str, Any],
    fam: Family,
    variant: str,
    path: Path,
    model_config: str | os.PathLike | None,
) -> list[str]:
    """The parts the file lacks (each as "label (prefix*)"), when its family's files may lack them and a
    model_config supplies them; a ModelError when the denoiser is missing, or another part is missing and
    the family needs full files or no model_config was given."""
    parts = {fam.denoiser_label: _UNET, "VAE": _VAE}
    for layout in fam.single_file_text(variant):
        parts[layout.label] = layout.prefix
    missing = [f"{label} ({prefix}*)" for label, prefix in parts.items() if not _has(state_dict, prefix)]
    if not missing:
        return []
    if fam.single_file_partial and _has(state_dict, _UNET):
        if model_config is not None:
            return missing
        raise ModelError(
            f"{path} is {fam.variant_article(variant)} file without {', '.join(missing)} weights, and no "
            f"model_config was given to take them from. Set --model-config (setting model_config; edtools "
            f"convert: --config) to the diffusers folder or hub id of the model the file is of "
            f"(e.g. {_example_repos(fam, variant)}); the parts the file lacks load from it"
        )
    raise ModelError(
        f"{path} is {fam.variant_article(variant)} checkpoint without {', '.join(missing)} weights: it "
        f"holds only part of a model. edtools needs a full checkpoint with {fam.denoiser_label}, VAE and text "
        "encoder weights"
    )


def _default_repo(fam: Family, variant: str) -> str:
    utils = require("diffusers.loaders.single_file_utils")
    paths = utils.DIFFUSERS_DEFAULT_PIPELINE_PATHS
    return paths[fam.diffusers_model_type(variant)]["pretrained_model_name_or_path"]


def _example_repos(fam: Family, variant: str) -> str:
    """The hub ids a message names as model_config: the family's own list, else diffusers' default."""
    return " or ".join(fam.config_repos) if fam.config_repos else _default_repo(fam, variant)


def _default_config(state_dict: Mapping[str, Any], fam: Family, variant: str) -> str:
    """diffusers' default hub repo for the file (fetch_diffusers_config), when that is of the variant the
    keys show; else diffusers' default for that variant (tiny models have widths diffusers does not know)."""
    utils = require("diffusers.loaders.single_file_utils")
    try:
        inferred = utils.fetch_diffusers_config(state_dict)["pretrained_model_name_or_path"]
        model_type = utils.infer_diffusers_model_type(state_dict)
    except Exception:  # noqa: BLE001 - fall back to the variant's default below
        inferred, model_type = None, None
    if inferred and variant_of_model_type(model_type) == variant:
        return inferred
    return _default_repo(fam, variant)


def _config_source(model_config: str | os.PathLike, offline: bool) -> tuple[str, bool]:
    """(source, local_files_only): a local folder is read offline; anything else must look like a hub id."""
    text = str(model_config)
    folder = Path(text).expanduser()
    if folder.is_dir():
        return str(folder), True
    if folder.exists():
        raise ModelError(
            f"model_config {text} is a file; give a diffusers folder or a hub id like owner/name"
        )
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", text) or text.startswith((".", "~")):
        raise ModelError(
            f"model_config '{text}' is neither an existing folder nor a hub id like 'owner/name'; check the path"
        )
    return text, offline


def _check_config(path: Path, fam: Family, variant: str, source: str, explicit: bool, hub: dict) -> None:
    """The config folder's denoiser and text encoder configs exist and are of the file's variant."""
    diffusers = require("diffusers")
    transformers = require("transformers")
    denoiser = fam.denoiser_part
    try:
        unet_config = getattr(diffusers, fam.denoiser_class).load_config(source, subfolder=denoiser, **hub)
        text_config = transformers.CLIPTextConfig.from_pretrained(source, subfolder="text_encoder", **hub)
    except (OSError, ValueError) as exc:
        where = "is offline, and they are not in the Hugging Face cache" if hub["local_files_only"] else ""
        reason = f"the hub {where}" if where else f"they could not be read ({str(exc)[:200]})"
        if Path(source).is_dir():
            raise ModelError(
                f"model_config folder {source} lacks {denoiser}/config.json or text_encoder/config.json, so it is "
                f"not {fam.variant_article(variant)} diffusers model folder; give {fam.variant_article(variant)} "
                f"diffusers folder or hub id (e.g. {_example_repos(fam, variant)})"
            ) from exc
        if explicit:
            raise ModelError(
                f"cannot read the component configs of model_config {source} for {path}: {reason}. Run once "
                "with the network on (only the small config and tokenizer files are downloaded), or give a "
                f"local {fam.variant_label(variant)} diffusers folder as model_config"
            ) from exc
        raise ModelError(
            f"{path} is {fam.variant_article(variant)} single file; loading it needs the component configs (config and "
            f"tokenizer files, no weights) of a diffusers model of the same architecture. No model_config was "
            f"given, so edtools uses {source} (diffusers' default for such files), but {reason}. Pass "
            f"--model-config {source} (setting model_config: {source}; edtools convert: --config {source}) with "
            "the network on once (only the config files are downloaded), or --model-config <a local "
            f"{fam.variant_label(variant)} diffusers folder>"
        ) from exc
    config_variant = fam.variant_of_configs(unet_config, text_config) or variant_of_configs(
        unet_config, text_config
    )
    if config_variant != variant:
        config_a = (
            "an unknown" if config_variant is None else family(config_variant).variant_article(config_variant)
        )
        raise ModelError(
            f"model_config {source} is {config_a} model, but {path} is "
            f"{fam.variant_article(variant)} checkpoint; give a model_config of the same architecture as the file "
            f"(e.g. {_example_repos(fam, variant)} or a local {fam.variant_label(variant)} diffusers folder)"
        )


def _check_loaded(
    components: SDComponents, keys: Collection[str], path: Path, source: str, fam: Family, variant: str
) -> None:
    """Every weight the configs describe came from the file (none left uninitialised) or, for a part the file
    lacks, from model_config; report file weights that went unused (a config smaller than the file)."""
    for name in ("unet", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(components, name)
        if module is not None and any(t.is_meta for t in (*module.parameters(), *module.buffers())):
            raise ModelError(
                f"{path} lacks weights that the {name} config of {source} describes; give a model_config "
                "that fits the file"
            )
    parts = (_UNET, _VAE) + tuple(layout.prefix for layout in fam.single_file_text(variant))
    in_file = {key for key in keys if key.startswith(_PREFIXES + parts)}
    from_file = tuple(prefix for prefix in parts if _has(in_file, prefix))
    required, synthetic = original_keys(components)
    missing = sorted(key for key in required - in_file if key.startswith(from_file))
    if missing:
        raise ModelError(
            f"{path} lacks {len(missing)} weights that the configs of {source} describe (e.g. "
            f"{', '.join(missing[:3])}); give a model_config that fits the file"
        )
    unused = sorted(in_file - required - synthetic)
    if unused:
        logger.warning(
            "%s: %d weights in the file are not used by the model the configs of %s describe (e.g. %s)",
            path,
            len(unused),
            source,
            ", ".join(unused[:3]),
        )
