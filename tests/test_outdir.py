"""The out folder's lock: it tells when the folder went away or was replaced mid-run, and a run under a drive's
mount point that is not mounted is refused before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edtools.errors import EdtoolsError
from edtools.train import outdir
from edtools.train.outdir import LOCK_FILE, OutLock


@pytest.fixture
def locked(tmp_path: Path):
    lock = OutLock(tmp_path / "out")
    lock.acquire()
    yield lock
    lock.release()


def test_the_locked_folder_has_no_problem_until_it_goes_away_and_none_once_back(locked, tmp_path):
    out = tmp_path / "out"
    assert locked.problem() is None
    out.rename(tmp_path / "away")
    assert locked.problem() == "disappeared during the run (a Drive that was unmounted?)"
    assert not out.exists()  # asking does not recreate it
    (tmp_path / "away").rename(out)  # the same folder back (a rename keeps its identity)
    assert locked.problem() is None


@pytest.mark.parametrize(
    "harm",
    [
        lambda out: (out.rename(out.with_name("away")), out.mkdir()),
        lambda out: (out / LOCK_FILE).unlink(),
        lambda out: ((out / LOCK_FILE).unlink(), (out / LOCK_FILE).write_text('{"pid": 1, "host": "there"}')),
    ],  # another run takes a lock over as OutLock.acquire does: a new file
    ids=["empty-folder-in-its-place", "lock-removed", "lock-of-another-run"],
)
def test_a_replaced_folder_or_lock_is_a_problem(locked, tmp_path, harm):
    harm(tmp_path / "out")
    assert locked.problem() == (
        f"was removed or replaced during the run (its lock file {LOCK_FILE} is gone or another run's)"
    )


def test_a_folder_renumbered_by_its_drive_is_still_the_one_locked(locked, tmp_path):
    """Some network drives give files new numbers after a while: the lock's content then decides."""
    lock = tmp_path / "out" / LOCK_FILE
    text = lock.read_text()
    lock.unlink()
    lock.write_text(text)  # the same content under a new inode
    assert locked.problem() is None


def test_release_leaves_another_runs_lock_in_a_replaced_folder(tmp_path):
    lock = OutLock(tmp_path / "out")
    lock.acquire()
    other = {"pid": 1, "host": "elsewhere", "started": "then"}
    (tmp_path / "out" / LOCK_FILE).write_text(json.dumps(other))
    lock.release()
    assert json.loads((tmp_path / "out" / LOCK_FILE).read_text()) == other
    mine = OutLock(tmp_path / "mine")
    mine.acquire()
    mine.release()
    assert not (tmp_path / "mine" / LOCK_FILE).exists()


def test_a_lock_on_a_drive_that_went_away_is_released_quietly(tmp_path):
    lock = OutLock(tmp_path / "out")
    lock.acquire()
    (tmp_path / "out").rename(tmp_path / "away")
    lock.release()  # no error, nothing recreated
    assert not (tmp_path / "out").exists()


def test_a_run_under_a_mount_point_that_is_not_mounted_is_refused(tmp_path, monkeypatch, capsys):
    from edtools.cli import main

    drive = tmp_path / "drive"
    drive.mkdir()  # a folder, as /content/drive is after a disconnect, but nothing mounted on it
    monkeypatch.setattr(outdir, "MOUNT_POINTS", (str(drive),))
    out = drive / "MyDrive" / "run"
    with pytest.raises(EdtoolsError, match="no drive is mounted at"):
        OutLock(out).acquire()
    code = main(["train", "--data-root", str(tmp_path / "data"), "--model", str(tmp_path / "model"),
                 "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert code == 2
    assert (
        f"error: out is {out}, under {drive}, but no drive is mounted at {drive}" in capsys.readouterr().err
    )
    assert not (drive / "MyDrive").exists()
    monkeypatch.chdir(drive)  # a relative out is judged by where it lands
    with pytest.raises(EdtoolsError, match="no drive is mounted at"):
        OutLock(Path("MyDrive/run")).acquire()
    OutLock(tmp_path / "elsewhere").acquire()  # outside the mount point: nothing to refuse
