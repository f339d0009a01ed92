"""Memorisation gap and concept bleed: each concept's prompt, margins of exactly 0 between folders of the same
captions, non-zero ones between different captions, identical records in identical runs, a gap that widens for
a concept trained on few images many times, the settings, the plots and the notebook's live view."""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import numpy as np
import pytest
from conftest import make_image, train_config

from edtools.config import ConfigError, TrainConfig
from edtools.dataset.scan import load_dataset
from edtools.flags import add_arguments, from_args, to_args
from edtools.train.bleed import bleed_margins, concept_prompts, most_frequent_caption
from edtools.train.events import TrainEvent


def rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


def captioned_tree(root: Path, spec: dict[str, list[str]]) -> Path:
    """A data root whose images carry the given captions (one .txt per image)."""
    for folder, captions in spec.items():
        for i, caption in enumerate(captions):
            image = make_image(root / folder / f"img_{i:03d}.png")
            image.with_suffix(".txt").write_text(caption, encoding="utf-8")
    return root


# ---- prompts and margins (pure)


def test_most_frequent_caption_and_ties_go_to_the_first_in_sorted_order():
    assert most_frequent_caption(["b", "a", "b"]) == "b"
    assert most_frequent_caption(["zeta", "alpha", "mid"]) == "alpha"  # a three-way tie
    assert most_frequent_caption(["b", "a", "a", "b", "c"]) == "a"
    assert most_frequent_caption([]) is None


def test_concept_prompts_take_the_chosen_prompt_per_folder_and_refuse_unknown_folders(tmp_path):
    root = captioned_tree(
        tmp_path / "root", {"alice": ["photo of alice", "alice", "alice"], "bob": ["bob smiling", "a bob"]}
    )
    dataset = load_dataset(root)
    assert concept_prompts(dataset) == ("alice", "a bob")
    assert concept_prompts(dataset, chosen={"bob": "a photo of bob"}) == ("alice", "a photo of bob")
    with pytest.raises(ConfigError, match=r"'carol'.*concepts: alice, bob"):
        concept_prompts(dataset, chosen={"carol": "x"})


def test_margins_are_means_of_the_differences_per_pair():
    margins = bleed_margins(
        ["a", "b"],
        [0, 0, 1],
        [1.0, 2.0, 0.5],
        [{1: 1.5}, {1: 2.25}, {0: 0.5}],
    )
    assert margins == {("a", "b"): 0.375, ("b", "a"): 0.0}


# ---- settings


def test_bleed_settings_from_flags_files_and_their_errors(tmp_path):
    base = {"data_root": "d", "model": "m", "out": "o"}
    assert TrainConfig(**base).bleed_images == 8 and TrainConfig(**base).concept_prompts == ()
    with pytest.raises(ConfigError, match=r"bleed_images is -1; it must be >= 0"):
        TrainConfig(**base, bleed_images=-1)
    with pytest.raises(ConfigError, match=r"concept_prompts\['a'\] is ' ' \(str\); it must be non-empty"):
        TrainConfig(**base, concept_prompts={"a": " "})
    parser = add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(
        ["--data-root", "d", "--model", "m", "--out", "o", "--bleed-images", "0"]
        + ["--concept-prompts", "people/bob=a photo of bob, smiling", "style=ink = wash"]
    )
    config = from_args(args)
    assert config.bleed_images == 0
    assert config.prompt_overrides == {"people/bob": "a photo of bob, smiling", "style": "ink = wash"}
    assert from_args(parser.parse_args(to_args(config))) == config
    assert TrainConfig.from_file(config.to_file(tmp_path / "run.yaml")) == config
    with pytest.raises(SystemExit):
        parser.parse_args(["--concept-prompts", "no-prompt"])


# ---- measured on the tiny model

torch_needed = pytest.mark.skipif(
    not all(__import__("importlib").util.find_spec(m) for m in ("torch", "diffusers")),
    reason="needs torch and diffusers",
)


@torch_needed
def test_same_captions_give_margins_of_exactly_zero_and_different_ones_do_not(tmp_path, tiny_model):
    from edtools.balance.holdout import split_validation
    from edtools.balance.schedule import make_buckets
    from edtools.models import load_components
    from edtools.train.validate import Validator

    root = captioned_tree(
        tmp_path / "root",
        {
            "x/twin": ["a red square"] * 4,
            "y/twin": ["a red square"] * 4,
            "z/other": ["a green circle"] * 4,
        },
    )
    training, held = split_validation(load_dataset(root), 0.5, seed=3)
    config = train_config(root, tiny_model, tmp_path / "out", bleed_images=1)
    validator = Validator(held, config, make_buckets(64), 1000, training)
    components = load_components(str(tiny_model))
    measures = validator.measure(components, "cpu", text_frozen=True)
    assert measures.results() == validator.evaluate(components, "cpu", text_frozen=True)  # same losses
    assert measures.bleed[("x/twin", "y/twin")] == 0.0 and measures.bleed[("y/twin", "x/twin")] == 0.0
    for pair in [("x/twin", "z/other"), ("z/other", "x/twin"), ("z/other", "y/twin")]:
        assert measures.bleed[pair] != 0.0, pair
    assert len(measures.bleed) == 6  # every concept under every other concept's prompt
    # a training sample as large as each concept's held-out share, judged like it: the gap is their difference
    assert [i.path for i in validator.train_images] == sorted(i.path for i in validator.train_images) and len(
        validator.train_images
    ) == 6
    assert not {i.path for i in validator.train_images} & set(held.paths)
    for concept, gap in measures.gap.items():
        assert gap == measures.loss[concept] - measures.train_loss[concept]
    off = Validator(held, dataclasses.replace(config, bleed_images=0), make_buckets(64), 1000, training)
    assert off.measure(components, "cpu", text_frozen=True).bleed == {}


@pytest.mark.slow
@torch_needed
def test_identical_runs_write_identical_gap_and_bleed_records(tmp_path, tiny_model):
    from edtools.train import train

    root = captioned_tree(
        tmp_path / "root",
        {"alice": ["alice"] * 3, "alice_too": ["alice"] * 3, "bob": ["a bob", "bob", "bob"]},
    )
    config = train_config(root, tiny_model, tmp_path / "one", validation_split=0.34, epochs=1)
    events = []
    train(config, events.append)
    train(dataclasses.replace(config, out=str(tmp_path / "two")))
    for name in ("validation.csv", "bleed.csv"):
        assert (tmp_path / "one" / name).read_text() == (tmp_path / "two" / name).read_text(), name
    validation = rows(tmp_path / "one" / "validation.csv")
    assert list(validation[0]) == ["step", "epoch", "concept", "loss", "images", "train_loss", "gap"]
    for row in validation:
        assert float(row["gap"]) == pytest.approx(float(row["loss"]) - float(row["train_loss"]), abs=2e-5)
    bleed = rows(tmp_path / "one" / "bleed.csv")
    assert list(bleed[0]) == ["step", "epoch", "concept", "under", "margin"]
    end = validation[-1]["step"]
    assert {r["step"] for r in bleed} == {"0", end} != {"0"} and len(bleed) == 2 * 6
    margins = {(r["step"], r["concept"], r["under"]): float(r["margin"]) for r in bleed}
    assert margins[(end, "alice", "alice_too")] == 0.0 == margins[(end, "alice_too", "alice")]
    assert margins[(end, "bob", "alice")] != 0.0 and margins[(end, "alice", "bob")] != 0.0
    last = [e for e in events if e.kind == "validation"][-1]
    assert last.bleed[("bob", "alice")] == pytest.approx(margins[(end, "bob", "alice")], rel=1e-5)
    assert set(last.gap_per_concept) == set(last.train_loss_per_concept) == {"alice", "alice_too", "bob"}
    for picture in ("validation.png", "bleed.png"):
        assert (tmp_path / "one" / picture).stat().st_size > 1000


@pytest.mark.slow
@torch_needed
def test_a_concept_trained_many_times_on_few_images_shows_its_gap_widening(tmp_path, tree, tiny_model):
    from edtools.train import train

    root = tree({"rep": 4, "other": 6})
    config = train_config(
        root,
        tiny_model,
        tmp_path / "out",
        validation_split=0.5,
        validate_every_steps=7,
        epochs=1,
        multipliers={"rep": 20.0},  # its 2 training images, 20 times an epoch
    )
    train(config)
    table = rows(tmp_path / "out" / "validation.csv")
    gaps = [float(r["gap"]) for r in table if r["concept"] == "rep"]
    others = [float(r["gap"]) for r in table if r["concept"] == "other"]
    assert len(gaps) == len(others) == 5  # steps 0, 7, 14, 21 and the epoch's end
    assert gaps[0] < 0.0 < gaps[-1]  # before training: no memorisation; after: its own images are easier
    assert all(
        later > earlier for earlier, later in zip(gaps[:-1], gaps[1:], strict=True)
    )  # wider at every validation
    assert gaps[-1] - gaps[0] > 0.03 > others[-1] - others[0]  # the folder trained once per epoch does not


# ---- records and plots


def test_records_trim_bleed_on_resume_and_renew_an_old_header(tmp_path):
    from edtools.train.records import append_bleed, append_validation, plot_records, trim_records

    out = tmp_path / "out"
    (out).mkdir()
    (out / "validation.csv").write_text("step,epoch,concept,loss,images\n0,0,a,0.5,2\n")
    append_validation(out, 4, 1, {"a": (0.25, 2), "b": (0.5, 1)}, {"a": 0.125}, {"a": 0.125})
    assert rows(out / "validation.csv") == [
        {"step": "0", "epoch": "0", "concept": "a", "loss": "0.5", "images": "2", "train_loss": "", "gap": ""},
        {"step": "4", "epoch": "1", "concept": "a", "loss": "0.25", "images": "2", "train_loss": "0.125",
         "gap": "0.125"},
        {"step": "4", "epoch": "1", "concept": "b", "loss": "0.5", "images": "1", "train_loss": "", "gap": ""},
    ]  # fmt: skip
    append_bleed(out, 0, 0, {})
    assert not (out / "bleed.csv").exists()
    append_bleed(out, 0, 0, {("a", "b"): 0.0, ("b", "a"): 0.25})
    append_bleed(out, 4, 1, {("a", "b"): 0.5, ("b", "a"): -0.25})
    trim_records(out, global_step=2, epoch=1)
    assert [r["step"] for r in rows(out / "bleed.csv")] == ["0", "0"]
    append_bleed(out, 4, 1, {("a", "b"): 0.5, ("b", "a"): -0.25})
    dataset = load_dataset(captioned_tree(tmp_path / "root", {"a": ["a"] * 2, "b": ["b"] * 2}))
    plot_records(out, dataset)
    assert (out / "bleed.png").stat().st_size > 1000 and (out / "validation.png").stat().st_size > 1000


def test_bleed_matrix_has_concept_rows_and_prompt_columns():
    from edtools.train.metric_plots import bleed_matrix

    concepts, unders, matrix = bleed_matrix({("a", "b"): 0.5, ("b", "a"): 0.0, ("b", "c"): 1.0})
    assert concepts == ["a", "b"] and unders == ["a", "b", "c"]
    assert np.array_equal(matrix, np.array([[np.nan, 0.5, np.nan], [0.0, np.nan, 1.0]]), equal_nan=True)


def test_the_notebook_view_redraws_gap_and_bleed_from_validation_events():
    pytest.importorskip("ipywidgets")
    from edtools.widgets.metrics import MetricsView

    view = MetricsView()
    assert view.gap_image.layout.display == "none" and view.bleed_image.layout.display == "none"
    view.add(TrainEvent("validation", 0, 0, gap_per_concept={"a": -0.01, "b": 0.0}))
    assert view.gap_image.value[:4] == b"\x89PNG" and view.bleed_image.layout.display == "none"
    bleed = {("a", "b"): 0.02, ("b", "a"): 0.0}
    view.add(TrainEvent("validation", 5, 1, gap_per_concept={"a": 0.03, "b": 0.01}, bleed=bleed))
    assert view.gaps["a"] == ([0, 5], [-0.01, 0.03]) and view.bleed == bleed and view.bleed_step == 5
    assert view.bleed_image.value[:4] == b"\x89PNG" and view.bleed_image.layout.display == ""
    assert "edtools-bleed-heatmap" in view.bleed_image._dom_classes
    assert "edtools-gap-chart" in view.gap_image._dom_classes
    view.reset()
    assert view.gaps == {} and view.bleed_image.layout.display == "none"


@torch_needed
def test_sdxl_with_cached_text_scores_a_chosen_prompt(tmp_path, tree):
    """The prompt set for a folder is in the run's text cache (the encoders have left for the CPU), and the
    SDXL path with pooled embeddings and size conditioning measures bleed like SD 1.x; an unknown folder is
    refused before training."""
    from edtools.models import make_tiny_model
    from edtools.train import train

    model = make_tiny_model(tmp_path / "sdxl", "sdxl")
    root = tree({"a": 4, "b": 4})
    config = train_config(
        root,
        model,
        tmp_path / "out",
        validation_split=0.5,
        epochs=1,
        max_steps=1,
        train_text_encoder=False,
        cache_text_embeddings=True,
        concept_prompts={"b": "a watercolour of b"},
    )
    events = []
    train(config, events.append)
    bleed = [e.bleed for e in events if e.kind == "validation"][0]
    assert set(bleed) == {("a", "b"), ("b", "a")} and all(m != 0.0 for m in bleed.values())
    with pytest.raises(ConfigError, match="'c'"):
        train(
            dataclasses.replace(
                config, out=str(tmp_path / "two"), concept_prompts=(("c", "x"),), max_steps=None
            )
        )
