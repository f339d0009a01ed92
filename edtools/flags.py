"""Command-line flags for TrainConfig: one --flag per field, generated from its type and help line.

from_args puts the flags given over a --config file's values; settings_table is the README's list of them.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, Literal

from .coerce import PAIR_FIELDS, split_optional
from .config import ConfigError, TrainConfig, field_types

__all__ = ["add_arguments", "from_args", "settings_table", "to_args"]


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _optional_type(inner: Any, name: str) -> Any:
    def parse(text: str) -> Any:
        if text.strip().lower() in ("none", "null", ""):
            return None
        return inner(text)

    parse.__name__ = name  # argparse names the type in its error message
    return parse


def _pair(text: str) -> tuple[str, float]:
    concept, sep, number = text.rpartition("=")
    if not sep or not concept:
        raise argparse.ArgumentTypeError(f"'{text}' is not concept=value, e.g. people/alice=2")
    try:
        return concept, float(number)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{number}' in '{text}' is not a number") from None


def _prompt_pair(text: str) -> tuple[str, str]:
    concept, sep, prompt = text.partition("=")  # the first '=': a prompt may hold one, a folder rarely does
    if not sep or not concept or not prompt.strip():
        raise argparse.ArgumentTypeError(
            f"'{text}' is not concept=prompt, e.g. people/alice='a photo of alice'"
        )
    return concept, prompt


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add --data-root, --epochs, ... (one per TrainConfig field). Defaults are left out on purpose, so
    from_args can tell the options given on the command line from those that a --config file sets."""
    hints = field_types()
    group = parser.add_argument_group("training settings (also accepted in a --config YAML/JSON file)")
    for f in dataclasses.fields(TrainConfig):
        optional, hint = split_optional(hints[f.name])
        default = "" if f.default is dataclasses.MISSING else f" (default {_show_default(f.default)})"
        kwargs: dict[str, Any] = {
            "dest": f.name,
            "default": argparse.SUPPRESS,
            "help": f.metadata["help"] + default,
        }
        if hint is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(hint) is Literal:
            kwargs["choices"] = typing.get_args(hint)
        elif f.name == "concept_prompts":
            kwargs.update(nargs="*", type=_prompt_pair, metavar="CONCEPT=PROMPT")
        elif f.name in PAIR_FIELDS:
            kwargs.update(nargs="*", type=_pair, metavar="CONCEPT=VALUE")
        elif typing.get_origin(hint) is tuple and typing.get_args(hint) == (float, float):
            kwargs.update(nargs=2, type=float, metavar=("LOW", "HIGH"))
        elif typing.get_origin(hint) is tuple:
            kwargs.update(nargs="*", metavar="TEXT")
        else:
            kwargs["type"] = _optional_type(hint, hint.__name__) if optional else hint
        group.add_argument(_flag(f.name), **kwargs)
    return parser


def _show_default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, tuple):
        return "empty" if not value else " ".join(map(str, value))
    return str(value)


def settings_table() -> str:
    """Every setting as a Markdown table (flag, YAML key, default, meaning): the README's list, generated."""
    rows = ["| flag | default | meaning |", "|---|---|---|"]
    for f in dataclasses.fields(TrainConfig):
        default = "required" if f.default is dataclasses.MISSING else _show_default(f.default)
        help_text = f.metadata["help"].replace("|", "\\|")
        rows.append(f"| `{_flag(f.name)}` | {default} | {help_text} |")
    return "\n".join(rows)


def from_args(
    namespace: argparse.Namespace, base: TrainConfig | Mapping[str, Any] | None = None
) -> TrainConfig:
    """The config from parsed options over `base` (a TrainConfig, or the values of a --config file, which
    may leave out settings the options give); options not given keep base's values (or the defaults).
    Other attributes of the namespace are ignored."""
    given = {
        f.name: getattr(namespace, f.name)
        for f in dataclasses.fields(TrainConfig)
        if hasattr(namespace, f.name)
    }
    values = base.to_dict() if isinstance(base, TrainConfig) else dict(base or {})
    values.update(given)
    missing = [
        f.name
        for f in dataclasses.fields(TrainConfig)
        if f.default is dataclasses.MISSING and f.name not in values
    ]
    if missing:
        raise ConfigError(
            f"missing required setting(s): {', '.join(_flag(m) for m in missing)} "
            "(give them as options or in --config)"
        )
    return TrainConfig.from_dict(values)


def to_args(config: TrainConfig) -> list[str]:
    """Command line options that give config back through add_arguments / from_args."""
    args: list[str] = []
    for f in dataclasses.fields(config):
        flag = _flag(f.name)
        value = getattr(config, f.name)
        if isinstance(value, bool):
            args.append(flag if value else "--no-" + flag[2:])
        elif value is None and (
            split_optional(field_types()[f.name])[1] is bool
            or typing.get_origin(split_optional(field_types()[f.name])[1]) is Literal
        ):
            continue  # none is these options' default: leaving the flag out gives it
        elif value is None:
            args += [flag, "none"]
        elif f.name in PAIR_FIELDS:
            args += [flag, *(f"{k}={v if isinstance(v, str) else repr(v)}" for k, v in value)]
        elif isinstance(value, tuple):
            args += [flag, *(repr(v) if isinstance(v, float) else v for v in value)]
        else:
            args += [flag, repr(value) if isinstance(value, float) else str(value)]
    return args
