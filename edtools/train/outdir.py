"""The out folder a run owns: a lock so two runs never write into it at once, the removal of saves an earlier
run never finished, and the newest checkpoint that is intact (a damaged one is named and skipped).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path

from ..config import ConfigError, TrainConfig
from ..errors import EdtoolsError
from .checkpoint import CHECKPOINTS_DIR, find_checkpoints
from .runtime import Runtime
from .sample import SAMPLES_DIR

__all__ = [
    "LOCK_FILE",
    "OutLock",
    "damage",
    "lock_holder",
    "prepare_out",
    "remove_unfinished_saves",
    "take_over_lock",
]

log = logging.getLogger("edtools.train")

LOCK_FILE = ".edtools.lock"


class OutLock:
    """out/.edtools.lock holds the pid, host and start time of the run using the folder. A lock whose process
    is gone (or is this very process, after a run that ended by an error) is taken over."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.held = False

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        mine = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = self._read()
                if other is not None and self._alive(other):
                    raise EdtoolsError(
                        f"{self.path.parent} is in use by another edtools run (pid {other['pid']} on "
                        f"{other['host']}, started {other.get('started', '?')}); wait for it to end, or choose "
                        "another out folder"
                    ) from None
                log.warning("taking over the lock %s of a run that is gone (%s)", self.path, other)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as file:
                json.dump(mine, file)
            self.held = True
            return
        raise EdtoolsError(
            f"could not lock {self.path}: another run keeps taking it; choose another out folder"
        )

    def _read(self) -> dict | None:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None  # half written or gone: nobody holds it

    @staticmethod
    def _alive(other: dict) -> bool:
        if other.get("host") != socket.gethostname():
            return True  # another machine's run (a shared drive): assume it lives
        pid = int(other.get("pid", -1))
        if pid == os.getpid():
            return False  # this process: an earlier run here ended without releasing it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def lock_holder(out: Path) -> dict | None:
    """The run whose lock would keep a new run out of this folder (pid, host, started), or None. A lock of
    another machine counts: on a shared drive its run may still be going."""
    lock = OutLock(out)
    holder = lock._read()
    return holder if holder is not None and lock._alive(holder) else None


def take_over_lock(out: Path, holder: dict) -> bool:
    """Remove the lock of a run a person says is gone (a Colab runtime that disconnected leaves its lock on
    Drive, from a machine that no longer exists), if it is still exactly that lock. Returns whether it did."""
    lock = OutLock(out)
    if lock._read() != holder:
        return False
    log.warning("taking over the lock %s of %s (on %s)", lock.path, holder.get("pid"), holder.get("host"))
    lock.path.unlink(missing_ok=True)
    return True


def remove_unfinished_saves(out: Path) -> list[Path]:
    """Staging folders and temp files of saves that never finished (a kill -9 mid-save), under out/checkpoints
    and out/samples: they are never resumed from, only taking disk space."""
    removed = []
    for folder in (out / CHECKPOINTS_DIR, out / SAMPLES_DIR):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.name.startswith(".") and path.name.endswith(".tmp"):
                shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        log.info(
            "removed %d unfinished save(s) of an earlier run: %s",
            len(removed),
            ", ".join(p.name for p in removed),
        )
    return removed


def damage(checkpoint: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (truncated or corrupt files, damaged JSON), or None when intact.
    Cheap: JSON parsed, the state archive's checksums tested, each safetensors file's length checked against
    its header; no weights are loaded."""
    resume = checkpoint / "resume"
    for name in ("state.json", "config.json"):
        try:
            json.loads((resume / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"resume/{name} is damaged ({exc})"
    try:
        with zipfile.ZipFile(resume / "state.pt") as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"resume/state.pt is corrupt ({bad})"
    except (OSError, zipfile.BadZipFile) as exc:
        return f"resume/state.pt is damaged ({exc})"
    for weights in sorted(checkpoint.rglob("*.safetensors")):
        problem = _safetensors_damage(weights)
        if problem:
            return f"{weights.relative_to(checkpoint)} {problem}"
    return None


def _safetensors_damage(path: Path) -> str | None:
    try:
        size = path.stat().st_size
        with open(path, "rb") as file:
            header_len = int.from_bytes(file.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                return "is truncated (its header runs past the end)"
            header = json.loads(file.read(header_len))
    except (OSError, ValueError) as exc:
        return f"is damaged ({exc})"
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        return f"is truncated ({size} bytes, its header describes {8 + header_len + end})"
    return None


def prepare_out(config: TrainConfig, out: Path, runtime: Runtime) -> Path | None:
    """The checkpoint to resume from (resume: the newest intact one, damaged newer ones named), else a fresh
    out folder: an earlier run's checkpoints are refused (or deleted with overwrite) and its records removed,
    so two runs never mix. Unfinished saves are removed first. The caller holds the folder's lock."""
    from .records import RECORDS

    if runtime.main:
        remove_unfinished_saves(out)
    runtime.barrier()
    checkpoints = find_checkpoints(out)
    if config.resume:
        for checkpoint in reversed(checkpoints):
            problem = damage(checkpoint)
            if problem is None:
                return checkpoint
            log.warning(
                "checkpoint %s cannot be resumed from: %s; trying the one before it", checkpoint, problem
            )
        raise ConfigError(
            f"resume is set but {out / CHECKPOINTS_DIR} holds no intact checkpoint"
            + (" (every one is damaged: see the warnings above)" if checkpoints else "")
            + "; start without resume (or point out at the earlier run's folder)"
        )
    if checkpoints and not config.overwrite:
        raise ConfigError(
            f"{out / CHECKPOINTS_DIR} already holds checkpoints of an earlier run (newest "
            f"{checkpoints[-1].name}); set resume to continue it, overwrite to delete them and start "
            "afresh, or choose another out folder"
        )
    runtime.barrier()
    if runtime.main:
        if checkpoints:
            shutil.rmtree(out / CHECKPOINTS_DIR)
            shutil.rmtree(out / SAMPLES_DIR, ignore_errors=True)
        for name in RECORDS:
            (out / name).unlink(missing_ok=True)
    runtime.barrier()
    return None
