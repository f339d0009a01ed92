"""Captions as a step trains them: per-folder dropout and tag shuffling (seeded per slot), then token ids.
Validation always uses the captions as written.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class CaptionSetting:
    """How one concept folder's captions train: the share dropped (empty caption) and whether tags shuffle."""

    dropout: float = 0.0
    shuffle: bool = False


def concept_caption_settings(
    config: Any, concepts: tuple[str, ...] | list[str]
) -> tuple[CaptionSetting, ...]:
    """Each concept's CaptionSetting, in the order given: its own entry in config.caption_dropouts /
    config.shuffle_tags_concepts, else the global caption_dropout / shuffle_tags. A folder named there that is
    not a concept is an error (a typo would otherwise silently train every caption intact)."""
    from ..errors import ConfigError

    known = set(concepts)
    for name, named in (
        ("caption_dropouts", [c for c, _ in config.caption_dropouts]),
        ("shuffle_tags_concepts", list(config.shuffle_tags_concepts)),
    ):
        unknown = sorted(set(named) - known)
        if unknown:
            raise ConfigError(
                f"{name} names folder(s) {', '.join(map(repr, unknown))} that are not concept folders of "
                f"data_root ({', '.join(concepts)}); use their paths relative to data_root"
            )
    dropouts, shuffled = dict(config.caption_dropouts), set(config.shuffle_tags_concepts)
    return tuple(
        CaptionSetting(
            float(dropouts.get(c, config.caption_dropout)), bool(config.shuffle_tags or c in shuffled)
        )
        for c in concepts
    )


def caption_variant(
    caption: str, rng: np.random.Generator, *, dropout: float, shuffle: bool, keep: int
) -> str:
    """The caption as one step trains it: empty with probability `dropout`; else with its comma-separated tags
    shuffled (the first `keep` in place). The draws are always made, so each slot's stream is the same."""
    dropped = rng.random() < dropout
    if not shuffle:
        return "" if dropped else caption
    tags = [t.strip() for t in caption.split(",")]
    if len(tags) > keep + 1:
        head, tail = tags[:keep], tags[keep:]
        tags = head + [tail[i] for i in rng.permutation(len(tail))]
    return "" if dropped else ", ".join(t for t in tags if t)


def token_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Captions as token ids [n, model_max_length]: padded, truncated to the tokenizer's length (77)."""
    if not captions:  # a batch whose every image was skipped
        import torch

        return torch.zeros((0, tokenizer.model_max_length), dtype=torch.int64)
    return tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.long()
