"""Held-out validation images: seeded per folder, at least one of every folder of two or more, never one of a
single-image folder, disjoint from training, unmoved by other folders; a validation root matched by folder."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from edtools.balance.holdout import held_out_count, match_validation_root, split_validation
from edtools.dataset.scan import DatasetError, load_dataset, synthetic_dataset


@pytest.mark.parametrize(
    ("n", "share", "held"),
    [
        (1, 0.5, 0),
        (2, 0.01, 1),
        (2, 0.9, 1),
        (10, 0.1, 1),
        (10, 0.25, 3),
        (10, 0.0, 0),
        (100, 0.1, 10),
        (3, 0.9, 2),
    ],
)
def test_held_out_counts(n, share, held):
    assert held_out_count(n, share) == held


@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=6),
    share=st.floats(0.01, 0.95),
    seed=st.integers(0, 2**31),
)
def test_split_is_a_disjoint_seeded_partition(sizes, share, seed):
    dataset = synthetic_dataset({f"c{i}": (n, 1.0) for i, n in enumerate(sizes)})
    train, validation = split_validation(dataset, share, seed)
    assert sorted(train.paths + validation.paths) == sorted(dataset.paths)
    assert not set(train.paths) & set(validation.paths)
    for concept, t, v in zip(dataset.concepts, train.concepts, validation.concepts, strict=True):
        assert v.n_images == held_out_count(concept.n_images, share)
        assert t.n_images == concept.n_images - v.n_images >= 1
        assert t.path == v.path == concept.path and t.multiplier == concept.multiplier
    again = split_validation(dataset, share, seed)[1]
    assert again.paths == validation.paths  # a function of (dataset, share, seed)
    for i, concept in enumerate(train.concepts):  # images stay under their own concept
        assert all(
            p.startswith(concept.path + "/")
            for p, c in zip(train.paths, train.concept_index, strict=True)
            if c == i
        )


def test_a_new_folder_does_not_move_the_other_folders_picks():
    small = synthetic_dataset({"alice": (20, 1.0), "bob": (9, 1.0)})
    large = synthetic_dataset({"alice": (20, 1.0), "anna": (30, 1.0), "bob": (9, 1.0)})
    picked = lambda d: {p for p in split_validation(d, 0.2, 7)[1].paths if not p.startswith("anna")}  # noqa: E731
    assert picked(small) == picked(large)
    assert split_validation(small, 0.2, 7)[1].paths != split_validation(small, 0.2, 8)[1].paths


def test_bad_share_is_refused():
    with pytest.raises(ValueError, match="validation_split is 1"):
        split_validation(synthetic_dataset({"a": (3, 1.0)}), 1.0, 0)


def test_validation_root_is_matched_by_folder(tree):
    training = load_dataset(tree({"people/alice": 3, "people/bob": 2, "style": 2}))
    validation = match_validation_root(training, load_dataset(tree({"style": 1, "people/alice": 2})))
    assert [c.n_images for c in validation.concepts] == [2, 0, 1]
    assert validation.concept_paths == training.concept_paths
    assert [validation.concept_paths[i] for i in validation.concept_index] == ["people/alice"] * 2 + ["style"]
    assert np.all(np.diff(validation.concept_index) >= 0)
    with pytest.raises(DatasetError, match="folder\\(s\\) people/carol that are not concept folders"):
        match_validation_root(training, load_dataset(tree({"people/carol": 1})))
