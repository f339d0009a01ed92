"""Expected failures: one base class whose message is for a person, and imports of optional dependencies.

The CLI prints an EdtoolsError's message alone and exits 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

__all__ = ["EdtoolsError", "MissingDependency", "ModelError", "quiet_harmless_warnings", "require"]

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


class _DropTorchvisionFallback(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_harmless_warnings() -> None:
    """Silence two warnings every model load printed that need no action: bitsandbytes' import warns about a
    4-bit CPU kernel that 8-bit AdamW never uses, and transformers about image processors (torchvision is left
    out on purpose: no image processor is used). Other warnings of those libraries still show."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    imports = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _DropTorchvisionFallback) for f in imports.filters):
        imports.addFilter(_DropTorchvisionFallback())
