"""Notebook panels: scan a data root, balance concepts with live histograms, and train with a Stop button.

The notebook cells only create these panels (`data`, `balance`, `training`); `common` holds what they share.
"""

from .balance import (
    BalancePanel,
    changed_values,
    epoch_totals,
    equalize_multipliers,
    is_preservation,
    save_values,
)
from .common import (
    DATA_ROOT_ENV,
    ROWS_HEIGHT,
    SMOKE_ENV,
    default_data_root,
    gpu_status,
    smoke_autostart,
    smoke_mode,
)
from .data import DataPanel
from .training import TrainingPanel

__all__ = [
    "DATA_ROOT_ENV",
    "ROWS_HEIGHT",
    "SMOKE_ENV",
    "BalancePanel",
    "DataPanel",
    "TrainingPanel",
    "changed_values",
    "default_data_root",
    "epoch_totals",
    "equalize_multipliers",
    "gpu_status",
    "is_preservation",
    "save_values",
    "smoke_autostart",
    "smoke_mode",
]
