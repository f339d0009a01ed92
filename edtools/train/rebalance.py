"""Live rebalancing: each epoch's multipliers and loss scales, read at its start from multiply.txt / loss_scale.txt
(or from the notebook's sliders), so edits made while a run trains apply from the next epoch, each logged once.

With auto_balance the controller (edtools.balance.autobalance) then moves the unlocked concepts' multipliers. An epoch in
progress never changes: its values (and the user's) travel in its checkpoints, so a resume finishes it with them.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..balance.autobalance import Change, balance_state, decide
from ..config import TrainConfig
from ..dataset.scan import Dataset, DatasetError, scan
from .records import read_history

__all__ = [
    "BalanceSource",
    "auto_epoch",
    "auto_values",
    "changes",
    "epoch_values",
    "file_values",
    "saved_auto",
    "saved_values",
    "with_saved_values",
]

log = logging.getLogger("edtools.train")

# (epoch) -> ({concept: multiplier}, {concept: loss_scale}) for the concepts it sets (the notebook's sliders)
BalanceSource = Callable[[int], tuple[Mapping[str, float], Mapping[str, float]]]


def file_values(config: TrainConfig) -> tuple[dict[str, float], dict[str, float]]:
    """The values in the data root's files now, with the config's overrides on top. A scan that finds errors
    (a multiply.txt being edited, say) raises DatasetError."""
    result = scan(config.data_root, kohya_repeats=config.kohya_repeats)
    dataset = result.raise_for_errors()
    multipliers = {c.path: c.multiplier for c in dataset.concepts}
    loss_scales = {c.path: c.loss_scale for c in dataset.concepts}
    multipliers.update(config.multiplier_overrides)
    loss_scales.update(config.loss_scale_overrides)
    return multipliers, loss_scales


def epoch_values(current: Dataset, config: TrainConfig, epoch: int, source: BalanceSource | None) -> Dataset:
    """The dataset with the values epoch `epoch` trains with: from `source` (the notebook), else from the files.
    Folders that appeared since the run started are not trained; values that cannot be used (an error in a
    file, a multiplier <= 0) keep the previous epoch's, with a warning."""
    try:
        multipliers, loss_scales = source(epoch) if source is not None else file_values(config)
        known = set(current.concept_paths)
        updated = current.with_values(
            {c: v for c, v in multipliers.items() if c in known},
            {c: v for c, v in loss_scales.items() if c in known},
        )
    except DatasetError as exc:
        log.warning("epoch %d keeps the previous epoch's multipliers and loss scales: %s", epoch, exc)
        return current
    for line in changes(current, updated, epoch):
        log.info("%s", line)
    return updated


def changes(old: Dataset, new: Dataset, epoch: int) -> list[str]:
    """One line per changed value, e.g. "epoch 3: people/bob multiply 1 -> 3"."""
    lines = []
    for a, b in zip(old.concepts, new.concepts, strict=True):
        if a.multiplier != b.multiplier:
            lines.append(f"epoch {epoch}: {a.path} multiply {a.multiplier:g} -> {b.multiplier:g}")
        if a.loss_scale != b.loss_scale:
            lines.append(f"epoch {epoch}: {a.path} loss_scale {a.loss_scale:g} -> {b.loss_scale:g}")
    return lines


def auto_values(
    user: Dataset, out: Path, epoch: int, bounds: tuple[float, float]
) -> tuple[Dataset, dict[str, str], tuple[Change, ...]]:
    """With --auto-balance: the dataset epoch `epoch` trains with, from the user's values (`user`: the files or
    sliders) and the run's records so far: each unlocked concept keeps its last automatic multiplier, then the
    controller's changes apply (autobalance.decide). Returns it, the reasons per changed concept and the
    changes; a function of the records and `user` only, so a resumed run decides alike."""
    history = read_history(out)
    user_multipliers = {c.path: c.multiplier for c in user.concepts}
    current, locks = balance_state(history, user_multipliers)
    decided = decide(history, current, user_multipliers, locks, bounds)
    for change in decided:
        current[change.concept] = change.new
    return user.with_values(current, {}), {c.concept: c.reason for c in decided}, decided


def auto_epoch(
    user: Dataset, out: Path, epoch: int, bounds: tuple[float, float], runtime: Any
) -> tuple[Dataset, dict[str, str]]:
    """auto_values at an epoch's start of a run: the main process reads the records, decides and logs each
    change once; the other processes take its multipliers. Returns the dataset and the reasons."""
    dataset, reasons = user, {}
    if runtime.main:
        dataset, reasons, decided = auto_values(user, out, epoch, bounds)
        for c in decided:
            log.info(
                "epoch %d: auto-balance %s multiply %g -> %g: %s", epoch, c.concept, c.old, c.new, c.reason
            )
    if runtime.world_size > 1:
        values = runtime.sum([c.multiplier if runtime.main else 0.0 for c in dataset.concepts])
        dataset = user.with_values(dict(zip(user.concept_paths, values, strict=True)), {})
    return dataset, reasons


def saved_values(
    dataset: Dataset, user: Mapping[str, float] | None = None, reasons: Mapping[str, str] | None = None
) -> dict[str, list]:
    """{concept: [multiplier, loss_scale, user multiplier, automatic change's reason]}: what a checkpoint keeps
    of the epoch in progress."""
    user, reasons = user or {}, reasons or {}
    return {
        c.path: [c.multiplier, c.loss_scale, user.get(c.path, c.multiplier), reasons.get(c.path, "")]
        for c in dataset.concepts
    }


def saved_auto(values: Mapping[str, list]) -> tuple[dict[str, float], dict[str, str]]:
    """From a checkpoint's values of its epoch in progress: the user's multipliers and the reasons of that
    epoch's automatic changes (older checkpoints: the multipliers, no reasons)."""
    user = {c: float(v[2]) if len(v) > 2 else float(v[0]) for c, v in values.items()}
    reasons = {c: str(v[3]) for c, v in values.items() if len(v) > 3 and v[3]}
    return user, reasons


def with_saved_values(dataset: Dataset, values: Mapping[str, list]) -> Dataset:
    """The dataset with a checkpoint's values of its epoch in progress."""
    return dataset.with_values(
        {c: v[0] for c, v in values.items() if c in dataset.concept_paths},
        {c: v[1] for c, v in values.items() if c in dataset.concept_paths},
    )
