"""Atomic writes: the target is the old complete thing or the new complete thing, never half written; nothing
temporary is left behind; modes follow the umask (not the 0600 of the libraries that write the files)."""

from __future__ import annotations

import os
import stat

import pytest

from edtools.atomic import atomic_file, atomic_folder, write_text


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def expected(kind: int) -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return kind & ~mask


def test_file_replaces_the_old_one_with_the_usual_mode(tmp_path):
    target = tmp_path / "sub" / "model.safetensors"
    write_text(target, "old")
    with atomic_file(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".model.safetensors.")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT, 0o600)  # as safetensors and mkstemp create files
        os.write(fd, b"new")
        os.close(fd)
        assert target.read_text() == "old"  # not visible until the block ends
    assert target.read_bytes() == b"new" and mode(target) == expected(0o666)
    assert sorted(p.name for p in target.parent.iterdir()) == ["model.safetensors"]


def test_failed_file_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    target = tmp_path / "notes.txt"
    write_text(target, "old")
    with pytest.raises(OSError, match="disk full"):
        with atomic_file(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_folder_is_swapped_in_whole(tmp_path):
    target = tmp_path / "step-00000001"
    with atomic_folder(target) as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights").write_text("first")
    with atomic_folder(target) as tmp:
        assert (target / "unet" / "weights").read_text() == "first"
        (tmp / "resume").mkdir()
        fd = os.open(tmp / "resume" / "state", os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
    assert sorted(p.name for p in target.iterdir()) == ["resume"]
    assert mode(target) == expected(0o777) and mode(target / "resume" / "state") == expected(0o666)
    assert [p.name for p in tmp_path.iterdir()] == ["step-00000001"]


def test_failed_folder_write_keeps_the_old_folder_and_leaves_nothing(tmp_path):
    target = tmp_path / "model"
    with atomic_folder(target) as tmp:
        (tmp / "old").write_text("complete")
    with pytest.raises(KeyboardInterrupt):
        with atomic_folder(target) as tmp:
            (tmp / "new").write_text("half")
            raise KeyboardInterrupt
    assert [p.name for p in target.iterdir()] == ["old"] and [p.name for p in tmp_path.iterdir()] == ["model"]
