"""Suggested multipliers, never applied by themselves: read a run's validation and balance history and propose
per concept to lower, raise or keep it, by the rules --auto-balance applies (edtools.balance.autobalance).

Pure functions over the rows of validation.csv, bleed.csv, training_loss.csv and balance_history.csv; the
reason is words.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .autobalance import History, round_multiplier, verdicts

__all__ = ["Suggestion", "format_suggestions", "suggest"]

MAX_MULTIPLIER = 100.0


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


def suggest(
    validation: Sequence[Mapping[str, str]],
    history: Sequence[Mapping[str, str]],
    training: Sequence[Mapping[str, str]] = (),
    bleed: Sequence[Mapping[str, str]] = (),
) -> list[Suggestion]:
    """Per concept with at least two validations (or dominating a bleeding pair): the verdict of the
    auto-balance rules (autobalance.verdicts) applied to its multiplier, one step (x1.5 or /1.5) at a time.
    Multipliers come from the last epoch of the balance history (1 when missing). Unlike --auto-balance,
    a suggestion has no bounds, locks or waiting between changes: a person decides."""
    multipliers: dict[str, float] = {}
    for row in sorted(history, key=lambda r: int(r["epoch"])):
        multipliers[row["concept"]] = float(row["multiply"])
    records = History(
        validation=tuple(validation), bleed=tuple(bleed), balance=tuple(history), training=tuple(training)
    )
    out = []
    for concept, verdict in verdicts(records).items():
        current = multipliers.get(concept, 1.0)
        suggested = (
            current
            if verdict.factor == 1
            else min(round_multiplier(current * verdict.factor), MAX_MULTIPLIER)
        )
        out.append(Suggestion(concept, current, suggested, verdict.reason))
    return out


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
