"""Colab and Google Drive for the notebook: the output folder and caches proposed on a mounted Drive, so a fresh
runtime finds its run again after a disconnect, and the runtime handed back when training ends.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

__all__ = ["DRIVE_ROOT", "colab_drive", "drive_settings", "end_runtime", "in_colab", "run_name"]

_log = logging.getLogger("edtools")

DRIVE_ROOT = Path("/content/drive/MyDrive")  # where the notebook's drive.mount("/content/drive") puts it
DRIVE_CHECKPOINT_MINUTES = 30.0  # a disconnect then loses at most half an hour of training


def in_colab() -> bool:
    """True inside a Colab runtime (its google.colab package is loaded at start)."""
    return "google.colab" in sys.modules


def colab_drive(root: str | os.PathLike = DRIVE_ROOT) -> Path | None:
    """The mounted Google Drive on Colab, else None (not Colab, or Drive not mounted)."""
    return Path(root) if in_colab() and Path(root).is_dir() else None


def run_name(data_root: str | os.PathLike) -> str:
    """A run's folder name: the data root's own name in letters, digits, '.', '-' and '_' ("run" if none)."""
    name = Path(os.path.abspath(os.path.expanduser(data_root))).name
    return re.sub(r"[^\w.-]+", "_", name).strip("._") or "run"


def drive_settings(drive_root: str | os.PathLike, data_root: str | os.PathLike) -> dict[str, Any]:
    """TrainConfig values that keep a run on Drive, the same on every new runtime: out is
    <drive>/edtools/runs/<data root's name>; the latent and caption-embedding caches live on disk in
    <drive>/edtools/cache, shared by all runs (entries are keyed by image file and model, so a new runtime reuses
    them); a checkpoint every 30 minutes bounds what a disconnect loses."""
    base = Path(drive_root) / "edtools"
    return {
        "out": str(base / "runs" / run_name(data_root)),
        "cache_dir": str(base / "cache"),
        "cache_latents": "disk",
        "checkpoint_every_minutes": DRIVE_CHECKPOINT_MINUTES,
    }


def end_runtime() -> None:
    """Hand the Colab runtime back (google.colab.runtime.unassign) so paid compute stops. Drive's pending
    uploads are written first (flush_and_unmount): a runtime that goes away at once loses what Drive has not
    uploaded yet. Raises when not on Colab."""
    if not in_colab():
        raise RuntimeError("not a Colab runtime: nothing to disconnect")
    from google.colab import drive, runtime

    try:
        drive.flush_and_unmount()
    except Exception as exc:  # not mounted, or the mount is lost: the runtime goes back all the same
        _log.warning("Google Drive could not be flushed before disconnecting: %s", exc)
    runtime.unassign()
