"""Live rebalancing: a multiply.txt edited while a run trains changes the next epoch's counts (never the epoch in
progress), the history says so, a mid-epoch resume finishes the epoch with its own values, the LR schedule
follows the new length, and the notebook can be the source of the values."""

from __future__ import annotations

import csv
import dataclasses
import logging
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from edtools.config import TrainConfig  # noqa: E402
from edtools.train import train  # noqa: E402


def make_config(root: Path, model: Path, out: Path, **values) -> TrainConfig:
    return train_config(root, model, out, **{**dict(epochs=3, live_balance=True), **values})


def history(out: str) -> dict[tuple[int, str], tuple[str, str]]:
    with open(Path(out) / "balance_history.csv", newline="") as file:
        return {(int(r["epoch"]), r["concept"]): (r["multiply"], r["actual"]) for r in csv.DictReader(file)}


def edit_after_epoch(root: Path, epoch: int, text: str):
    """A callback that writes b/multiply.txt when `epoch` has ended, as a user would mid-run."""

    def callback(event):
        if event.kind == "epoch" and event.epoch == epoch:
            (root / "b" / "multiply.txt").write_text(text)

    return callback


@pytest.mark.slow
def test_an_edit_during_the_run_changes_the_next_epoch(tree, tiny_model, tmp_path, caplog):
    root = tree({"a": 4, "b": 2})
    config = make_config(root, tiny_model, tmp_path / "out", lr_scheduler="linear")
    events = []
    edit = edit_after_epoch(root, 0, "3")
    with caplog.at_level(logging.INFO, logger="edtools"):
        result = train(config, lambda e: (events.append(e), edit(e))[1])
    assert result.stop_reason == "finished"
    assert history(result.out) == {
        (0, "a"): ("1", "4"),
        (0, "b"): ("1", "2"),
        (1, "a"): ("1", "4"),
        (1, "b"): ("3", "6"),
        (2, "a"): ("1", "4"),
        (2, "b"): ("3", "6"),
    }
    epochs = [e for e in events if e.kind == "epoch"]
    assert [e.images_per_concept["b"] for e in epochs] == [2, 6, 6]
    assert [e.multipliers["b"] for e in epochs] == [1.0, 3.0, 3.0]
    assert caplog.text.count("epoch 1: b multiply 1 -> 3") == 1
    steps = [e for e in events if e.kind == "step"]
    assert all(e.lr > 0 for e in steps)  # the linear decay was stretched to the longer run
    assert steps[-1].lr < steps[0].lr


@pytest.mark.slow
def test_a_mid_epoch_resume_keeps_that_epochs_multipliers(tree, tiny_model, tmp_path):
    root = tree({"a": 4, "b": 2})
    config = make_config(root, tiny_model, tmp_path / "out", max_steps=5)
    first = train(config, edit_after_epoch(root, 0, "3"))  # epoch 0: 3 steps; epoch 1 (b x3): 5 steps
    assert (first.stop_reason, first.epoch, first.batch) == ("max_steps", 1, 2)
    (root / "b" / "multiply.txt").write_text("2")  # changed again while the run is stopped
    last = train(dataclasses.replace(config, resume=True, max_steps=None))
    assert last.stop_reason == "finished"
    assert history(last.out)[(1, "b")] == ("3", "6")  # the epoch in progress kept its value
    assert history(last.out)[(2, "b")] == ("2", "4")  # the next one reads the file as it is now


@pytest.mark.slow
def test_without_live_balance_edits_wait_for_the_next_run_and_bad_edits_are_ignored(
    tree, tiny_model, tmp_path, caplog
):
    root = tree({"a": 4, "b": 2})
    fixed = train(
        make_config(root, tiny_model, tmp_path / "fixed", live_balance=False), edit_after_epoch(root, 0, "3")
    )
    assert {v[0] for (e, c), v in history(fixed.out).items() if c == "b"} == {"1"}
    (root / "b" / "multiply.txt").write_text("1")
    with caplog.at_level(logging.WARNING, logger="edtools"):
        bad = train(make_config(root, tiny_model, tmp_path / "bad"), edit_after_epoch(root, 0, "three"))
    assert {v[0] for (e, c), v in history(bad.out).items() if c == "b"} == {"1"}
    assert "keeps the previous epoch's multipliers" in caplog.text and "three" in caplog.text


@pytest.mark.slow
def test_the_notebook_can_be_the_source_and_resume_stays_exact(tree, tiny_model, tmp_path):
    root = tree({"a": 4, "b": 2})
    config = make_config(root, tiny_model, tmp_path / "whole", epochs=2)
    source = lambda epoch: ({"b": 2.5} if epoch >= 1 else {}, {"a": 0.5})  # noqa: E731
    whole = train(config, balance=source)
    assert history(whole.out)[(1, "b")] == ("2.5", "5")
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    train(dataclasses.replace(parts, max_steps=4), balance=source)
    last = train(dataclasses.replace(parts, resume=True), balance=source)
    from edtools.models import load_components

    a, b = load_components(whole.checkpoint).unet, load_components(last.checkpoint).unet
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert history(last.out) == history(whole.out)
