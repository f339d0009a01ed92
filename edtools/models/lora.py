"""LoRA adapters (peft) on the UNet and text encoders, saved as kohya/A1111/ComfyUI .safetensors files.

Only the adapters train and are written; the base model's weights stay as they were loaded.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import atomic_file
from ..errors import ModelError, require
from .components import SDComponents
from .families import family_of
from .families.base import TEXT_ENCODER_TARGETS, UNET_TARGETS

if TYPE_CHECKING:
    import torch

__all__ = [
    "ADAPTER_NAME",
    "LORA_DTYPES",
    "TEXT_ENCODER_TARGETS",
    "UNET_TARGETS",
    "add_lora",
    "base_model_version",
    "has_lora",
    "kohya_state_dict",
    "load_lora_state_dict",
    "lora_disabled",
    "lora_parameters",
    "lora_state_dict",
    "read_lora_file",
    "remove_lora",
    "save_lora_file",
]

ADAPTER_NAME = "edtools"

# Target modules (UNET_TARGETS, TEXT_ENCODER_TARGETS, kohya's networks.lora set) and their names in files are
# each model family's: see models/families/base.py for why these modules.

# Save dtypes by name (kohya's --save_precision spellings and torch's).
LORA_DTYPES = ("fp16", "bf16", "fp32")
_DTYPE_ALIASES = {"fp16": "float16", "float16": "float16", "half": "float16", "bf16": "bfloat16"}
_DTYPE_ALIASES |= {"bfloat16": "bfloat16", "fp32": "float32", "float32": "float32", "float": "float32"}

# Metadata that describes the tensors themselves; a caller may not override it.
_STRUCTURAL_METADATA = (
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_base_model_version",
    "ss_v2",
    "modelspec.sai_model_spec",
    "modelspec.architecture",
)


# ---------------------------------------------------------------------------------------------------------
# Which modules carry the adapter


def _adapted_modules(components: SDComponents) -> list[tuple[str, Any]]:
    """(component name, module) for unet, text_encoder, text_encoder_2 that carry our adapter, in that order."""
    found = []
    for name in ("unet", "text_encoder", "text_encoder_2"):
        module = getattr(components, name)
        if module is not None and ADAPTER_NAME in (getattr(module, "peft_config", None) or {}):
            found.append((name, module))
    return found


def _canonical_name(component: str, name: str) -> str:
    """A module path as the original models spell it: text encoders with their text_model. prefix."""
    if component.startswith("text_encoder") and not name.startswith("text_model."):
        return f"text_model.{name}"
    return name


def _lora_layers(component: str, module: Any) -> list[tuple[str, Any]]:
    """(canonical module path, peft LoRA layer) holding our adapter, in module order."""
    peft_tuners = require("peft.tuners.tuners_utils", feature="LoRA training")
    layers = []
    for name, layer in module.named_modules():
        if isinstance(layer, peft_tuners.BaseTunerLayer) and ADAPTER_NAME in getattr(layer, "lora_A", {}):
            layers.append((_canonical_name(component, name), layer))
    return layers


def _named_lora_parameters(components: SDComponents) -> list[tuple[str, torch.nn.Parameter]]:
    """("<component>.<canonical module path>.lora_A.weight" / ".lora_B.weight", parameter) in the fixed order:
    UNet, text_encoder, text_encoder_2; modules in model order; lora_A before lora_B."""
    named = []
    for component, module in _adapted_modules(components):
        for path, layer in _lora_layers(component, module):
            for part in ("lora_A", "lora_B"):
                named.append((f"{component}.{path}.{part}.weight", getattr(layer, part)[ADAPTER_NAME].weight))
    return named


def _config(components: SDComponents) -> Any:
    """Our adapter's peft LoraConfig (the same for every adapted module)."""
    adapted = _adapted_modules(components)
    if not adapted:
        raise ModelError(
            "these model components have no LoRA adapter; call add_lora(components, rank=...) first"
        )
    return adapted[0][1].peft_config[ADAPTER_NAME]


def has_lora(components: SDComponents) -> bool:
    """Whether add_lora has put an adapter on these components (and remove_lora has not taken it off)."""
    return bool(_adapted_modules(components))


# ---------------------------------------------------------------------------------------------------------
# Adding, listing, disabling and removing the adapter


def _check_settings(rank: Any, alpha: Any, dropout: Any, seed: Any) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank (the LoRA dim) must be an integer >= 1, got {rank!r}")
    if alpha is not None and (
        isinstance(alpha, bool)
        or not isinstance(alpha, (int, float))
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise ValueError(f"alpha must be a number > 0 (or None for alpha = rank), got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise ValueError(f"dropout must be a number in [0, 1) (0 = no dropout), got {dropout!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")


def add_lora(
    components: SDComponents,
    *,
    rank: int,
    alpha: float | None = None,
    dropout: float = 0.0,
    text_encoders: bool = False,
    seed: int = 0,
) -> list[torch.nn.Parameter]:
    """Freeze every base weight (UNet, text encoders, VAE) and add one peft LoRA adapter (ADAPTER_NAME) to the
    UNet (UNET_TARGETS) and, with text_encoders=True, to the text encoder(s) (both for SDXL; TEXT_ENCODER_TARGETS).

    rank: the LoRA dim (>= 1); alpha: scale numerator, the update is (alpha / rank) * B @ A (None = rank, i.e.
    scale 1); dropout: peft's dropout on the adapter input, in [0, 1). Initialisation like peft's and kohya's:
    A (down) kaiming-uniform, drawn from a generator seeded with `seed` (torch's global RNG is left as it was),
    B (up) zero, so the adapted model starts out equal to the base model.

    Returns the trainable LoRA parameters in a fixed order (see lora_parameters): UNet, then text_encoder, then
    text_encoder_2; within each, modules in model order, lora_A (down) before lora_B (up).
    """
    torch = require("torch")
    peft = require("peft", feature="LoRA training")
    _check_settings(rank, alpha, dropout, seed)
    if has_lora(components):
        raise ModelError(
            "these model components already have a LoRA adapter; call remove_lora(components) before adding another"
        )
    alpha = float(rank if alpha is None else alpha)
    for module in (components.unet, components.vae, *components.text_encoders):
        module.requires_grad_(False)
    family = family_of(components)
    targets = [("unet", components.unet, family.unet_lora_pattern)]
    if text_encoders:
        targets += [
            (name, getattr(components, name), family.text_encoder_lora_pattern)
            for name in family.trainable_text_encoders  # never Flux's T5
            if getattr(components, name) is not None
        ]
    cuda = sorted(
        {p.device.index or 0 for _, m, _ in targets for p in m.parameters() if p.device.type == "cuda"}
    )
    # peft initialises new layers from torch's global generator: let it draw from a forked copy, then set the
    # weights from our own seeded generator so the result depends on `seed` alone.
    with torch.random.fork_rng(devices=cuda), _undo_on_failure(components):
        for name, module, pattern in targets:
            config = peft.LoraConfig(
                r=rank,
                lora_alpha=alpha,
                lora_dropout=float(dropout),
                target_modules=pattern,
                init_lora_weights=True,
                bias="none",
            )
            # peft directly (not the diffusers/transformers add_adapter mixins, whose peft version floors differ)
            try:
                peft.inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
            except ValueError as exc:  # peft: no module matched the target pattern
                raise ModelError(
                    f"cannot add LoRA to the {name}: {exc}. edtools' LoRA targets Stable Diffusion's "
                    "attention blocks and CLIP text encoder layers"
                ) from exc
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in _named_lora_parameters(components):
            if name.endswith(".lora_A.weight"):
                fan_in = parameter[0].numel()  # in_features (x kernel area for a conv)
                bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)), as torch.nn.Linear and peft
                values = torch.rand(parameter.shape, generator=generator, dtype=torch.float64)
                parameter.copy_((values * 2 - 1) * bound)
            else:
                parameter.zero_()
    parameters = lora_parameters(components)
    for parameter in parameters:
        parameter.requires_grad_(True)
    return parameters


@contextlib.contextmanager
def _undo_on_failure(components: SDComponents) -> Iterator[None]:
    """Take off whatever adapters were added when adding the others fails (no half-adapted model)."""
    try:
        yield
    except BaseException:
        remove_lora(components)
        raise


def lora_parameters(components: SDComponents) -> list[torch.nn.Parameter]:
    """The LoRA parameters in add_lora's fixed order (UNet, text_encoder, text_encoder_2; modules in model
    order; lora_A before lora_B); empty without an adapter."""
    return [parameter for _, parameter in _named_lora_parameters(components)]


@contextlib.contextmanager
def lora_disabled(components: SDComponents) -> Iterator[None]:
    """Run the base model inside the block (e.g. to sample it for comparison); the adapter, its weights and
    their requires_grad flags are back as they were afterwards."""
    layers = [
        layer
        for component, module in _adapted_modules(components)
        for _, layer in _lora_layers(component, module)
    ]
    flags = [(p, p.requires_grad) for p in lora_parameters(components)]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)
        for parameter, flag in flags:
            parameter.requires_grad_(flag)


def remove_lora(components: SDComponents, *, merge: bool = False) -> None:
    """Take the adapter off: the modules are the plain base modules again (so save_components writes a normal
    model). merge=True first adds the adapter's update into the base weights (a full fine-tuned model);
    merge=False leaves the base weights exactly as they were loaded."""
    peft_utils = require("diffusers.utils.peft_utils", feature="LoRA training")
    for component, module in _adapted_modules(components):
        if merge:
            for _, layer in _lora_layers(component, module):
                layer.merge(safe_merge=True, adapter_names=[ADAPTER_NAME])
        peft_utils.recurse_remove_peft_layers(module)
        del module.peft_config[ADAPTER_NAME]
        if not module.peft_config:
            del module.peft_config


# ---------------------------------------------------------------------------------------------------------
# Checkpoint state (resume) and the kohya file


def lora_state_dict(components: SDComponents) -> dict[str, torch.Tensor]:
    """The adapter weights for a training checkpoint: fp32 CPU copies keyed
    "<unet|text_encoder|text_encoder_2>.<module path>.lora_A.weight" / ".lora_B.weight" (text encoder paths
    always with their text_model. prefix, so a checkpoint resumes under any transformers version)."""
    torch = require("torch")
    _config(components)
    return {
        name: parameter.detach().to("cpu", torch.float32, copy=True)
        for name, parameter in _named_lora_parameters(components)
    }


def load_lora_state_dict(components: SDComponents, state: Mapping[str, torch.Tensor]) -> None:
    """Put lora_state_dict's weights back into the adapter that add_lora made (resume). The keys and shapes must
    match exactly, else ModelError: the checkpoint was made with another rank or other targets."""
    torch = require("torch")
    config = _config(components)
    named = dict(_named_lora_parameters(components))
    missing = sorted(set(named) - set(state))
    unexpected = sorted(set(state) - set(named))
    if missing or unexpected:
        details = []
        if missing:
            details.append(f"{len(missing)} adapter weights missing from it (e.g. {missing[0]})")
        if unexpected:
            details.append(f"{len(unexpected)} it has that this adapter lacks (e.g. {unexpected[0]})")
        raise ModelError(
            "the LoRA checkpoint does not fit this adapter: its targets differ (text encoders trained or not, "
            f"another model): {'; '.join(details)}. Resume with the LoRA settings it was trained with"
        )
    for name, parameter in named.items():
        value = state[name]
        if not isinstance(value, torch.Tensor) or tuple(value.shape) != tuple(parameter.shape):
            shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ModelError(
                f"the LoRA checkpoint's {name} has shape {shape}, this adapter's is {tuple(parameter.shape)}: "
                f"its rank or model differs (this adapter has rank {config.r}). Resume with the LoRA rank it "
                "was trained with"
            )
    with torch.no_grad():
        for name, parameter in named.items():
            parameter.copy_(state[name])


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    torch = require("torch")
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    else:
        name = _DTYPE_ALIASES.get(str(dtype).lower(), "")
    if name not in ("float16", "bfloat16", "float32"):
        raise ValueError(f"dtype must be one of {', '.join(LORA_DTYPES)} (or the torch dtype), got {dtype!r}")
    return getattr(torch, name)


def kohya_state_dict(
    components: SDComponents, *, dtype: str | torch.dtype = "fp16"
) -> dict[str, torch.Tensor]:
    """The adapter in kohya-ss / A1111 / ComfyUI format: for each adapted module "<name>.lora_down.weight"
    ([rank, in] or [rank, in, 1, 1] for a 1x1 conv), "<name>.lora_up.weight" ([out, rank] / [out, rank, 1, 1])
    in `dtype`, and "<name>.alpha" (a float32 scalar: loaders read it with .item(), and fp32 keeps any alpha
    exact). <name> is, exactly as kohya writes it: "lora_unet_" + the UNet module path with "_" for ".", the
    diffusers path for SD 1.x/2.x ("down_blocks_1_attentions_0_...") and the original SGM path for SDXL
    ("input_blocks_4_1_...": kohya's SDXL scripts resume and merge only that spelling; A1111, ComfyUI and
    diffusers read both); text encoders "lora_te_" (SD 1.x/2.x) or "lora_te1_" / "lora_te2_" (SDXL) +
    "text_model_encoder_layers_N_..."."""
    torch = require("torch")
    state_dict_utils = require("diffusers.utils.state_dict_utils", feature="LoRA export")
    config = _config(components)
    dtype = _torch_dtype(dtype)
    # diffusers' PEFT -> kohya renaming: "unet."/"text_encoder."/"text_encoder_2." prefixes become
    # lora_unet/lora_te1/lora_te2, "." -> "_" in the module path, lora_A/lora_B -> lora_down/lora_up.
    peft_named = {
        name: parameter.detach().to("cpu", dtype) for name, parameter in _named_lora_parameters(components)
    }
    family = family_of(components)
    renamed = {}
    for name, value in peft_named.items():
        if name.startswith("unet."):  # unet.<module path>.lora_A.weight
            module, part, weight = name.removeprefix("unet.").rsplit(".", 2)
            name = f"unet.{family.kohya_unet_module(components.unet.config, module)}.{part}.{weight}"
        renamed[name] = value
    converted = state_dict_utils.convert_state_dict_to_kohya(renamed)
    alpha = torch.tensor(float(config.lora_alpha), dtype=torch.float32)
    result = {}
    for key, value in converted.items():
        for old, new in family.kohya_renames.items():  # e.g. one "lora_te" in SD 1.x/2.x files
            if key.startswith(old):
                key = new + key.removeprefix(old)
        if key.endswith(".alpha"):
            value = alpha.clone()  # diffusers writes alpha = rank; ours is config.lora_alpha
        result[key] = value.contiguous()
    return result


def base_model_version(components: SDComponents) -> str:
    """kohya's ss_base_model_version: "sdxl_base_v1-0", or "sd_v1" / "sd_v2" (+ "_v" for v-prediction), as
    the model's family names it."""
    return family_of(components).lora_metadata(components)["ss_base_model_version"]


# ModelSpec's modelspec.prediction_type of each prediction type (flow matching: "flow")
_PREDICTION_NAMES = {"epsilon": "epsilon", "v_prediction": "v", "flow_matching": "flow"}


def _number(value: float) -> str:
    return str(float(value))  # as kohya writes its float settings: "4.0", "0.1"


def _metadata(components: SDComponents, title: str, extra: Mapping[str, str] | None) -> dict[str, str]:
    config = _config(components)
    family = family_of(components)
    side = family.native_resolution(components)
    trained = [name for name, _ in _adapted_modules(components)]
    named = family.lora_metadata(components)
    metadata = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(config.r),
        "ss_network_alpha": _number(config.lora_alpha),
        "ss_network_dropout": _number(config.lora_dropout),
        "ss_base_model_version": named["ss_base_model_version"],
        "ss_v2": named["ss_v2"],
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": named["modelspec.architecture"],
        "modelspec.implementation": named["modelspec.implementation"],
        "modelspec.title": title,
        "modelspec.resolution": f"{side}x{side}",
        "modelspec.prediction_type": _PREDICTION_NAMES.get(components.prediction_type, "epsilon"),
        "edtools_lora_targets": json.dumps(
            {
                name: list(family.unet_lora_targets if name == "unet" else family.text_encoder_lora_targets)
                for name in trained
            }
        ),
    }
    if family.lora_file_format == "diffusers":
        # the file holds alpha / rank folded into lora_B (see Family.lora_file_tensors): its alpha is its rank
        metadata["ss_network_alpha"] = _number(config.r)
        metadata["edtools_lora_alpha"] = _number(config.lora_alpha)
    for key, value in (extra or {}).items():
        if not isinstance(key, str):
            raise ValueError(f"LoRA file metadata keys must be strings, got {key!r}")
        if not isinstance(value, str):
            raise ValueError(
                f"LoRA file metadata must map strings to strings (safetensors stores only text); "
                f"{key!r} is {type(value).__name__}: pass str(value) or json.dumps(value)"
            )
        if key in _STRUCTURAL_METADATA and value != metadata[key]:
            raise ValueError(
                f"metadata {key!r} describes the saved weights and is set from the adapter "
                f"({metadata[key]!r}); leave it out of the metadata you pass"
            )
        metadata[key] = value
    return metadata


def save_lora_file(
    components: SDComponents,
    path: str | os.PathLike,
    *,
    dtype: str | torch.dtype = "fp16",
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write the adapter as a kohya-format LoRA .safetensors (see kohya_state_dict) that A1111, ComfyUI,
    diffusers' load_lora_weights and kohya's scripts read; for a family whose lora_file_format is "diffusers"
    (SD3), diffusers' peft keys with alpha / rank folded into lora_B (Family.lora_file_tensors), which its
    pipeline's load_lora_weights reads. dtype: "fp16" (default), "bf16", "fp32".

    Metadata: kohya's ss_network_module "networks.lora", ss_network_dim, ss_network_alpha, ss_network_dropout,
    ss_base_model_version ("sd_v1", "sd_v2", "sdxl_base_v1-0", ...), ss_v2, and ModelSpec modelspec.*
    (architecture e.g. "stable-diffusion-v1/lora", title = the file's stem, resolution, prediction type), plus
    `metadata` (strings only; it may override the title and add anything, not the keys describing the weights).

    Atomic: written to a temp file in the same folder and renamed over `path`, so `path` is either the old
    complete file or the new one; nothing is left behind on failure. Returns the resolved path.
    """
    safetensors_torch = require("safetensors.torch", feature="LoRA export")
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise ValueError(f"LoRA file path {out} is a folder; give a file name ending in .safetensors")
    info = _metadata(components, out.stem, metadata)
    family = family_of(components)
    if family.lora_file_format == "diffusers":
        config = _config(components)
        named = {
            name: p.detach().to("cpu", _torch_dtype(dtype)) for name, p in _named_lora_parameters(components)
        }
        tensors = family.lora_file_tensors(named, config.r, config.lora_alpha)
    else:
        tensors = kohya_state_dict(components, dtype=dtype)
    data = safetensors_torch.save(tensors, metadata=info)  # a LoRA is small: serialise in memory
    with atomic_file(out) as tmp:
        tmp.write_bytes(data)
    return out


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a LoRA .safetensors file, on CPU; ModelError if it is missing or not one."""
    safetensors_torch = require("safetensors.torch", feature="LoRA files")
    file = Path(path).expanduser()
    if not file.is_file():
        raise ModelError(f"LoRA file {file} does not exist")
    try:
        with safetensors_torch.safe_open(str(file), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError, OSError, ValueError
        raise ModelError(f"could not read LoRA file {file}: {exc}; is it a .safetensors file?") from exc
    return tensors, metadata
