"""The out folder a run owns: a lock so two runs never write into it at once (and that tells when the folder
went away mid-run), the removal of saves an earlier run never finished, and the newest intact checkpoint.
"""

from __future__ import annotations

import contextlib
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
    "MOUNT_POINTS",
    "OutFolderGone",
    "OutLock",
    "damage",
    "lock_holder",
    "prepare_out",
    "remove_unfinished_saves",
    "resume_point",
    "take_over_lock",
]

log = logging.getLogger("edtools.train")

LOCK_FILE = ".edtools.lock"

# Where notebooks mount a cloud drive (Colab's drive.mount). Unmounted, a path under one is a plain folder on the
# local disk, which a disconnect wipes: a run refuses to start there.
MOUNT_POINTS = ("/content/drive",)


class OutFolderGone(EdtoolsError):
    """The out folder went away mid-run (a Drive that was unmounted, a folder deleted or replaced): the run
    stopped without recreating it. checkpoint: the last one saved there, to resume from once it is back."""

    def __init__(self, message: str, checkpoint: Path | None = None) -> None:
        super().__init__(message)
        self.checkpoint = checkpoint


class OutLock:
    """out/.edtools.lock holds the pid, host and start time of the run using the folder. A lock whose process
    is gone (or is this very process, after a run that ended by an error) is taken over. While held, problem()
    tells whether the folder is still the one locked."""

    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.held = False
        self._mine: dict | None = None
        self._identity: tuple[os.stat_result, os.stat_result] | None = None  # (folder, lock file) at start

    def acquire(self) -> None:
        _refuse_unmounted(self.path.parent)
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
            self.held, self._mine = True, mine
            self._identity = (os.stat(self.path.parent), os.stat(self.path))
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

    def problem(self) -> str | None:
        """What happened to the locked folder, said as the end of a sentence about it (gone, on another drive,
        replaced), or None while it is the one locked. Two stat calls; the lock is read only when numbers moved."""
        if not self.held or self._identity is None:
            return None
        folder_then, lock_then = self._identity
        try:
            folder = os.stat(self.path.parent)
        except FileNotFoundError:
            return "disappeared during the run (a Drive that was unmounted?)"
        except OSError as exc:  # a dead network mount: "Transport endpoint is not connected"
            return f"cannot be reached any more ({exc.strerror or exc}: a Drive that was unmounted?)"
        if folder.st_dev != folder_then.st_dev:
            return "is now on another drive than when the run started (a Drive that was unmounted?)"
        try:
            lock = os.stat(self.path)
        except OSError:
            lock = None
        if folder.st_ino == folder_then.st_ino and lock is not None and _same_file(lock, lock_then):
            return None
        # Some network drives number files anew after a while: the lock's content decides, read only then.
        if lock is not None and self._read() == self._mine:
            self._identity = (folder, lock)
            return None
        return f"was removed or replaced during the run (its lock file {LOCK_FILE} is gone or another run's)"

    def release(self) -> None:
        """Remove the lock, if it is still this run's (a folder replaced mid-run may hold another's)."""
        if self.held:
            self.held = False
            with contextlib.suppress(OSError):  # a folder on a drive that went away: nothing to remove
                if self._mine is None or self._read() in (None, self._mine):
                    self.path.unlink(missing_ok=True)


def _same_file(now: os.stat_result, then: os.stat_result) -> bool:
    """The lock file is written once: another file (even one given a freed inode's number) differs in time or size."""
    return (now.st_ino, now.st_mtime_ns, now.st_size) == (then.st_ino, then.st_mtime_ns, then.st_size)


def _refuse_unmounted(out: Path) -> None:
    """A drive's mount point that is not mounted (before drive.mount, after a disconnect) is refused: the run
    would write to the local disk, lost at a disconnect, and not to the drive."""
    out = Path(os.path.abspath(out))
    for point in map(Path, MOUNT_POINTS):
        if out.is_relative_to(point) and not os.path.ismount(point):
            raise EdtoolsError(
                f"out is {out}, under {point}, but no drive is mounted at {point}: the run would write to the "
                f"local disk, which a disconnect wipes. Mount the drive first (Colab: from google.colab import "
                f"drive; drive.mount('{point}')), or choose an out folder elsewhere"
            )


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
    resume_from = resume_point(config, out)
    if resume_from is not None:
        return resume_from
    checkpoints = find_checkpoints(out)
    runtime.barrier()
    if runtime.main:
        if checkpoints:
            shutil.rmtree(out / CHECKPOINTS_DIR)
            shutil.rmtree(out / SAMPLES_DIR, ignore_errors=True)
        for name in RECORDS:
            (out / name).unlink(missing_ok=True)
    runtime.barrier()
    return None


def resume_point(config: TrainConfig, out: Path) -> Path | None:
    """The checkpoint a run of config continues from (resume: the newest intact one, damaged newer ones named),
    or None for a fresh run; an earlier run's checkpoints without resume or overwrite are refused. Reads only."""
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
    return None
