"""What the notebook panels share: ipywidgets, settings read from the environment, formatting, PNG figures.

ipywidgets 7.7 (Colab's) and 8 both work: the panels use only what 7.7 has.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

try:
    import ipywidgets as widgets
except ImportError as exc:  # the panels are what this package is for
    from ..errors import MissingDependency

    raise MissingDependency(
        "edtools.widgets needs ipywidgets: pip install 'ipywidgets>=7.7' (or the [notebook] extra)"
    ) from exc

__all__ = [
    "default_data_root",
    "gpu_has_bf16",
    "gpu_memory_gib",
    "gpu_status",
    "smoke_autostart",
    "smoke_mode",
    "widgets",
]

DEMO_DIR = Path("edtools_demo")  # relative to the notebook's folder (/content on Colab)
SMOKE_ENV = "EDTOOLS_SMOKE"
DATA_ROOT_ENV = "EDTOOLS_DATA_ROOT"
RESOLUTIONS = (64, 128, 256, 384, 512, 576, 640, 704, 768, 832, 896, 960, 1024)
MULTIPLIER_RANGE = (0.01, 10.0)  # the slider's default span; typed values outside it widen the slider
ROWS_HEIGHT = "420px"  # fixed-height scroll boxes keep 60 folders usable


def smoke_mode() -> bool:
    """True when EDTOOLS_SMOKE is 1 or ui: the training panel is set for the tiny model at resolution 64."""
    return os.environ.get(SMOKE_ENV, "") in ("1", "ui")


def smoke_autostart() -> bool:
    """True when EDTOOLS_SMOKE=1: the notebook also trains the tiny model headless and waits for the end
    (with ui, a person or a browser test presses Train)."""
    return os.environ.get(SMOKE_ENV, "") == "1"


def default_data_root() -> Path:
    """$EDTOOLS_DATA_ROOT, else the demo data root next to the notebook (made on the fly when missing)."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEMO_DIR / "data")


def gpu_memory_gib() -> float | None:
    """The first CUDA GPU's total memory in GiB, or None without one."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def gpu_has_bf16() -> bool | None:
    """Whether the first CUDA GPU computes in bfloat16 (an L4 or A100 does, a T4 not), or None without one."""
    if gpu_memory_gib() is None:
        return None
    import torch

    return bool(torch.cuda.is_bf16_supported())


def gpu_status() -> str:
    """One line for a person: which GPU training will use, or what to do when there is none."""
    try:
        import torch
    except ImportError:
        return "torch is not installed: run the install cell (pip install 'edtools[train,notebook]')."
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (
            f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}"
        )
    return (
        "No GPU found: training runs on the CPU, which only suits the tiny smoke-test model. "
        "On Colab choose Runtime > Change runtime type > GPU (e.g. T4), then run the cells again."
    )


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _short(path: str, width: int = 30) -> str:
    """A folder name for a narrow column: long paths keep start and end ("people/…/alice_closeups")."""
    name = "(data root)" if path == "." else path
    if len(name) <= width:
        return name
    head = width // 3
    return name[:head] + "…" + name[-(width - head - 1) :]


def _png(fig, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class _Panel:
    """Displays as its root widget (display(panel) or a cell ending with it), with ipywidgets 7 or 8."""

    widget: widgets.Widget

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
