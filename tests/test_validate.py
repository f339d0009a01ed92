"""Validation loss per concept: a function of the weights alone (fixed noise and timesteps per held-out image),
the same in two identical runs, recorded in validation.csv, sent as events; held-out images never train."""

from __future__ import annotations

import csv
import dataclasses
from pathlib import Path

import pytest
from conftest import train_config

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from edtools.balance.holdout import split_validation  # noqa: E402
from edtools.balance.schedule import make_buckets  # noqa: E402
from edtools.dataset.scan import load_dataset  # noqa: E402
from edtools.models import load_components  # noqa: E402
from edtools.train import train  # noqa: E402
from edtools.train.validate import TIMESTEPS_PER_IMAGE, Validator, validation_timesteps  # noqa: E402

make_config = train_config


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def test_timesteps_are_stratified_fixed_and_per_image():
    steps = validation_timesteps(5, "a/x.png", 1000)
    assert len(steps) == TIMESTEPS_PER_IMAGE == 4
    assert [s // 250 for s in steps] == [0, 1, 2, 3]  # one in each quarter
    assert steps == validation_timesteps(5, "a/x.png", 1000)
    assert steps != validation_timesteps(5, "a/y.png", 1000) != validation_timesteps(6, "a/x.png", 1000)


def test_validator_depends_on_the_weights_only(tree, tiny_model):
    dataset = load_dataset(tree({"a": 4, "b": 3}, sizes=((64, 64), (96, 64))))
    training, held = split_validation(dataset, 0.5, seed=1)
    config = make_config(dataset.root, tiny_model, dataset.root / "out")
    validator = Validator(held, config, make_buckets(64))
    components = load_components(str(tiny_model))
    components.unet.train()
    torch.manual_seed(123)
    first = validator.evaluate(components, "cpu", text_frozen=True)
    torch.manual_seed(999)  # the global random state does not matter
    again = Validator(held, config, make_buckets(64)).evaluate(components, "cpu", text_frozen=False)
    assert first == again and set(first) == {"a", "b"}
    assert first["a"][1] == 2 and first["b"][1] == 2  # images per concept
    assert all(loss > 0 for loss, _ in first.values())
    assert components.unet.training  # modes are put back
    # measure() gives the same losses, and with the training images the gap to a sample of them
    with_training = Validator(held, config, make_buckets(64), 1000, training)
    measures = with_training.measure(components, "cpu", text_frozen=True)
    assert measures.results() == first and components.unet.training
    assert set(measures.gap) == {"a", "b"} and measures.train_loss["a"] != measures.loss["a"]
    assert set(measures.bleed) == {("a", "b"), ("b", "a")}  # captions "a" and "b" differ
    with torch.no_grad():
        components.unet.conv_in.weight.mul_(1.5)
    assert validator.evaluate(components, "cpu", text_frozen=True) != first


def test_an_image_that_vanishes_is_left_out_with_a_warning(tree, tiny_model, caplog):
    dataset = load_dataset(tree({"a": 4, "b": 4}, sizes=((64, 64),)))
    training, held = split_validation(dataset, 0.5, seed=1)
    config = make_config(dataset.root, tiny_model, dataset.root / "out")
    components = load_components(str(tiny_model))
    before = Validator(held, config, make_buckets(64), 1000, training).measure(
        components, "cpu", text_frozen=True
    )
    validator = Validator(held, config, make_buckets(64), 1000, training)
    gone = [p for p in held.paths if p.startswith("a/")][0]
    (dataset.root / gone).unlink()  # a synced drive dropped it before the first validation
    with caplog.at_level("WARNING", logger="edtools"):
        measures = validator.measure(components, "cpu", text_frozen=True)
    assert measures.images == {"a": 1, "b": 2}
    assert measures.loss["b"] == before.loss["b"] and measures.loss["a"] != before.loss["a"]
    assert gone in caplog.text and "left out" in caplog.text
    caplog.clear()
    assert validator.measure(components, "cpu", text_frozen=True) == measures  # said once, the same numbers
    assert "left out" not in caplog.text


@pytest.mark.slow
def test_validation_in_runs_identical_and_independent_of_the_learning_rate(tree, tiny_model, tmp_path):
    root = tree({"people/alice": 5, "people/bob": 3, "single": 1})
    config = make_config(root, tiny_model, tmp_path / "one", validation_split=0.3)
    events = []
    result = train(config, events.append)
    again = train(dataclasses.replace(config, out=str(tmp_path / "two")))
    slower = train(dataclasses.replace(config, out=str(tmp_path / "slow"), lr=1e-6))
    one, two = (Path(r.out) / "validation.csv" for r in (result, again))
    assert one.read_text() == two.read_text()  # two identical runs, identical validation
    table = rows(one)
    steps = sorted({int(r["step"]) for r in table})
    assert steps[0] == 0 and len(steps) == 3  # before training and after each of the 2 epochs
    assert {r["concept"] for r in table} == {"people/alice", "people/bob"}  # a single image is never held out
    first = [r for r in table if r["step"] == "0"]
    assert first == [r for r in rows(Path(slower.out) / "validation.csv") if r["step"] == "0"]
    assert {r["concept"]: r["images"] for r in first} == {"people/alice": "2", "people/bob": "1"}
    validations = [e for e in events if e.kind == "validation"]
    assert [e.global_step for e in validations] == steps
    assert validations[-1].loss_per_concept["people/bob"] == pytest.approx(
        float(next(r["loss"] for r in table if int(r["step"]) == steps[-1] and r["concept"] == "people/bob")),
        rel=1e-5,
    )
    held = (Path(result.out) / "validation_images.txt").read_text().splitlines()[1:]
    training, validation = split_validation(load_dataset(root), 0.3, config.seed)
    assert held == list(validation.paths) and len(held) == 3
    # step events number the training images: every one trained, and none of them is held out
    trained = {training.paths[i] for e in events if e.kind == "step" for i in e.images}
    assert trained == set(training.paths) and not trained & set(held)
    assert (Path(result.out) / "validation.png").stat().st_size > 1000


@pytest.mark.slow
def test_validation_survives_stop_and_resume_exactly(tree, tiny_model, tmp_path):
    root = tree({"a": 5, "b": 4})
    config = make_config(root, tiny_model, tmp_path / "whole", validation_split=0.25, validate_every_steps=2)
    whole = train(config)
    parts = dataclasses.replace(config, out=str(tmp_path / "parts"))
    train(dataclasses.replace(parts, max_steps=3))
    with open(Path(parts.out) / "validation.csv", "a") as file:  # rows of a run that died before a checkpoint
        file.write("99,1,a,0.5,1,0.25,0.25\n")
    with open(Path(parts.out) / "bleed.csv", "a") as file:
        file.write("99,1,a,b,0.5\n")
    last = train(dataclasses.replace(parts, resume=True))
    assert last.global_step == whole.global_step
    for name in ("validation.csv", "bleed.csv", "balance_history.csv", "training_loss.csv"):
        assert (Path(parts.out) / name).read_text() == (Path(whole.out) / name).read_text(), name
