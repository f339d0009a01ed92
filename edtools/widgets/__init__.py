"""Notebook panels: scan a data root, balance concepts with live histograms, and train with a Stop button.

The cells only create the panels (`data`, `balance`, `training`, whose form is `settings`); `progress`,
`metrics`, `runfolder`, `colab` and `common` serve them.
"""

from .balance import (
    BalancePanel,
    changed_values,
    epoch_totals,
    equalize_multipliers,
    is_preservation,
    save_values,
)
from .colab import colab_drive, drive_settings, end_runtime, in_colab, run_name
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
from .runfolder import (
    EarlierRun,
    SpaceCheck,
    estimate_checkpoint_bytes,
    find_earlier_run,
    model_parameters,
    resume_offer,
    space_check,
)
from .training import TrainingPanel

__all__ = [
    "DATA_ROOT_ENV",
    "ROWS_HEIGHT",
    "SMOKE_ENV",
    "BalancePanel",
    "DataPanel",
    "EarlierRun",
    "SpaceCheck",
    "TrainingPanel",
    "changed_values",
    "colab_drive",
    "default_data_root",
    "drive_settings",
    "end_runtime",
    "epoch_totals",
    "equalize_multipliers",
    "estimate_checkpoint_bytes",
    "find_earlier_run",
    "gpu_status",
    "in_colab",
    "is_preservation",
    "model_parameters",
    "resume_offer",
    "run_name",
    "save_values",
    "smoke_autostart",
    "smoke_mode",
    "space_check",
]
