"""Suggested multipliers, never applied by themselves: read a run's validation and balance history and propose
per concept to lower (validation loss rising while training loss falls), raise (lagging behind) or keep it.

Pure functions over the rows of validation.csv, training_loss.csv and balance_history.csv; the reason is words.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Suggestion", "format_suggestions", "suggest", "suggest_run"]

RISE = 0.05  # validation loss this far above its best, after it: the concept is being memorised
LAG = 0.5  # improving less than this share of the others' median improvement: it is lagging
LOWER, RAISE, MAX_MULTIPLIER = 0.5, 2.0, 100.0


@dataclass(frozen=True)
class Suggestion:
    """One concept's proposal: its current multiplier, the suggested one and why, in words."""

    concept: str
    multiplier: float
    suggested: float
    reason: str

    @property
    def changes(self) -> bool:
        return self.suggested != self.multiplier


def _round(value: float) -> float:
    return float(f"{value:.3g}")


def _series(rows: Sequence[Mapping[str, str]], key: str) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        out.setdefault(row["concept"], []).append((int(row[key]), float(row["loss"])))
    return {concept: sorted(points) for concept, points in out.items()}


def suggest(
    validation: Sequence[Mapping[str, str]],
    history: Sequence[Mapping[str, str]],
    training: Sequence[Mapping[str, str]] = (),
) -> list[Suggestion]:
    """Per concept with at least two validations: lower the multiplier where validation loss rose more than
    RISE above its best while the training loss fell; raise it where the validation loss improved less than
    LAG of the other concepts' median improvement; else keep it. Multipliers come from the last epoch of
    the balance history (1 when missing)."""
    multipliers: dict[str, float] = {}
    for row in sorted(history, key=lambda r: int(r["epoch"])):
        multipliers[row["concept"]] = float(row["multiply"])
    curves = {c: points for c, points in _series(validation, "step").items() if len(points) >= 2}
    trained = _series(training, "epoch")
    improvement = {c: 1 - p[-1][1] / p[0][1] for c, p in curves.items() if p[0][1] > 0}
    out = []
    for concept, points in curves.items():
        current = multipliers.get(concept, 1.0)
        first, last = points[0][1], points[-1][1]
        best_step, best = min(points, key=lambda p: (p[1], p[0]))
        others = [v for c, v in improvement.items() if c != concept]
        median = statistics.median(others) if others else None
        train_curve = trained.get(concept, [])
        train_fell = len(train_curve) >= 2 and train_curve[-1][1] < train_curve[0][1]
        if last > best * (1 + RISE) and best_step < points[-1][0] and (train_fell or not train_curve):
            suggested = _round(current * LOWER)
            falling = (
                f" while its training loss fell {1 - train_curve[-1][1] / train_curve[0][1]:.0%}"
                if train_fell
                else ""
            )
            reason = (
                f"validation loss rose {last / best - 1:.0%} since its best at step {best_step} "
                f"({best:.4g} -> {last:.4g}){falling}: it is memorising its images; lower it"
            )
        elif median is not None and median > 0 and improvement.get(concept, 0.0) < LAG * median:
            suggested = _round(min(current * RAISE, MAX_MULTIPLIER))
            reason = (
                f"validation loss improved {improvement.get(concept, 0.0):.0%} ({first:.4g} -> {last:.4g}) while "
                f"the other concepts improved {median:.0%} (median): it lags behind; raise it"
            )
        else:
            suggested = current
            reason = f"validation loss {first:.4g} -> {last:.4g}, in step with the others; keep it"
        out.append(Suggestion(concept, current, suggested, reason))
    return out


def suggest_run(run_dir: str | Path) -> list[Suggestion]:
    """Suggestions from a run's out folder (validation.csv, balance_history.csv, training_loss.csv)."""
    from .errors import EdtoolsError
    from .train.records import BALANCE_HISTORY_CSV, TRAINING_LOSS_CSV, VALIDATION_CSV, read_csv

    run_dir = Path(run_dir).expanduser()
    validation = read_csv(run_dir / VALIDATION_CSV)
    if not validation:
        raise EdtoolsError(
            f"{run_dir} has no {VALIDATION_CSV}: train with a validation (validation_split, e.g. 0.1, or "
            "validation_root) to get suggestions"
        )
    return suggest(validation, read_csv(run_dir / BALANCE_HISTORY_CSV), read_csv(run_dir / TRAINING_LOSS_CSV))


def format_suggestions(suggestions: Sequence[Suggestion]) -> str:
    """A table for a person: concept, multiplier now, suggested, and why."""
    if not suggestions:
        return "no suggestions yet: each concept needs at least two validation results"
    width = max(len(s.concept) for s in suggestions)
    lines = [f"{'concept':<{width}}  multiply  suggested  why"]
    for s in suggestions:
        mark = "*" if s.changes else " "
        lines.append(f"{s.concept:<{width}}  {s.multiplier:>8g}  {s.suggested:>8g}{mark}  {s.reason}")
    return "\n".join(lines)
