"""Automatic balance rules on synthetic records: raise a lagging concept that still falls, lower one whose gap
widens, whose held-out loss rises from its best or that dominates a bleeding pair; bounds, locks and spacing."""

from __future__ import annotations

import pytest

from edtools.balance.autobalance import (
    Change,
    History,
    Rules,
    balance_state,
    check_bounds,
    decide,
    judge,
    round_multiplier,
    verdicts,
)


def validation(
    curves: dict[str, list[float]], gaps: dict[str, list[float]] | None = None
) -> tuple[dict, ...]:
    """One validation per epoch (step 10 * i, epochs done i), optionally with the gap column."""
    rows = []
    for concept, values in curves.items():
        for i, v in enumerate(values):
            row = {"step": str(10 * i), "epoch": str(i), "concept": concept, "loss": str(v), "images": "2"}
            if gaps is not None:
                row["gap"] = str(gaps.get(concept, [0.0] * len(values))[i])
            rows.append(row)
    return tuple(rows)


def balance(epochs: list[dict[str, tuple]]) -> tuple[dict, ...]:
    """Rows of balance_history.csv: per epoch {concept: (multiply, user_multiply, expected, reason)}."""
    return tuple(
        {
            "epoch": str(e),
            "concept": c,
            "multiply": str(m),
            "loss_scale": "1",
            "expected": str(n),
            "actual": str(n),
            "user_multiply": str(u),
            "reason": r,
        }
        for e, values in enumerate(epochs)
        for c, (m, u, n, r) in values.items()
    )


LAGGING = {"rare": [0.30, 0.295, 0.29], "a": [0.30, 0.25, 0.20], "b": [0.30, 0.24, 0.21]}


def test_a_lagging_concept_that_still_falls_is_raised():
    history = History(validation=validation(LAGGING))
    ones = {"rare": 1.0, "a": 1.0, "b": 1.0}
    (change,) = decide(history, ones, ones)
    assert (change.concept, change.old, change.new) == ("rare", 1.0, 1.5)
    assert "lags behind; raise it" in change.reason and "still falls" in change.reason


def test_a_lagging_concept_that_no_longer_falls_is_kept():
    curves = {**LAGGING, "rare": [0.30, 0.28, 0.29]}  # its last validation went up: more repeats won't help
    ones = {"rare": 1.0, "a": 1.0, "b": 1.0}
    assert decide(History(validation=validation(curves)), ones, ones) == ()
    assert verdicts(History(validation=validation(curves)))["rare"].factor == 1.0


def test_a_widening_gap_lowers_a_heavily_repeated_concept():
    # "heavy" is repeated 8x: its held-out loss still looks fine, but it pulls away from its training images
    curves = {"heavy": [0.30, 0.22, 0.21, 0.205], "light": [0.30, 0.25, 0.22, 0.20]}
    gaps = {"heavy": [0.0, 0.01, 0.03, 0.06], "light": [0.0, 0.0, 0.001, 0.0]}
    history = History(validation=validation(curves, gaps))
    assert judge(history)["heavy"].gap_growth == pytest.approx(0.05 / 0.205)
    assert judge(history)["light"].gap_growth is None
    (change,) = decide(history, {"heavy": 8.0, "light": 1.0}, {"heavy": 8.0, "light": 1.0})
    assert change == Change("heavy", 8.0, round_multiplier(8 / 1.5), change.reason)
    assert "gap between its held-out and training loss widened" in change.reason


def test_without_a_gap_column_the_gap_rule_is_silent():
    curves = {"heavy": [0.30, 0.22, 0.21, 0.205], "light": [0.30, 0.25, 0.22, 0.20]}
    history = History(validation=validation(curves))  # validation.csv of a run before the gap column
    assert judge(history)["heavy"].gap_growth is None
    assert decide(history, {"heavy": 8.0, "light": 1.0}, {"heavy": 8.0, "light": 1.0}) == ()


def test_held_out_loss_rising_from_its_best_lowers_it():
    history = History(validation=validation({"bob": [0.20, 0.12, 0.14], "alice": [0.20, 0.15, 0.12]}))
    (change,) = decide(history, {"bob": 4.0, "alice": 1.0}, {"bob": 4.0, "alice": 1.0})
    assert (change.concept, change.new) == ("bob", round_multiplier(4 / 1.5))
    assert change.reason.startswith("validation loss rose 17% since its best at step 10 (0.12 -> 0.14)")


def test_a_bleeding_pair_lowers_the_one_with_more_images_per_epoch():
    curves = {"dog": [0.3, 0.25, 0.22], "puppy": [0.3, 0.26, 0.21]}  # both fine on their own
    bleed = (
        {"step": "10", "epoch": "1", "concept": "puppy", "under": "dog", "margin": "0.2"},
        {"step": "20", "epoch": "2", "concept": "puppy", "under": "dog", "margin": "0.01"},
    )
    history = History(
        validation=validation(curves),
        bleed=bleed,
        balance=balance([{"dog": (3, 3, 60, ""), "puppy": (1, 1, 10, "")}]),
    )
    (change,) = decide(history, {"dog": 3.0, "puppy": 1.0}, {"dog": 3.0, "puppy": 1.0})
    assert (change.concept, change.old, change.new) == ("dog", 3.0, 2.0)
    said = "bleeds with puppy (the margin of puppy under dog's prompt fell from 0.2 at step 10 to 0.01, its lowest yet)"
    assert said in change.reason
    assert "60 vs 10" in change.reason
    # told apart again at the latest step: no bleed
    apart = (*bleed, {"step": "30", "epoch": "3", "concept": "puppy", "under": "dog", "margin": "0.3"})
    history = History(validation=validation(curves), bleed=apart, balance=history.balance)
    assert decide(history, {"dog": 3.0, "puppy": 1.0}, {"dog": 3.0, "puppy": 1.0}) == ()


def bleed_rows(margins: list[float]) -> tuple[dict, ...]:
    """bleed.csv rows of the pair (rare under common) at steps 0, 10, 20, ..."""
    return tuple(
        {"step": str(10 * i), "epoch": str(i), "concept": "rare", "under": "common", "margin": str(m)}
        for i, m in enumerate(margins)
    )


@pytest.mark.parametrize(
    ("margins", "bleeds"),
    [
        ([0.002, 0.0025, 0.003], False),  # a small model's margins are small; growing is no bleed
        ([0.002, 0.0012], False),  # fell, but by less than half of where it started
        ([0.002, 0.0009], True),  # lost more than half
        ([0.002, 0.004, -0.001], True),  # the other prompt now fits the images better
        ([0.002, 0.0005, 0.0008], False),  # it fell, but no longer falls: a change took effect
        ([0.002, 0.0005, 0.0005], False),
        ([0.002, 0.0005, 0.0008, 0.0006], False),  # fell again, but only back into the level it stopped at
        ([0.002, 0.0008, 0.0005], True),  # a new low: still bleeding
        ([0.0, 0.0, 0.0], False),  # same captions: never told apart, and training did not make them so
        ([-0.002, -0.0025], False),
        ([-0.002, -0.0031], True),  # worse than the base model by more than half its size
        ([0.002], False),  # one validation: nothing to compare with
    ],
)
def test_a_pair_bleeds_when_its_margin_fell_from_its_first_validation_to_a_new_low(margins, bleeds):
    history = History(
        validation=validation({"rare": [0.3, 0.25, 0.22], "common": [0.3, 0.25, 0.21]}),
        bleed=bleed_rows(margins),
        balance=balance([{"rare": (10, 10, 60, ""), "common": (1, 1, 30, "")}]),
    )
    verdict = verdicts(history)["rare"]
    assert (verdict.factor < 1 and "bleeds with common" in verdict.reason) == bleeds, verdict.reason
    scaled = History(  # the rule has no scale of its own: margins 100x larger decide the same
        validation=history.validation,
        bleed=bleed_rows([m * 100 for m in margins]),
        balance=history.balance,
    )
    assert verdicts(scaled)["rare"].factor == verdict.factor


def test_bounds_are_relative_to_the_users_value():
    history = History(validation=validation(LAGGING))
    user = {"rare": 2.0, "a": 1.0, "b": 1.0}
    (change,) = decide(history, {**user, "rare": 3.5}, user, bounds=(0.25, 2.0))
    assert (change.new, change.reason.endswith("(its bound)")) == (4.0, True)  # 3.5 x 1.5 capped at 2 x 2
    assert decide(history, {**user, "rare": 4.0}, user, bounds=(0.25, 2.0)) == ()  # at its bound: no change
    for bad in [(0.0, 2.0), (1.5, 2.0), (0.5, 0.9)]:
        with pytest.raises(ValueError, match="0 < low <= 1 <= high"):
            check_bounds(bad)


def test_a_locked_concept_is_never_changed():
    history = History(validation=validation(LAGGING))
    ones = {"rare": 1.0, "a": 1.0, "b": 1.0}
    assert decide(history, ones, ones, locks=frozenset({"rare"})) == ()


def test_the_users_move_locks_a_concept_and_its_value_wins():
    rows = balance(
        [
            {"rare": (1, 1, 10, ""), "a": (1, 1, 10, "")},
            {"rare": (1.5, 1, 15, "lags"), "a": (1, 1, 10, "")},
        ]
    )
    current, locks = balance_state(History(balance=rows), {"rare": 1.0, "a": 1.0})
    assert (current, locks) == ({"rare": 1.5, "a": 1.0}, frozenset())  # the automatic value carries on
    current, locks = balance_state(History(balance=rows), {"rare": 3.0, "a": 1.0})  # a slider moved it
    assert (current, locks) == ({"rare": 3.0, "a": 1.0}, frozenset({"rare"}))
    moved_before = balance([{"a": (1, 1, 10, "")}, {"a": (2, 2, 20, "")}, {"a": (2, 2, 20, "")}])
    assert balance_state(History(balance=moved_before), {"a": 2.0})[1] == frozenset({"a"})


def test_no_second_change_within_two_validations():
    ones = {"rare": 1.0, "a": 1.0, "b": 1.0}
    # raised at the start of epoch 2; validations after it: only the one at the end of epoch 2 (epochs done 3)
    curves = {c: [*v, v[-1] - 0.001] for c, v in LAGGING.items()}
    changed = balance([{}, {}, {"rare": (1.5, 1, 15, "lags")}])
    history = History(validation=validation(curves), balance=changed)
    assert decide(history, {**ones, "rare": 1.5}, ones) == ()
    curves = {c: [*v, v[-1] - 0.002] for c, v in curves.items()}  # and one more: it may move again
    history = History(validation=validation(curves), balance=changed)
    (change,) = decide(history, {**ones, "rare": 1.5}, ones)
    assert (change.concept, change.new) == ("rare", 2.25)


def test_decisions_are_a_function_of_the_records():
    history = History(validation=validation(LAGGING))
    ones = {"rare": 1.0, "a": 1.0, "b": 1.0}
    assert decide(history, ones, ones) == decide(
        History(validation=tuple(reversed(history.validation))), ones, ones
    )
    assert decide(History(), ones, ones) == ()  # no records: no signal
    strict = Rules(lag=0.01)  # a threshold no concept lags behind
    assert decide(history, ones, ones, rules=strict) == ()


def test_round_trip_of_a_multiplier_through_the_csv():
    for value in (1 / 1.5, 8 / 1.5, 0.25 * 3.3333, 4 * 1.5**5):
        rounded = round_multiplier(value)
        assert float(f"{rounded:g}") == rounded


# ---------------------------------------------------------------------------------------------------------
# Settings, the command line and the notebook


def test_settings_need_a_validation_and_sane_bounds(tmp_path):
    from edtools.config import ConfigError, TrainConfig

    base = dict(data_root="d", model="m", out="o")
    config = TrainConfig(**base, auto_balance=True, validation_split=0.1, auto_balance_bounds=[0.5, 2])
    assert config.auto_balance_bounds == (0.5, 2.0) and TrainConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ConfigError, match="auto_balance is True; it decides from the validation loss"):
        TrainConfig(**base, auto_balance=True)
    with pytest.raises(ConfigError, match="set validate_every_epochs"):
        TrainConfig(**base, auto_balance=True, validation_split=0.1, validate_every_epochs=0)
    for bad in ([0, 2], [2, 4], [0.5, 0.8]):
        with pytest.raises(ConfigError, match=r"auto_balance_bounds is .*0 < low <= 1 <= high"):
            TrainConfig(**base, auto_balance_bounds=bad)
    with pytest.raises(ConfigError, match="it must be two numbers"):
        TrainConfig(**base, auto_balance_bounds=[0.5])


def test_the_command_line_flags(tmp_path, capsys):
    import argparse

    from edtools.cli import main
    from edtools.flags import add_arguments, from_args, to_args

    args = ["--data-root", "d", "--model", "m", "--out", "o", "--validation-split", "0.1"]
    parser = add_arguments(argparse.ArgumentParser())
    config = from_args(parser.parse_args([*args, "--auto-balance", "--auto-balance-bounds", "0.5", "3"]))
    assert (config.auto_balance, config.auto_balance_bounds) == (True, (0.5, 3.0))
    assert from_args(parser.parse_args(to_args(config))) == config
    train = [
        "train",
        "--data-root",
        str(tmp_path),
        "--model",
        str(tmp_path / "m"),
        "--out",
        str(tmp_path / "o"),
    ]
    assert main([*train, "--auto-balance"]) == 2  # no validation: a message, not a traceback
    assert "auto_balance" in capsys.readouterr().err
    assert main([*train, "--auto-balance-bounds", "2", "4"]) == 2
    assert "0 < low <= 1 <= high" in capsys.readouterr().err


def test_the_notebook_switch_and_its_marks_in_the_multiplier_history(tree, tmp_path):
    pytest.importorskip("ipywidgets")
    import edtools.widgets as ew
    from edtools.widgets.progress import history_html

    root = tree({"a": 3, "b": 3})
    balance = ew.BalancePanel(ew.DataPanel(root), debounce_s=0)
    training = ew.TrainingPanel(balance, smoke=False)
    training.model.value, training.out.value = str(tmp_path / "model"), str(tmp_path / "run")
    assert training.config().auto_balance is False  # off by default
    training.auto_balance.value = True
    assert training.config().auto_balance is True
    table = history_html([{"a": 1.0}, {"a": 1.5}], ["a"], [{}, {"a": "it lags behind; raise it"}])
    assert "1.5</b><sup>a</sup>" in table and "title='it lags behind; raise it'" in table
    assert "set by auto-balance" in table and "<sup>" not in history_html([{"a": 1.0}], ["a"])


# ---------------------------------------------------------------------------------------------------------
# Real runs of the tiny model


def read_rows(out, name: str) -> list[dict[str, str]]:
    import csv
    from pathlib import Path

    with open(Path(out) / name, newline="") as file:
        return list(csv.DictReader(file))


def lagging_setup(tree, monkeypatch):
    """A data root whose 'rare' concept barely trains (loss_scale 0.01), so its held-out loss improves a
    little less than the others'; lag=0.99 makes that count as lagging in a run of a few epochs (the default
    0.5 waits for a much larger difference than a tiny model shows)."""
    import edtools.balance.autobalance as autobalance

    monkeypatch.setattr(autobalance, "RULES", Rules(lag=0.99))
    root = tree({"a": 5, "b": 5, "rare": 5})
    (root / "rare" / "loss_scale.txt").write_text("0.01")
    return root


@pytest.mark.slow
def test_a_run_raises_its_lagging_concept_and_says_why_once(tree, tiny_model, tmp_path, monkeypatch, caplog):
    pytest.importorskip("torch")
    import logging

    from conftest import train_config

    from edtools.train import train

    root = lagging_setup(tree, monkeypatch)
    # bleed_images=0: the lag rule is under test, and a margin that happens to fall would let the bleed
    # rule lower whichever concept was raised
    config = train_config(
        root, tiny_model, tmp_path / "out", epochs=5, validation_split=0.4, auto_balance=True, lr=3e-3,
        bleed_images=0,
    )  # fmt: skip
    events = []
    with caplog.at_level(logging.INFO, logger="edtools"):
        train(config, events.append)
    rows = read_rows(config.out, "balance_history.csv")
    rare = [r for r in rows if r["concept"] == "rare"]
    assert [r["user_multiply"] for r in rare] == ["1"] * 5  # the user's value never moved
    raised = [r for r in rare if r["reason"]]
    assert raised and "lags behind; raise it" in raised[0]["reason"]
    # the epoch it was raised at trained more of its images (later rules, e.g. a widening gap, may lower it)
    assert float(raised[0]["multiply"]) == 1.5 and int(raised[0]["actual"]) > 3
    # every change (lag=0.99 may catch another concept early on) is logged once, with its reason
    previous: dict[str, str] = {}
    for row in rows:
        if row["reason"]:
            old = previous[row["concept"]]
            line = (
                f"epoch {row['epoch']}: auto-balance {row['concept']} multiply {old} -> {row['multiply']}: "
            )
            assert caplog.text.count(line + row["reason"]) == 1
        else:
            assert row["multiply"] == previous.get(row["concept"], row["multiply"])  # no unexplained change
        previous[row["concept"]] = row["multiply"]
    # the notebook's multiplier history (the epoch events) shows the automatic value
    assert [e.multipliers["rare"] for e in events if e.kind == "epoch"] == [
        float(r["multiply"]) for r in rare
    ]


@pytest.mark.slow
def test_an_auto_balanced_run_stopped_and_resumed_matches_an_uninterrupted_one(
    tree, tiny_model, tmp_path, monkeypatch
):
    torch = pytest.importorskip("torch")
    import dataclasses

    from conftest import train_config

    from edtools.models import load_components
    from edtools.train import train

    root = lagging_setup(tree, monkeypatch)
    config = train_config(
        root, tiny_model, tmp_path / "whole", epochs=5, validation_split=0.4, auto_balance=True, lr=3e-3
    )
    whole = train(config)
    history = read_rows(whole.out, "balance_history.csv")
    changed = [int(r["epoch"]) for r in history if r["reason"]]
    assert changed, "the run must change a multiplier for the resume to have something to repeat"
    # stop one step into the epoch whose start changed a multiplier, then at an epoch's end; resume each time
    steps = {}
    for row in read_rows(whole.out, "validation.csv"):
        steps[int(row["epoch"])] = int(row["step"])
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    first = train(dataclasses.replace(parts, max_steps=steps[changed[0]] + 1))
    assert (first.epoch, first.batch) == (changed[0], 1)
    second = train(dataclasses.replace(parts, resume=True, max_steps=steps[changed[0] + 1]))
    assert (second.epoch, second.batch) == (changed[0] + 1, 0)
    last = train(dataclasses.replace(parts, resume=True))
    assert last.stop_reason == "finished"
    assert read_rows(last.out, "balance_history.csv") == history
    a, b = load_components(whole.checkpoint).unet, load_components(last.checkpoint).unet
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


@pytest.mark.slow
def test_a_run_with_nothing_held_out_says_auto_balance_needs_it(tree, tiny_model, tmp_path):
    pytest.importorskip("torch")
    from conftest import train_config

    from edtools.config import ConfigError
    from edtools.train import train

    root = tree({"a": 1, "b": 1})  # a folder of one image holds nothing out
    config = train_config(root, tiny_model, tmp_path / "out", validation_split=0.5, auto_balance=True)
    with pytest.raises(ConfigError, match="this run holds out no images"):
        train(config)


@pytest.mark.slow
def test_a_heavily_repeated_concept_whose_gap_widens_is_lowered(tree, tiny_model, tmp_path):
    pytest.importorskip("torch")
    from conftest import train_config

    from edtools.train import train

    root = tree({"rep": 4, "other": 6})
    # bleed_images=0: the bleed rule speaks first when a margin falls; here only the gap should
    config = train_config(
        root, tiny_model, tmp_path / "out", validation_split=0.5, validate_every_steps=3, epochs=2,
        multipliers={"rep": 10.0}, auto_balance=True, bleed_images=0,
    )  # fmt: skip
    train(config)
    gaps = [float(r["gap"]) for r in read_rows(config.out, "validation.csv") if r["concept"] == "rep"]
    assert gaps[-1] > gaps[0]  # its 2 training images, 20 times an epoch: it memorises them
    rep = {int(r["epoch"]): r for r in read_rows(config.out, "balance_history.csv") if r["concept"] == "rep"}
    assert (rep[0]["multiply"], rep[1]["multiply"], rep[1]["user_multiply"]) == ("10", "6.667", "10")
    assert "gap between its held-out and training loss widened" in rep[1]["reason"]
