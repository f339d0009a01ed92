"""Concept bleed: each concept's prompt (its most frequent caption, or the one set per folder) and the margin
table, how much worse a concept's held-out images are predicted under another concept's prompt than their own.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

import numpy as np

from ..config import ConfigError
from ..dataset.scan import Dataset

__all__ = ["bleed_margins", "concept_prompts", "most_frequent_caption"]


def most_frequent_caption(captions: Sequence[str]) -> str | None:
    """The caption met most often; ties go to the first in sorted order (so the choice never depends on the
    order the images were found in). None for no captions."""
    if not captions:
        return None
    counts = Counter(captions)
    best = max(counts.values())
    return min(c for c, n in counts.items() if n == best)


def concept_prompts(
    training: Dataset, held_out: Dataset | None = None, chosen: Mapping[str, str] | None = None
) -> tuple[str | None, ...]:
    """One prompt per concept of `training` (in its order): the one `chosen` for its folder, else its most
    frequent training caption (its held-out captions when none trains). A chosen folder that is not a concept
    is an error naming the known ones."""
    chosen = dict(chosen or {})
    known = training.concept_paths
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ConfigError(
            f"concept_prompts names folder(s) {', '.join(map(repr, unknown))} that are not concepts of "
            f"{training.root}; concepts: {', '.join(known)}"
        )
    prompts = []
    for index, concept in enumerate(training.concepts):
        if concept.path in chosen:
            prompts.append(chosen[concept.path])
            continue
        captions = [training.captions[i] for i in training.images_of(index)]
        if not captions and held_out is not None:
            captions = [held_out.captions[i] for i in held_out.images_of(index)]
        prompts.append(most_frequent_caption(captions))
    return tuple(prompts)


def bleed_margins(
    concepts: Sequence[str],
    image_concept: Sequence[int],
    own: Sequence[float],
    under: Sequence[Mapping[int, float]],
) -> dict[tuple[str, str], float]:
    """{(concept, other): mean over the concept's scored images of (loss under other's prompt - loss under the
    image's own caption)}. image_concept, own, under: per scored image, its concept's index, its own-caption
    loss and {other concept's index: loss under that concept's prompt}. A pair is left out when none of the
    concept's images was scored under the other's prompt (that concept has no prompt)."""
    sums: dict[tuple[int, int], float] = {}
    counts: dict[tuple[int, int], int] = {}
    for concept, loss, losses in zip(image_concept, own, under, strict=True):
        for other, value in losses.items():
            key = (int(concept), int(other))
            sums[key] = sums.get(key, 0.0) + (float(value) - float(loss))
            counts[key] = counts.get(key, 0) + 1
    return {
        (concepts[c], concepts[o]): float(np.float64(sums[(c, o)]) / counts[(c, o)]) for c, o in sorted(sums)
    }
