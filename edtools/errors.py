"""Expected failures: one base class whose message is for a person, and imports of optional dependencies.

The CLI prints an EdtoolsError's message alone and exits 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["EdtoolsError", "MissingDependency", "ModelError", "require"]

# pyproject extras; an error names the one to install.
_EXTRA_OF = {
    "torch": "train",
    "diffusers": "train",
    "transformers": "train",
    "accelerate": "train",
    "safetensors": "train",
    "peft": "train",
    "bitsandbytes": "train",
    "ipywidgets": "notebook",
}


class EdtoolsError(Exception):
    """A failure the user can fix (bad data, setting, model file, path); the message says what and how."""


class ModelError(EdtoolsError, ValueError):
    """A model folder, single file or hub id that cannot be used: missing, damaged, of another kind."""


class MissingDependency(EdtoolsError, ImportError):
    """An optional package that this feature needs is not installed."""


def require(module: str, *, feature: str = "edtools training") -> ModuleType:
    """Import a heavy optional dependency on first use, or say which package (and extra) to install."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        extra = _EXTRA_OF.get(package, "train")
        raise MissingDependency(
            f"{feature} needs {package}: pip install '{package}' "
            f"(or install edtools with its [{extra}] extra: pip install 'edtools[{extra}]')"
        ) from exc
