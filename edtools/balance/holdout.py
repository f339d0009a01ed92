"""Validation images: a seeded share of each concept folder held out from training, or a separate data root
matched to the training concepts by folder. Held-out images never train.

Pure functions over Datasets: the split is a function of (dataset, share, seed) and keeps each folder's picks
independent of the others.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import numpy as np

from ..dataset.scan import Dataset, DatasetError

__all__ = ["held_out_count", "match_validation_root", "split_validation", "subset"]

_TAG_HOLDOUT = 0xC0  # keeps this random stream apart from the schedule's and the training step's


def held_out_count(n_images: int, share: float) -> int:
    """Images of a folder of n held out: share x n rounded (halves up), at least 1 where the folder has 2 or
    more, and always at least one left to train; none of a single image, none at share 0."""
    if share <= 0 or n_images < 2:
        return 0
    return min(max(1, math.floor(share * n_images + 0.5)), n_images - 1)


def subset(dataset: Dataset, images: np.ndarray) -> Dataset:
    """The dataset of the given image numbers (in ascending order), with each concept's image count updated.
    Concepts keep their order, values and indices, also with no image left."""
    images = np.unique(np.asarray(images, dtype=np.int64))
    return _with_images(dataset, dataset, images, dataset.concept_index[images])


def _with_images(
    concepts_of: Dataset, images_of: Dataset, images: np.ndarray, concept_index: np.ndarray
) -> Dataset:
    """A Dataset of images_of's images (in the given order) under concepts_of's concepts, counts recounted."""
    counts = np.bincount(concept_index, minlength=len(concepts_of.concepts))
    concepts = tuple(
        dataclasses.replace(c, n_images=int(n)) for c, n in zip(concepts_of.concepts, counts, strict=True)
    )
    return Dataset(
        root=images_of.root,
        concepts=concepts,
        paths=tuple(images_of.paths[i] for i in images),
        captions=tuple(images_of.captions[i] for i in images),
        widths=images_of.widths[images].copy(),
        heights=images_of.heights[images].copy(),
        concept_index=np.asarray(concept_index, dtype=np.int32),
    )


def split_validation(dataset: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """(training, validation): held_out_count(n, share) images of each concept go to validation, chosen by a
    generator seeded by (seed, the folder's path), so adding a folder leaves the other folders' picks alone."""
    if not 0 <= share < 1 or not math.isfinite(share):
        raise ValueError(f"validation_split is {share}; it must be from 0 to below 1 (e.g. 0.1)")
    held = []
    for index, concept in enumerate(dataset.concepts):
        images = dataset.images_of(index)
        k = held_out_count(len(images), share)
        if k:
            key = zlib.crc32(concept.path.encode("utf-8"))
            rng = np.random.default_rng([seed, _TAG_HOLDOUT, key])
            held.append(images[rng.permutation(len(images))[:k]])
    held_out = np.concatenate(held) if held else np.zeros(0, dtype=np.int64)
    keep = np.setdiff1d(np.arange(len(dataset)), held_out)
    return subset(dataset, keep), subset(dataset, held_out)


def match_validation_root(training: Dataset, validation: Dataset) -> Dataset:
    """A separate validation data root with its concepts in the training dataset's order (folders it lacks
    get no validation). A folder that does not exist among the training concepts is an error."""
    known = {c.path: i for i, c in enumerate(training.concepts)}
    unknown = sorted(c.path for c in validation.concepts if c.path not in known)
    if unknown:
        raise DatasetError(
            f"validation_root {validation.root} has folder(s) {', '.join(unknown)} that are not concept "
            f"folders of data_root {training.root} ({', '.join(known)}); name its folders like the training ones"
        )
    mapping = np.array([known[c.path] for c in validation.concepts], dtype=np.int32)
    order = np.argsort(mapping[validation.concept_index], kind="stable")
    return _with_images(training, validation, order, mapping[validation.concept_index][order])
