"""Setting values checked against their type annotation: what a TrainConfig field accepts from a file or widget.

No silent conversions beyond int -> float and list -> tuple; a wrong value is a ConfigError naming the field.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Mapping
from typing import Any, Literal

from .errors import ConfigError

__all__ = ["PAIR_FIELDS", "coerce", "split_optional"]


PAIR_FIELDS = ("multipliers", "loss_scales", "caption_dropouts", "concept_prompts")


def split_optional(hint: Any) -> tuple[bool, Any]:
    """(True, X) for `X | None`, else (False, hint)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            return True, args[0]
    return False, hint


def describe(value: Any) -> str:
    return f"{value!r} ({type(value).__name__})"


def coerce(name: str, value: Any, hint: Any) -> Any:
    optional, hint = split_optional(hint)
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{name} is None; it needs a value")
    origin = typing.get_origin(hint)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} is {describe(value)}; it must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} is {describe(value)}; it must be a whole number")
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{name} is {describe(value)}; it must be a number")
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(f"{name} is {value}; it must be a finite number")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} is {describe(value)}; it must be text")
        return value
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ConfigError(f"{name} is {value!r}; allowed: {', '.join(choices)}")
        return value
    if name == "concept_prompts":
        return _coerce_prompts(name, value)
    if name in PAIR_FIELDS:
        return _coerce_pairs(name, value)
    if origin is tuple and typing.get_args(hint) == (float, float):  # a pair of numbers: (low, high)
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple) or len(value) != 2:
            raise ConfigError(f"{name} is {describe(value)}; it must be two numbers, e.g. [0.25, 4]")
        return tuple(coerce(name, v, float) for v in value)
    if origin is tuple:  # tuple[str, ...]
        if isinstance(value, str | bytes) or not isinstance(value, list | tuple):
            raise ConfigError(f"{name} is {describe(value)}; it must be a list of text")
        bad = [v for v in value if not isinstance(v, str) or not v.strip()]
        if bad:
            raise ConfigError(f"{name} holds {bad!r}; every entry must be non-empty text")
        return tuple(value)
    raise TypeError(f"TrainConfig field {name} has an unsupported type {hint}")  # a bug in this module


def _coerce_pairs(name: str, value: Any) -> tuple[tuple[str, float], ...]:
    """{concept: number} (or a list of pairs) as a sorted tuple of (concept, float) pairs: hashable."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise ConfigError(
            f"{name} is {describe(value)}; it must map concept folder to a number, e.g. {{'a': 2}}"
        )
    out = {}
    for concept, number in items:
        if not isinstance(concept, str) or not concept:
            raise ConfigError(
                f"{name} has concept {concept!r}; concepts are folder paths relative to data_root"
            )
        if isinstance(number, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ConfigError(f"{name}['{concept}'] is {describe(number)}; it must be a finite number")
        if concept in out:
            raise ConfigError(f"{name} gives concept '{concept}' twice")
        out[concept] = float(number)
    return tuple(sorted(out.items()))


def _coerce_prompts(name: str, value: Any) -> tuple[tuple[str, str], ...]:
    """{concept: prompt} (or a list of pairs) as a sorted tuple of (concept, prompt) pairs: hashable."""
    if isinstance(value, Mapping):
        items = list(value.items())
    elif isinstance(value, list | tuple) and all(isinstance(p, list | tuple) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise ConfigError(
            f"{name} is {describe(value)}; it must map concept folder to a prompt, e.g. {{'a': 'a photo of a'}}"
        )
    out = {}
    for concept, prompt in items:
        if not isinstance(concept, str) or not concept:
            raise ConfigError(
                f"{name} has concept {concept!r}; concepts are folder paths relative to data_root"
            )
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{name}['{concept}'] is {describe(prompt)}; it must be non-empty text")
        if concept in out:
            raise ConfigError(f"{name} gives concept '{concept}' twice")
        out[concept] = prompt
    return tuple(sorted(out.items()))
