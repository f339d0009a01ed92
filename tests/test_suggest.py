"""Suggestions from a run's records: lower a concept whose validation loss rises while its training loss falls,
raise one that lags behind the others, keep the rest; nothing is written unless asked.

The rules are --auto-balance's (edtools.balance.autobalance): one step is x1.5 or /1.5 (it was x2 or /2 before the
suggestions and the controller shared their rules; a smaller step is safer for a controller that repeats it
every two validations), and a lagging concept is raised only while its validation loss still falls."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from edtools.balance.suggest import format_suggestions, suggest
from edtools.cli import main


def validation(curves: dict[str, list[float]]) -> list[dict[str, str]]:
    return [
        {"step": str(10 * i), "epoch": str(i), "concept": c, "loss": str(v), "images": "2"}
        for c, values in curves.items()
        for i, v in enumerate(values)
    ]


def history(multipliers: dict[str, float]) -> list[dict[str, str]]:
    return [{"epoch": "0", "concept": c, "multiply": str(m)} for c, m in multipliers.items()]


def training(curves: dict[str, list[float]]) -> list[dict[str, str]]:
    return [
        {"epoch": str(i), "concept": c, "loss": str(v)} for c, vs in curves.items() for i, v in enumerate(vs)
    ]


def test_rising_validation_with_falling_training_loss_is_lowered():
    (bob,) = [
        s
        for s in suggest(
            validation({"bob": [0.20, 0.12, 0.14], "alice": [0.20, 0.15, 0.12]}),
            history({"bob": 4, "alice": 1}),
            training({"bob": [0.2, 0.1, 0.05], "alice": [0.2, 0.16, 0.13]}),
        )
        if s.concept == "bob"
    ]
    assert (bob.multiplier, bob.suggested) == (4.0, 2.667)  # 4 / 1.5, to 4 significant digits
    assert bob.reason == (
        "validation loss rose 17% since its best at step 10 (0.12 -> 0.14) while its training loss fell 75%: "
        "it is memorising its images; lower it"
    )


def test_a_lagging_concept_is_raised_and_the_others_kept():
    result = {
        s.concept: s
        for s in suggest(
            validation({"rare": [0.30, 0.29], "a": [0.30, 0.20], "b": [0.30, 0.21]}),
            history({"rare": 1, "a": 1, "b": 1}),
        )
    }
    assert result["rare"].suggested == 1.5 and "lags behind; raise it" in result["rare"].reason
    assert "improved 3% (0.3 -> 0.29) while the other concepts improved 32% (median)" in result["rare"].reason
    assert not result["a"].changes and result["a"].reason.endswith("in step with the others; keep it")
    table = format_suggestions(list(result.values()))
    assert table.splitlines()[0].startswith("concept") and "1.5*" in table


def test_a_lagging_concept_whose_loss_went_up_is_kept():
    # the shared rule raises a lagging concept only while it still falls: more repeats of a concept whose
    # validation loss turned up would feed memorising, not learning
    result = {
        s.concept: s
        for s in suggest(
            validation({"rare": [0.30, 0.28, 0.29], "a": [0.30, 0.25, 0.20], "b": [0.30, 0.24, 0.21]}),
            history({"rare": 1, "a": 1, "b": 1}),
        )
    }
    assert not result["rare"].changes


def test_one_validation_is_not_enough():
    assert suggest(validation({"a": [0.3]}), history({"a": 1})) == []
    assert "at least two" in format_suggestions([])


def write_csv(path: Path, rows: list[dict[str, str]]) -> None:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_cli_suggests_and_applies_only_when_asked(tree, tmp_path, capsys):
    root = tree({"rare": 2, "a": 2, "b": 2})
    run = tmp_path / "run"
    run.mkdir()
    write_csv(run / "validation.csv", validation({"rare": [0.30, 0.29], "a": [0.30, 0.20], "b": [0.3, 0.21]}))
    write_csv(run / "balance_history.csv", history({"rare": 1.5, "a": 1, "b": 1}))
    assert main(["suggest", str(run)]) == 0
    out = capsys.readouterr().out
    assert "rare" in out and "nothing was written" in out and not (root / "rare" / "multiply.txt").exists()
    assert main(["suggest", str(run), "--apply"]) == 2  # no checkpoint names the data root
    assert "give --data-root" in capsys.readouterr().err
    assert main(["suggest", str(run), "--apply", "--data-root", str(root)]) == 0
    assert (root / "rare" / "multiply.txt").read_text().strip() == "2.25"  # 1.5 x 1.5
    assert not (root / "a" / "multiply.txt").exists()
    assert main(["suggest", str(tmp_path)]) == 2
    assert "no validation.csv" in capsys.readouterr().err


@pytest.mark.slow
def test_suggest_reads_a_real_run(tree, tmp_path, capsys):
    pytest.importorskip("torch")
    from edtools.config import TrainConfig
    from edtools.models import make_tiny_model
    from edtools.train import train

    root = tree({"a": 4, "b": 3})
    model = make_tiny_model(tmp_path / "tiny")
    config = TrainConfig(
        data_root=str(root), model=str(model), out=str(tmp_path / "run"), epochs=2, batch_size=2, resolution=64,
        lr=1e-3, device="cpu", progress_bar=False, validation_split=0.3,
    )  # fmt: skip
    train(config)
    assert main(["suggest", config.out]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("concept") and {line.split()[0] for line in out[1:3]} == {"a", "b"}
