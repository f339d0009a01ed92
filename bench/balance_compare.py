"""The balance bench's arms (how the fine-tune balances the rare folder) and their comparison: tables of
held-out loss, gap and bleed per concept, paired per seed, and the target checked."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from balance_data import NEW_CONCEPTS, PRESERVATION, RARE  # bench/ is on sys.path when a script runs

__all__ = ["ABSENT", "ARMS", "COMMON", "CONCEPTS", "FIXED", "Arm", "table", "verdict"]

COMMON = tuple(c for c in NEW_CONCEPTS if c != RARE)
CONCEPTS = (*NEW_CONCEPTS, PRESERVATION)


@dataclass(frozen=True)
class Arm:
    """How the fine-tune balances the rare folder: multiply.txt / loss_scale.txt values (as config overrides,
    which act as the files do), caption dropout and tag shuffling on it alone, or auto_balance."""

    name: str
    what: str
    multiplier: float | None = None
    loss_scale: float | None = None
    caption_dropout: float = 0.0
    shuffle_tags: bool = False
    auto: bool = False

    def config_values(self) -> dict[str, Any]:
        values: dict[str, Any] = {}
        if self.multiplier is not None:
            values["multipliers"] = {RARE: self.multiplier}
        if self.loss_scale is not None:
            values["loss_scales"] = {RARE: self.loss_scale}
        if self.caption_dropout:
            values["caption_dropouts"] = {RARE: self.caption_dropout}
        if self.shuffle_tags:
            values["shuffle_tags_concepts"] = [RARE]
            values["keep_tags"] = 1  # the trigger word stays first, as kohya's keep_tokens does
        if self.auto:
            values["auto_balance"] = True
        return values


ARMS = (
    Arm("none", "no balancing"),
    Arm("multiply3", "multiply.txt 3", multiplier=3),
    Arm("multiply10", "multiply.txt 10", multiplier=10),
    Arm("loss_scale10", "loss_scale.txt 10", loss_scale=10),
    Arm("multiply10_aug", "multiply.txt 10, caption dropout 0.2, tags shuffled", 10, None, 0.2, True),
    Arm("auto", "auto_balance", auto=True),
    # the usual advice followed (repeat the small folder ten times) with auto_balance on: does it undo the harm?
    Arm("auto10", "multiply.txt 10 and auto_balance", multiplier=10, auto=True),
)
FIXED = tuple(a.name for a in ARMS if a.name != "none" and not a.auto)
# a control, run when asked (--arms ... absent): the rare images load but teach nothing (loss_scale 0), which
# shows how much they help at all, i.e. whether the set-up can see an effect on the rare concept
ABSENT = Arm("absent", "loss_scale.txt 0 (control)", loss_scale=0)


# ---------------------------------------------------------------------------------------------------------
# The comparison


def _forgetting(run: dict[str, Any]) -> float:
    """Held-out loss on the base family now minus the base model's (step 0): > 0 is forgetting."""
    return run["loss"][PRESERVATION] - run["start"][PRESERVATION]


def _values(runs: list[dict[str, Any]], arm: str, metric: str, concept: str) -> dict[int, float | None]:
    """seed -> the arm's value (None where not recorded)."""
    out = {}
    for run in runs:
        if run["arm"] == arm:
            out[run["seed"]] = _forgetting(run) if metric == "forgetting" else run[metric][concept]
    return out


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


def _paired(runs: list[dict[str, Any]], arm: str, other: str, metric: str, concept: str) -> list[float]:
    """arm minus other, per seed, over the seeds both have."""
    mine, theirs = _values(runs, arm, metric, concept), _values(runs, other, metric, concept)
    return [mine[s] - theirs[s] for s in sorted(mine) if s in theirs]  # type: ignore[operator]


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _label(concept: str) -> str:
    return f"{concept} (rare)" if concept == RARE else concept


def table(runs: list[dict[str, Any]]) -> str:
    """Three markdown tables, a row per arm: held-out loss per concept and forgetting (mean ± sd over the
    seeds); the same as paired differences from none (mean ± sd, and in how many seeds the arm was lower); gap
    and bleed per concept at the last step ("n/a" where this edtools does not record them)."""
    arms = [a.name for a in (*ARMS, ABSENT) if any(r["arm"] == a.name for r in runs)]
    seeds = sorted({r["seed"] for r in runs})
    for arm in arms:  # paired: every arm ran on every seed
        missing = set(seeds) - {r["seed"] for r in runs if r["arm"] == arm}
        if missing:
            raise ValueError(f"arm {arm} lacks seed(s) {sorted(missing)}: the arms are compared per seed")
    metrics = [*(("loss", c) for c in CONCEPTS), ("forgetting", "")]
    names = [_label(c) for c in CONCEPTS] + ["forgetting"]
    loss = [_row(["held-out loss", *names]), "|" + "---|" * (len(names) + 1)]
    paired = [_row(["arm - none, same seed (lower in)", *names]), "|" + "---|" * (len(names) + 1)]
    extra_names = [f"gap {c}" for c in CONCEPTS] + [f"bleed {c}" for c in CONCEPTS]
    extra = [_row(["last step", *extra_names]), "|" + "---|" * (len(extra_names) + 1)]
    for arm in arms:
        loss.append(_row([arm] + [_mean_sd(list(_values(runs, arm, m, c).values())) for m, c in metrics]))
        if arm != "none":
            cells = [arm]
            for m, c in metrics:
                diff = _paired(runs, arm, "none", m, c)
                cells.append(f"{_mean_sd(diff)} ({sum(d < 0 for d in diff)}/{len(diff)})")
            paired.append(_row(cells))
        cells = [arm]
        for metric in ("gap", "bleed"):
            for c in CONCEPTS:
                values = [v for v in _values(runs, arm, metric, c).values() if v is not None]
                cells.append(_mean_sd(values) if len(values) == len(seeds) else "n/a")
        extra.append(_row(cells))
    tables = [loss, paired, extra]
    if "auto" in arms:  # what the controller did: the multipliers the last epoch trained with, per seed
        concepts = list(CONCEPTS)
        ended = [_row(["auto, last epoch's multiplier", *map(_label, concepts), "changes"])]
        ended.append("|" + "---|" * (len(concepts) + 2))
        for run in sorted((r for r in runs if r["arm"] == "auto"), key=lambda r: r["seed"]):
            held = run.get("multipliers", {})
            cells = [f"seed {run['seed']}"] + [f"{held[c]:g}" if c in held else "n/a" for c in concepts]
            ended.append(_row([*cells, str(len(run.get("changes", ())))]))
        tables.append(ended)
    return "\n\n".join("\n".join(part) for part in tables)


def verdict(runs: list[dict[str, Any]]) -> list[str]:
    """The target, checked: auto's rare loss at most none's and the best fixed arm's in 5 of 6 seeds (the same
    share of other seed counts), and the common concepts and preservation no worse than none by more than the
    seeds' spread (none's standard deviation over the seeds)."""
    if not any(r["arm"] == "auto" for r in runs):
        return ["target: not checked (no auto arm)", *_auto10_lines(runs)]
    seeds = sorted({r["seed"] for r in runs})
    need = math.ceil(5 / 6 * len(seeds))
    fixed = [a for a in FIXED if any(r["arm"] == a for r in runs)]
    best = min(fixed, key=lambda a: statistics.mean(_values(runs, a, "loss", RARE).values()))
    lines, ok = [], True
    for other in ("none", best):
        diff = _paired(runs, "auto", other, "loss", RARE)
        wins = sum(d <= 0 for d in diff)
        ok &= wins >= need
        lines.append(f"rare ({RARE}): auto <= {other} in {wins} of {len(diff)} seeds (need {need})")
    for concept, metric in [*((c, "loss") for c in COMMON), (PRESERVATION, "loss"), ("", "forgetting")]:
        diff = statistics.mean(_paired(runs, "auto", "none", metric, concept))
        spread = statistics.stdev(_values(runs, "none", metric, concept).values()) if len(seeds) > 1 else 0.0
        ok &= diff <= spread
        name = concept or "forgetting"
        lines.append(f"{name}: auto - none = {diff:+.4f} (spread of none over the seeds {spread:.4f})")
    lines.append(f"target {'met' if ok else 'NOT met'} (best fixed arm on the rare concept: {best})")
    lines += _auto10_lines(runs)
    return lines


def _auto10_lines(runs: list[dict[str, Any]]) -> list[str]:
    """auto_balance started from the usual advice (multiply.txt 10), against that advice alone and against none."""
    lines = []
    for other in ("multiply10", "none"):
        diff = _paired(runs, "auto10", other, "loss", RARE)
        if diff:
            lines.append(
                f"rare ({RARE}): auto10 - {other} = {statistics.mean(diff):+.4f}, lower in "
                f"{sum(d < 0 for d in diff)} of {len(diff)} seeds"
            )
    return lines
