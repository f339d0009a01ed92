"""Faults through the command line, as a person meets them: Ctrl-C and kill -9 mid-run, two runs into one
folder, damaged checkpoints, a full drive, unreadable files, a drive that goes away mid-run. Each ends in a
clear message or a correct run: no traceback, nothing silently lost, and a resume that reaches the weights of
an uninterrupted run."""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from edtools.models import load_components  # noqa: E402
from edtools.train import find_checkpoints  # noqa: E402
from edtools.train.outdir import LOCK_FILE, damage  # noqa: E402

pytestmark = pytest.mark.slow
EDTOOLS = [sys.executable, "-m", "edtools"]


def train_args(root: Path, model: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data-root", str(root), "--model", str(model), "--out", str(out), "--epochs", "4",
        "--batch-size", "2", "--resolution", "64", "--lr", "1e-3", "--device", "cpu", "--no-progress-bar",
        *extra,
    ]  # fmt: skip


def edtools(*args: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*EDTOOLS, *args], capture_output=True, text=True, timeout=300, **kwargs)


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([*EDTOOLS, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def unet(checkpoint: Path) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in load_components(str(checkpoint)).unet.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model, tmp_path_factory):
    """A data root and the weights an uninterrupted 4-epoch run ends with."""
    from conftest import make_tree

    root = make_tree(tmp_path_factory.mktemp("data") / "root", {"a": 6, "b": 4})
    out = tmp_path_factory.mktemp("whole") / "out"
    done = edtools(*train_args(root, tiny_model, out))
    assert done.returncode == 0, done.stderr
    return root, unet(find_checkpoints(out)[-1])


def first_checkpoint(out: Path) -> bool:
    return bool(find_checkpoints(out))


def test_ctrl_c_finishes_the_step_saves_and_says_how_to_resume_exactly(tiny_model, uninterrupted, tmp_path):
    root, final = uninterrupted
    out = tmp_path / "out"
    process = start(*train_args(root, tiny_model, out))
    wait_for(lambda: first_checkpoint(out), what="the first checkpoint")
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "SIGINT: stopping after this step" in stderr
    command = stdout.split("To continue where it stopped:\n", 1)[1].strip()
    assert command.startswith("edtools train ") and command.endswith("--resume")
    resumed = edtools(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert same(unet(find_checkpoints(out)[-1]), final)


def test_a_second_ctrl_c_aborts_at_once_and_the_run_still_resumes_exactly(
    tiny_model, uninterrupted, tmp_path
):
    root, final = uninterrupted
    out = tmp_path / "out"
    process = start(*train_args(root, tiny_model, out))
    wait_for(lambda: first_checkpoint(out), what="the first checkpoint")
    process.send_signal(signal.SIGINT)
    time.sleep(0.05)  # the first asks for a step's end and a save; the second, meanwhile, aborts
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.rstrip().endswith("interrupted")
    assert "To continue where it stopped" not in stdout
    assert not (out / LOCK_FILE).exists()  # an aborted run does not leave its folder locked
    resumed = edtools(*train_args(root, tiny_model, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert not list((out / "checkpoints").glob(".*.tmp"))
    assert same(unet(find_checkpoints(out)[-1]), final)


def test_kill_9_mid_run_leaves_nothing_that_lingers_and_resumes_exactly(tiny_model, uninterrupted, tmp_path):
    root, final = uninterrupted
    out = tmp_path / "out"
    process = start(*train_args(root, tiny_model, out))

    def saving_the_second() -> bool:
        folder = out / "checkpoints"
        done = find_checkpoints(out)
        return len(done) >= 2 or (len(done) == 1 and any(folder.glob(".step-*.tmp")))

    with contextlib.suppress(
        AssertionError
    ):  # kill during the second save when it can be caught, else after it
        wait_for(saving_the_second, what="a save after the first checkpoint")
    process.kill()
    process.wait(30)
    (out / "checkpoints").mkdir(parents=True, exist_ok=True)
    leftover = out / "checkpoints" / ".step-00000099.dead.tmp"  # what a kill -9 mid-save leaves
    (leftover / "unet").mkdir(parents=True)
    (leftover / "unet" / "weights.safetensors").write_bytes(b"\0" * 4096)
    resumed = edtools(*train_args(root, tiny_model, out, "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "removed" in resumed.stderr and "unfinished save" in resumed.stderr
    assert not list((out / "checkpoints").glob(".*.tmp")) and not (out / LOCK_FILE).exists()
    assert same(unet(find_checkpoints(out)[-1]), final)


def test_a_second_run_into_one_folder_is_refused_and_a_dead_runs_lock_taken_over(
    tiny_model, uninterrupted, tmp_path
):
    root, _ = uninterrupted
    out = tmp_path / "out"
    first = start(*train_args(root, tiny_model, out, "--epochs", "30"))
    try:
        wait_for((out / LOCK_FILE).is_file, what="the first run's lock")
        second = edtools(*train_args(root, tiny_model, out))
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"in use by another edtools run (pid {first.pid}" in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)  # SIGTERM stops as Ctrl-C does
        first.communicate(timeout=120)
    assert first.returncode == 130 and not (out / LOCK_FILE).exists()
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    (out / LOCK_FILE).write_text(json.dumps({"pid": int(dead.stdout), "host": os.uname().nodename}))
    resumed = edtools(*train_args(root, tiny_model, out, "--resume", "--epochs", "1"))
    assert resumed.returncode == 0, resumed.stderr
    assert "taking over the lock" in resumed.stderr


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


@pytest.mark.parametrize(
    "harm",
    [
        lambda c: truncate(c / "resume" / "state.pt"),
        lambda c: truncate(next((c / "unet").glob("*.safetensors"))),
        lambda c: (c / "resume" / "state.json").write_text('{"global_step": '),
    ],
    ids=["truncated-state", "truncated-weights", "damaged-json"],
)
def test_a_damaged_newest_checkpoint_is_named_and_the_one_before_resumed(
    tiny_model, uninterrupted, tmp_path, harm
):
    root, _ = uninterrupted
    out = tmp_path / "out"
    assert edtools(*train_args(root, tiny_model, out, "--epochs", "2")).returncode == 0
    older, newest = find_checkpoints(out)
    harm(newest)
    assert damage(newest) is not None and damage(older) is None
    resumed = edtools(*train_args(root, tiny_model, out, "--resume", "--epochs", "3"))
    assert resumed.returncode == 0, resumed.stderr
    assert f"checkpoint {newest} cannot be resumed from" in resumed.stderr
    assert f"resuming from {older}" in resumed.stderr


@contextlib.contextmanager
def small_drive(folder: Path, size: str):
    """A tmpfs of the given size at folder (root), else skip."""
    folder.mkdir(parents=True)
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


def test_a_full_drive_is_a_message_and_the_last_checkpoint_stays(tiny_model, uninterrupted, tmp_path):
    root, _ = uninterrupted
    with small_drive(tmp_path / "drive", "3m") as drive:
        out = drive / "out"
        done = edtools(*train_args(root, tiny_model, out, "--epochs", "3"))
        assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
        assert f"no space left on the drive of {out / 'checkpoints'}" in done.stderr
        assert "GB are free; the last complete checkpoint" in done.stderr
        (last,) = find_checkpoints(out)
        assert damage(last) is None and not list((out / "checkpoints").glob(".*.tmp"))


def as_nobody() -> list[str]:
    if os.geteuid() != 0 or not shutil.which("setpriv"):
        pytest.skip("needs root and setpriv to run without the capability that ignores permissions")
    return [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
    ]


def test_unreadable_files_are_messages(tiny_model, tmp_path):
    prefix = as_nobody()
    locked = tmp_path / "locked.safetensors"
    assert edtools("convert", str(tiny_model), str(locked)).returncode == 0
    locked.chmod(0o000)
    tmp_path.chmod(0o755)
    env = {**os.environ, "HOME": str(tmp_path), "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [*prefix, *EDTOOLS, "convert", str(locked), str(tmp_path / "copy.safetensors"), "--config", str(tiny_model)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert str(locked) in done.stderr and "ermission" in done.stderr


# A drive that goes away mid-run. The fault is injected right after an optimizer step, in the CLI's own
# process: the step event is where a notebook's callback would act, so the run meets it at a known point.


def edtools_with_fault(step: int, fault: str, *args: str) -> subprocess.CompletedProcess:
    """edtools with the Python statement `fault` run right after optimizer step `step`."""
    code = f"""
import os, sys
import edtools.train.loop as loop
from edtools.cli import main
emit = loop.emit
def faulty_emit(run, event):
    emit(run, event)
    if event.kind == "step" and event.global_step == {step}:
        {fault}
loop.emit = faulty_emit
sys.exit(main(sys.argv[1:]))
"""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("replaced", [False, True], ids=["unmounted", "replaced-by-an-empty-folder"])
def test_an_out_folder_that_goes_away_stops_the_run_and_resumes_once_back(
    tiny_model, uninterrupted, tmp_path, replaced
):
    root, final = uninterrupted
    out, away = tmp_path / "out", tmp_path / "away"
    fault = f"os.rename({str(out)!r}, {str(away)!r})" + (f"; os.mkdir({str(out)!r})" if replaced else "")
    done = edtools_with_fault(7, fault, *train_args(root, tiny_model, out))  # mid epoch 1; epoch 0 saved
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    what = "was removed or replaced during the run" if replaced else "disappeared during the run"
    assert f"error: the out folder {out} {what}" in done.stderr
    assert (
        "The run stopped at step 7 (epoch 1, batch 2), writing nothing more there and not recreating it"
        in done.stderr
    )
    assert f"The last checkpoint saved is {out / 'checkpoints' / 'step-00000005'} (step 5)" in done.stderr
    assert not out.exists() or not any(out.iterdir())  # nothing written into a stand-in
    assert [c.name for c in find_checkpoints(away)] == ["step-00000005"]
    command = done.stdout.split("continue from", 1)[1].split(":\n", 1)[1].strip()
    assert command.startswith("edtools train ") and command.endswith("--resume")

    if replaced:
        out.rmdir()
    away.rename(out)  # the drive is back
    resumed = edtools(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {out / 'checkpoints' / 'step-00000005'}" in resumed.stderr
    assert same(unet(find_checkpoints(out)[-1]), final)


@pytest.mark.parametrize("num_workers", ["0", "1"])
def test_an_image_that_vanishes_mid_run_is_skipped_and_listed(
    tiny_model, uninterrupted, tmp_path, num_workers
):
    root = shutil.copytree(uninterrupted[0], tmp_path / "root")
    out, gone = tmp_path / "out", root / "a" / "a_003.png"
    done = edtools_with_fault(
        2,
        f"os.remove({str(gone)!r})",
        *train_args(root, tiny_model, out, "--cache-latents", "memory", "--num-workers", num_workers),
    )  # cached latents need the file's size and time: that is where a vanished image used to end the run
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "skipped a/a_003.png (the file disappeared during the run" in done.stderr
    lines = [line.split("\t") for line in (out / "skipped_images.txt").read_text().splitlines()]
    assert {path for _, path, _ in lines} == {"a/a_003.png"}
    assert {"epoch 1", "epoch 2", "epoch 3"} <= {epoch for epoch, _, _ in lines}  # every epoch after it
    assert find_checkpoints(out)[-1].name == "step-00000020"  # 4 epochs, none cut short


def test_a_data_root_that_goes_away_stops_with_a_checkpoint_and_resumes_exactly(
    tiny_model, uninterrupted, tmp_path
):
    _, final = uninterrupted
    root = shutil.copytree(uninterrupted[0], tmp_path / "root")
    out, away = tmp_path / "out", tmp_path / "root-away"
    done = edtools_with_fault(
        7, f"os.rename({str(root)!r}, {str(away)!r})", *train_args(root, tiny_model, out)
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert f"the data root {root} disappeared during the run" in done.stderr
    (checkpoint,) = find_checkpoints(out)[-1:]
    assert checkpoint.name == "step-00000007" and damage(checkpoint) is None  # mid-epoch, resumable
    assert not (out / "skipped_images.txt").exists()  # the images were not bad: the data root was away
    command = done.stdout.split("continue where it stopped:\n", 1)[1].strip()
    away.rename(root)
    resumed = edtools(*shlex.split(command)[1:])
    assert resumed.returncode == 0, resumed.stderr
    assert same(unet(find_checkpoints(out)[-1]), final)
