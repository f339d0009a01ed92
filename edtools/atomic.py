"""Atomic writes: a file or folder appears under its name complete, or not at all (an old one stays until then).

Each is written beside its target under a hidden temporary name, synced and renamed; modes follow the umask.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_file", "atomic_folder", "write_text"]


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


# Libraries that write files (safetensors, mkstemp) create them 0600; a user's files should get their usual mode.
_FILE_MODE = 0o666 & ~_umask()
_FOLDER_MODE = 0o777 & ~_umask()


def _temporary(path: Path) -> Path:
    return path.parent / f".{path.name}.{secrets.token_hex(4)}.tmp"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` to write the file to. When the block ends without an error the file
    is synced, given the user's usual mode and renamed over `path`; otherwise it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        with open(tmp, "rb") as file:
            os.fsync(file.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


@contextmanager
def atomic_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary folder beside `path` to fill. When the block ends without an error it replaces
    `path` (an existing folder is moved aside first and deleted after); otherwise it is removed and an
    existing `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    tmp.mkdir()
    old = None
    try:
        yield tmp
        for folder, subfolders, files in os.walk(tmp):
            for name in subfolders:
                os.chmod(os.path.join(folder, name), _FOLDER_MODE)
            for name in files:
                os.chmod(os.path.join(folder, name), _FILE_MODE)
        os.chmod(tmp, _FOLDER_MODE)
        if path.exists():
            old = _temporary(path)
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous folder back
            old = None
        raise
    finally:
        if old is not None:
            _remove(old)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
