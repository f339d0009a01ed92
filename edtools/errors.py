"""Expected failures: one base class whose message is for a person, and imports of optional dependencies.

The CLI prints an EdtoolsError's message alone and exits 2; any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

__all__ = [
    "ConfigError",
    "EdtoolsError",
    "MissingDependency",
    "ModelError",
    "quiet_harmless_warnings",
    "require",
]

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


class ConfigError(EdtoolsError, ValueError):
    """A setting that is missing, unknown or out of range; the message names it and what is allowed."""


class MissingDependency(EdtoolsError, ImportError):
    """An optional package that this feature needs is not installed."""


def require(module: str, *, feature: str = "edtools training") -> ModuleType:
    """Import a heavy optional dependency on first use, or say which package (and extra) to install."""
    if module.split(".")[0] in _LOADS_MODELS:
        quiet_harmless_warnings()
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        package = module.split(".")[0]
        extra = _EXTRA_OF.get(package, "train")
        raise MissingDependency(
            f"{feature} needs {package}: pip install '{package}' "
            f"(or install edtools with its [{extra}] extra: pip install 'edtools[{extra}]')"
        ) from exc


# Warnings that need no action, each named by where it comes from (the logger, and the code running when it is
# logged), never by its wording, which changes between releases.
_LOADS_MODELS = (
    "diffusers",
    "transformers",
    "peft",
    "bitsandbytes",
)  # each imports bitsandbytes, or diffusers
_IMPORT_PROBE_LOGGERS = ("kernels", "bitsandbytes.backends.cpu")  # bitsandbytes' 4-bit CPU kernel probe
_LAZY_IMPORT_LOGGER = "transformers.utils.import_utils"  # transformers' fallbacks for names diffusers imports
_quieted = False


class _WhileImportedBy(logging.Filter):
    """Drops a logger's records while code of the package `caller` is on the stack (the record is logged in
    the caller's thread, so the stack is the one that caused it)."""

    def __init__(self, caller: str) -> None:
        super().__init__()
        self.caller = caller

    def filter(self, record: logging.LogRecord) -> bool:
        frame = sys._getframe(1)
        while frame is not None:
            name = frame.f_globals.get("__name__", "")
            if name == self.caller or name.startswith(self.caller + "."):
                return False
            frame = frame.f_back
        return True


@contextmanager
def _silenced(*loggers: str) -> Iterator[None]:
    """Warnings of these loggers (and their children) off for a block, their levels restored after."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def quiet_harmless_warnings() -> None:
    """Silence two warnings that every model load printed and that need no action, and nothing else:
    - importing bitsandbytes probes for a 4-bit CPU kernel (on the hub, through the `kernels` package) that
      8-bit AdamW never uses: bitsandbytes is imported here once, with the probe's loggers quiet for that
      import only;
    - transformers falls back for image processors (they need torchvision, left out on purpose) when diffusers
      imports its pipelines: records of that lazy-import logger are dropped while diffusers' code runs.
    Called by `require` before the heavy libraries are imported; idempotent."""
    global _quieted
    if _quieted:
        return
    _quieted = True
    lazy_imports = logging.getLogger(_LAZY_IMPORT_LOGGER)
    if not any(isinstance(f, _WhileImportedBy) for f in lazy_imports.filters):
        lazy_imports.addFilter(_WhileImportedBy("diffusers"))
    if "bitsandbytes" not in sys.modules and importlib.util.find_spec("bitsandbytes") is not None:
        with _silenced(*_IMPORT_PROBE_LOGGERS):
            try:
                importlib.import_module("bitsandbytes")
            except ImportError:
                pass  # the optimizer that needs it says what to install
