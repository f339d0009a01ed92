"""Model families: one module per family (sd: SD 1.x/2.x, sdxl, sd3: SD3/3.5, flux: Flux.1), each a Family (base.py).

The rest of edtools asks `family(name)` or `family_of(components)` instead of testing architecture names.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from .base import Family, Parts, TextEmbeddings
from .flux import Flux
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

__all__ = [
    "FAMILIES",
    "Family",
    "TextEmbeddings",
    "detect_variant",
    "family",
    "family_names",
    "family_of",
    "family_of_index",
    "guess_architecture",
    "guess_family",
    "variant_of_configs",
    "variant_of_model_type",
    "variants",
]

# The registered families, in the order they are tried; adding a family is adding its module and one entry.
FAMILIES: tuple[Family, ...] = (StableDiffusion(), StableDiffusionXL(), StableDiffusion3(), Flux())


def family_names() -> tuple[str, ...]:
    """The registered families' names ("sd", "sdxl")."""
    return tuple(f.name for f in FAMILIES)


def variants() -> tuple[str, ...]:
    """Every registered variant ("sd1", "sd2", "sdxl")."""
    return tuple(v for f in FAMILIES for v in f.variants)


def family(name: str) -> Family:
    """The family named `name`, or the one that has the variant `name` ("sd2" -> the sd family)."""
    for candidate in FAMILIES:
        if name == candidate.name or name in candidate.variants:
            return candidate
    raise ValueError(
        f"model family or variant is '{name}'; allowed: {', '.join(family_names() + variants())}"
    )


def family_of(parts: Parts) -> Family:
    """The family of loaded parts (models.components.SDComponents)."""
    for candidate in FAMILIES:
        if candidate.matches_parts(parts):
            return candidate
    raise ValueError("these model parts belong to no registered model family")


def family_of_index(index: Mapping[str, Any], model: str) -> Family | None:
    """The family of a diffusers model_index.json of a UNet2DConditionModel pipeline (a family may refuse it
    with a ModelError), or None."""
    for candidate in FAMILIES:
        if candidate.matches_index(index, model):
            return candidate
    return None


def detect_variant(keys: Collection[str]) -> str | None:
    """The variant of an original-layout checkpoint from its key names, or None when no family claims it."""
    for candidate in FAMILIES:
        variant = candidate.detect_keys(keys)
        if variant is not None:
            return variant
    return None


def variant_of_configs(unet_config: Mapping[str, Any], text_config: Any) -> str | None:
    """The variant that a diffusers folder's UNet and first text encoder configs describe, or None."""
    for candidate in FAMILIES:
        variant = candidate.variant_of_configs(unet_config, text_config)
        if variant is not None:
            return variant
    return None


def variant_of_model_type(model_type: str | None) -> str | None:
    """The variant of diffusers' single-file model type ("v1", "xl_base", ...), or None."""
    for candidate in FAMILIES:
        for variant in candidate.variants:
            if model_type in candidate.diffusers_model_types(variant):
                return variant
    return None


def guess_architecture(model: str) -> str | None:
    """The family name ("sd", "sdxl") of a model's files without loading weights (a folder's
    model_index.json, a .safetensors file's tensor names), or None when that cannot tell (hub ids, .ckpt
    files, broken files)."""
    path = Path(model).expanduser()
    try:
        if path.is_dir():
            index = json.loads((path / "model_index.json").read_text(encoding="utf-8"))
            found = [f.name for f in FAMILIES if _index_is(f, index, model)]
            return found[0] if found else None
        if path.is_file() and path.suffix.lower() == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as file:
                keys = list(file.keys())
            found = [f.name for f in FAMILIES if f.guess_keys(keys)]
            return found[0] if found else None
    except (OSError, ValueError, ImportError):
        return None
    return None


def _index_is(candidate: Family, index: Mapping[str, Any], model: str) -> bool:
    try:
        return candidate.matches_index(index, model)
    except ValueError:  # a refused model of this family (ModelError) still tells the family
        return True


def guess_family(model: str) -> Family:
    """The family of a model from its files (guess_architecture), else from words in its name ("xl" in a hub
    id), else the first registered family."""
    name = guess_architecture(model)
    if name is not None:
        return family(name)
    for candidate in FAMILIES:
        if any(hint in model.lower() for hint in candidate.name_hints):
            return candidate
    return FAMILIES[0]
