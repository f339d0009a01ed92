"""Automatic balance: from a run's records (validation.csv, bleed.csv, balance_history.csv) decide per concept
to raise, lower or keep its multiplier; the rules `edtools suggest` shows and `--auto-balance` applies.

Pure functions over plain rows (str -> str, as csv.DictReader gives them): no randomness, no clock, so a resumed
run that reads the same records makes the same decisions. Columns a record lacks are no signal (its rule is
silent), never an error.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "Change",
    "History",
    "RULES",
    "Rules",
    "Signal",
    "Verdict",
    "balance_state",
    "check_bounds",
    "decide",
    "judge",
    "round_multiplier",
    "verdicts",
]

Row = Mapping[str, str]


@dataclass(frozen=True)
class Rules:
    """The thresholds. rise: held-out loss this share above its best (after it) is memorising; lag: a concept
    improving less than this share of the others' median improvement lags; widen: the train/held-out gap grew
    by more than this share of the held-out loss over the last two validations; bleed_drop: a pair bleeds when
    its margin fell below its margin at the run's first validation (the model before training) by more than
    this share of that first margin's size, and is at its lowest yet; step: the factor of one change;
    spacing: validations a concept waits after a change before the next one."""

    rise: float = 0.05
    lag: float = 0.5
    widen: float = 0.01
    # relative, not absolute: margins scale with the model and its loss (0.001-0.003 for a tiny model's
    # concepts at the start), so what says "bleeding" is training making the prompts less distinct than they were
    bleed_drop: float = 0.5
    step: float = 1.5
    spacing: int = 2


RULES = Rules()


@dataclass(frozen=True)
class History:
    """A run's records as rows: validation.csv, bleed.csv and balance_history.csv (each may be empty)."""

    validation: tuple[Row, ...] = ()
    bleed: tuple[Row, ...] = ()
    balance: tuple[Row, ...] = ()
    training: tuple[Row, ...] = ()  # training_loss.csv: only words in the reasons


@dataclass(frozen=True)
class Signal:
    """What one concept's held-out curve says. rise: last / best - 1 when the best came before the last
    validation (else 0); gap_growth: growth of the gap over the last two validations, as a share of the
    held-out loss, when both widened (else None: no gap column, too few points or not widening)."""

    concept: str
    validations: int
    first: float
    last: float
    best: float
    best_step: int
    improvement: float  # 1 - last / first
    falling: bool  # the last validation is below the one before
    rise: float
    gap_growth: float | None
    others_median: float | None  # the other concepts' median improvement
    train_fell: float | None = None  # share the training loss fell, when training_loss.csv has 2+ epochs

    def lagging(self, rules: Rules = RULES) -> bool:
        m = self.others_median
        return m is not None and m > 0 and self.improvement < rules.lag * m


@dataclass(frozen=True)
class Verdict:
    """A rule's word on one concept: factor > 1 raises, < 1 lowers, 1 keeps; reason in words."""

    concept: str
    factor: float
    reason: str


@dataclass(frozen=True)
class Change:
    """One applied change of a concept's multiplier and why."""

    concept: str
    old: float
    new: float
    reason: str


@dataclass(frozen=True)
class _Bleed:
    concept: str
    under: str
    first: float  # the margin at the pair's first record (the run's first validation)
    margin: float  # at its latest
    first_step: int
    step: int
    lowest_before: float  # the lowest at any record before the latest


def _num(row: Row, key: str) -> float | None:
    """A number from a row, None when the column is missing, empty or not a finite number."""
    try:
        value = float(row[key])
    except (KeyError, TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def round_multiplier(value: float) -> float:
    """4 significant digits: the value balance_history.csv writes is the value trained (a resume reads it)."""
    return float(f"{value:.4g}")


def check_bounds(bounds: Sequence[float]) -> tuple[float, float]:
    """(low, high) with 0 < low <= 1 <= high, else ValueError naming the value and what is allowed."""
    low, high = (float(b) for b in bounds)
    if not (0 < low <= 1 <= high and math.isfinite(high)):
        raise ValueError(
            f"auto_balance_bounds is ({low:g}, {high:g}); it must be two factors of the user's multiplier "
            "with 0 < low <= 1 <= high, e.g. 0.25 4"
        )
    return low, high


# ---------------------------------------------------------------------------------------------------------
# Signals


def judge(history: History) -> dict[str, Signal]:
    """Per concept with at least two validations: its curve's signals (see Signal)."""
    points: dict[str, list[tuple[int, float, float | None]]] = {}
    for row in history.validation:
        step, loss = _num(row, "step"), _num(row, "loss")
        if step is None or loss is None or not row.get("concept"):
            continue
        points.setdefault(row["concept"], []).append((int(step), loss, _num(row, "gap")))
    curves = {c: sorted(p) for c, p in points.items() if len(p) >= 2}
    improvement = {c: 1 - p[-1][1] / p[0][1] for c, p in curves.items() if p[0][1] > 0}
    trained: dict[str, list[tuple[int, float]]] = {}
    for row in history.training:
        epoch, loss = _num(row, "epoch"), _num(row, "loss")
        if epoch is not None and loss is not None and row.get("concept"):
            trained.setdefault(row["concept"], []).append((int(epoch), loss))
    out = {}
    for concept, curve in sorted(curves.items()):
        losses = [p[1] for p in curve]
        best_step, best = min(((s, v) for s, v, _ in curve), key=lambda p: (p[1], p[0]))
        rise = losses[-1] / best - 1 if best > 0 and best_step < curve[-1][0] else 0.0
        gaps = [p[2] for p in curve[-3:]]
        gap_growth = None
        if len(gaps) == 3 and None not in gaps and gaps[0] < gaps[1] < gaps[2] and losses[-1] > 0:
            gap_growth = (gaps[2] - gaps[0]) / losses[-1]
        others = [v for c, v in improvement.items() if c != concept]
        train = sorted(trained.get(concept, []))
        out[concept] = Signal(
            concept=concept,
            validations=len(curve),
            first=losses[0],
            last=losses[-1],
            best=best,
            best_step=best_step,
            improvement=improvement.get(concept, 0.0),
            falling=losses[-1] < losses[-2],
            rise=rise,
            gap_growth=gap_growth,
            others_median=statistics.median(others) if others else None,
            train_fell=1 - train[-1][1] / train[0][1] if len(train) >= 2 and train[0][1] > 0 else None,
        )
    return out


def _bleeding(history: History, rules: Rules) -> list[_Bleed]:
    """The pairs whose latest margin (bleed.csv's last step) fell below their first one by more than
    rules.bleed_drop of its size and below every earlier one: bleeding, and still. A margin that stopped falling
    (a change took effect) and wanders around the level it reached is left alone: a validation's noise made the
    rule lower a concept step after step to its bound for a fall that was over. Folders with the same captions
    score 0 throughout: never bleeding by this rule, as training did not make them so."""
    margins: dict[tuple[str, str], dict[int, float]] = {}
    for row in history.bleed:
        step, margin = _num(row, "step"), _num(row, "margin")
        if step is None or margin is None or not row.get("under") or not row.get("concept"):
            continue
        margins.setdefault((row["concept"], row["under"]), {})[int(step)] = margin
    pairs = []
    for (concept, under), by_step in margins.items():
        steps = sorted(by_step)
        if len(steps) >= 2:
            first, last = by_step[steps[0]], by_step[steps[-1]]
            lowest_before = min(by_step[s] for s in steps[:-1])
            pairs.append(_Bleed(concept, under, first, last, steps[0], steps[-1], lowest_before))
    return sorted(
        (
            b
            for b in pairs
            if b.margin < b.first - rules.bleed_drop * abs(b.first) and b.margin < b.lowest_before
        ),
        key=lambda b: (b.margin - b.first, b.concept),
    )


def _images_per_epoch(history: History) -> dict[str, float]:
    """Each concept's images per epoch in the last epoch of balance_history.csv (its 'expected' column)."""
    out: dict[str, tuple[int, float]] = {}
    for row in history.balance:
        epoch, images = _num(row, "epoch"), _num(row, "expected")
        if (
            epoch is not None
            and images is not None
            and (row["concept"] not in out or out[row["concept"]][0] <= epoch)
        ):
            out[row["concept"]] = (int(epoch), images)
    return {c: v for c, (_, v) in out.items()}


def verdicts(history: History, rules: Rules | None = None) -> dict[str, Verdict]:
    """Per judged concept the first rule that speaks, in this order: bleeds into another concept and trains
    more images per epoch than it (lower); held-out loss rose from its best (lower); train/held-out gap widens
    (lower); lags the others and still falls (raise); else keep. Concepts only in bleed.csv get a verdict when
    they dominate a bleeding pair."""
    rules = rules or RULES  # read at call time: a test may set the module's RULES
    signals = judge(history)
    images = _images_per_epoch(history)
    out: dict[str, Verdict] = {}
    down, up = 1 / rules.step, rules.step
    for b in _bleeding(history, rules):
        a_n, u_n = images.get(b.concept), images.get(b.under)
        if a_n is None or u_n is None or a_n == u_n:
            continue  # no way to tell which one dominates
        dominant, other = (b.concept, b.under) if a_n > u_n else (b.under, b.concept)
        if dominant not in out:
            out[dominant] = Verdict(
                dominant,
                down,
                f"bleeds with {other} (the margin of {b.concept} under {b.under}'s prompt fell from {b.first:.3g} at "
                f"step {b.first_step} to {b.margin:.3g}, its lowest yet) and trains more images "
                f"per epoch ({max(a_n, u_n):g} vs {min(a_n, u_n):g}): lower it",
            )
    for concept, s in signals.items():
        if concept in out:
            continue
        if s.rise > rules.rise:
            fell = (
                f" while its training loss fell {s.train_fell:.0%}"
                if s.train_fell and s.train_fell > 0
                else ""
            )
            out[concept] = Verdict(
                concept,
                down,
                f"validation loss rose {s.rise:.0%} since its best at step {s.best_step} "
                f"({s.best:.4g} -> {s.last:.4g}){fell}: it is memorising its images; lower it",
            )
        elif s.gap_growth is not None and s.gap_growth > rules.widen:
            out[concept] = Verdict(
                concept,
                down,
                f"the gap between its held-out and training loss widened by {s.gap_growth:.1%} of its "
                "validation loss over the last two validations: it is memorising its images; lower it",
            )
        elif s.lagging(rules) and s.falling:
            out[concept] = Verdict(
                concept,
                up,
                f"validation loss {'improved' if s.improvement >= 0 else 'worsened'} {abs(s.improvement):.0%} "
                f"({s.first:.4g} -> {s.last:.4g}) while the other concepts improved {s.others_median:.0%} "
                "(median), and it still falls: it lags behind; raise it "
                "one step (a folder of few images memorises them when repeated much: watch its gap)",
            )
        else:
            out[concept] = Verdict(
                concept,
                1.0,
                f"validation loss {s.first:.4g} -> {s.last:.4g}, in step with the others; keep it",
            )
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------------------------------------
# State and decisions


def balance_state(history: History, user: Mapping[str, float]) -> tuple[dict[str, float], frozenset[str]]:
    """(current multipliers, locked concepts) as the records leave them: a concept's current multiplier is the
    last one balance_history.csv recorded (the user's value where it has none); a concept is locked once the
    user moved it: its user_multiply changed between recorded epochs, or `user` (this epoch's) differs from
    the last recorded. A lock keeps the user's value."""
    rows = sorted(history.balance, key=lambda r: int(_num(r, "epoch") or 0))
    current: dict[str, float] = {}
    recorded_user: dict[str, float] = {}
    locked: set[str] = set()
    for row in rows:
        concept, multiply = row["concept"], _num(row, "multiply")
        if multiply is None:
            continue
        user_value = _num(row, "user_multiply")
        user_value = multiply if user_value is None else user_value
        if concept in recorded_user and recorded_user[concept] != user_value:
            locked.add(concept)
        recorded_user[concept], current[concept] = user_value, multiply
    for concept, value in user.items():
        if concept in recorded_user and recorded_user[concept] != value:
            locked.add(concept)
    state = {c: (v if c in locked or c not in current else current[c]) for c, v in user.items()}
    return state, frozenset(c for c in locked if c in user)


def _last_change_epoch(history: History) -> dict[str, int]:
    """Per concept the last epoch whose multiplier the controller changed (a non-empty reason)."""
    out: dict[str, int] = {}
    for row in history.balance:
        epoch = _num(row, "epoch")
        if epoch is not None and row.get("reason"):
            out[row["concept"]] = max(out.get(row["concept"], -1), int(epoch))
    return out


def _validations_after(history: History, epoch: int) -> int:
    """Distinct validations taken after epoch `epoch` finished (their epochs-done column is above it)."""
    return len({row.get("step") for row in history.validation if (_num(row, "epoch") or 0) > epoch})


def decide(
    history: History,
    current: Mapping[str, float],
    user: Mapping[str, float],
    locks: frozenset[str] | set[str] = frozenset(),
    bounds: Sequence[float] = (0.25, 4.0),
    rules: Rules | None = None,
) -> tuple[Change, ...]:
    """The changes for this epoch: each unlocked concept whose verdict raises or lowers it, that waited
    rules.spacing validations since its last change, moves by rules.step within bounds x its user value."""
    rules = rules or RULES
    low, high = check_bounds(bounds)
    changed = _last_change_epoch(history)
    out = []
    for concept, verdict in verdicts(history, rules).items():
        if verdict.factor == 1 or concept in locks or concept not in current or concept not in user:
            continue
        if concept in changed and _validations_after(history, changed[concept]) < rules.spacing:
            continue  # let the last change show in the held-out loss first: no oscillation
        old = current[concept]
        floor, ceiling = round_multiplier(user[concept] * low), round_multiplier(user[concept] * high)
        new = min(max(round_multiplier(old * verdict.factor), floor), ceiling)
        if new == old:
            continue  # at its bound
        bound = " (its bound)" if new in (floor, ceiling) else ""
        out.append(Change(concept, old, new, f"{verdict.reason}{bound}"))
    return tuple(out)
