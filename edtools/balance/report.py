"""Balance reports: the per-folder table, the images-per-concept histograms (expected beside actual) and the
validation loss per concept. Expected counts come from the multipliers; actual ones from the real schedules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..dataset.scan import Dataset
from .schedule import build_epoch, expected_images_per_epoch, make_buckets

__all__ = [
    "ConceptRow",
    "actual_images_per_concept",
    "balance_rows",
    "format_table",
    "plot_balance",
    "plot_validation",
]


@dataclass(frozen=True)
class ConceptRow:
    """One folder's line of the balance table."""

    concept: str
    images: int
    multiplier: float
    loss_scale: float
    images_per_epoch: float  # expected: images x multiplier
    share: float  # of all images per epoch
    effective_weight: float  # images_per_epoch x loss_scale
    steps_per_epoch: float  # images_per_epoch / batch_size


def balance_rows(dataset: Dataset, batch_size: int) -> list[ConceptRow]:
    """The balance table's rows, in concept order."""
    expected = expected_images_per_epoch(dataset)
    total = float(expected.sum()) or 1.0
    return [
        ConceptRow(
            concept=c.path,
            images=c.n_images,
            multiplier=c.multiplier,
            loss_scale=c.loss_scale,
            images_per_epoch=float(e),
            share=float(e) / total,
            effective_weight=float(e) * c.loss_scale,
            steps_per_epoch=float(e) / batch_size,
        )
        for c, e in zip(dataset.concepts, expected, strict=True)
    ]


def format_table(dataset: Dataset, batch_size: int, *, steps_per_epoch: int | None = None) -> str:
    """The balance table as fixed-width text, with totals. steps_per_epoch: the exact count from a real
    schedule (aspect buckets can add short batches); estimated from the images when not given."""
    rows = balance_rows(dataset, batch_size)
    width = max([len("concept")] + [len(r.concept) for r in rows])
    header = (
        f"{'concept':<{width}}  {'images':>7}  {'multiply':>8}  {'loss_scale':>10}  {'per epoch':>9}  "
        f"{'share':>6}  {'eff. weight':>11}  {'steps':>7}"
    )
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(
            f"{r.concept:<{width}}  {r.images:>7}  {r.multiplier:>8.4g}  {r.loss_scale:>10.4g}  "
            f"{r.images_per_epoch:>9.5g}  {r.share:>6.1%}  {r.effective_weight:>11.5g}  {r.steps_per_epoch:>7.4g}"
        )
    total_images = sum(r.images for r in rows)
    per_epoch = sum(r.images_per_epoch for r in rows)
    steps = steps_per_epoch if steps_per_epoch is not None else math.ceil(per_epoch / batch_size)
    lines.append("-" * len(header))
    lines.append(
        f"{'total':<{width}}  {total_images:>7}  {'':>8}  {'':>10}  {per_epoch:>9.5g}  {1:>6.0%}  "
        f"{sum(r.effective_weight for r in rows):>11.5g}  {steps:>7}"
    )
    return "\n".join(lines)


def actual_images_per_concept(
    dataset: Dataset, *, seed: int, epochs: int, batch_size: int, resolution: int
) -> np.ndarray:
    """Images per concept in each of epochs 0..epochs-1, counted from the real schedules. int64 [epochs, concepts]."""
    buckets = make_buckets(resolution)
    return (
        np.stack(
            [
                build_epoch(
                    dataset, epoch=e, seed=seed, batch_size=batch_size, buckets=buckets
                ).images_per_concept(dataset)
                for e in range(epochs)
            ]
        )
        if epochs > 0
        else np.zeros((0, len(dataset.concepts)), dtype=np.int64)
    )


def plot_balance(
    dataset: Dataset,
    actual: np.ndarray | None = None,
    *,
    expected: np.ndarray | None = None,
    out: str | Path | None = None,
    title: str = "Images per concept per epoch",
):
    """Horizontal bars, largest at the top: expected images per epoch per concept, and beside it the actual
    mean over the given epochs with min-max whiskers. Readable with dozens of concepts. Returns the Figure;
    writes a PNG when `out` is given. expected: per concept, instead of the dataset's (n_images x multiplier).
    """
    # A bare Figure renders without pyplot, so the user's matplotlib backend is left untouched.
    from matplotlib.figure import Figure

    expected = (
        expected_images_per_epoch(dataset) if expected is None else np.asarray(expected, dtype=np.float64)
    )
    order = np.argsort(expected, kind="stable")  # barh draws from the bottom: largest ends on top
    names = [dataset.concepts[i].path for i in order]
    y = np.arange(len(order))
    height = max(2.5, 0.28 * len(order) + 1.2)
    fig = Figure(figsize=(9, height), layout="constrained")
    ax = fig.add_subplot()
    total = float(expected.sum()) or 1.0
    if actual is None or len(actual) == 0:
        ax.barh(y, expected[order], color="#4c72b0", label="expected")
        bars = expected[order]
    else:
        bar_h = 0.4
        ax.barh(y + bar_h / 2, expected[order], height=bar_h, color="#4c72b0", label="expected")
        mean = actual.mean(axis=0)[order]
        lo, hi = actual.min(axis=0)[order], actual.max(axis=0)[order]
        ax.barh(
            y - bar_h / 2,
            mean,
            height=bar_h,
            color="#dd8452",
            xerr=np.vstack([mean - lo, hi - mean]),
            capsize=2,
            label=f"actual (mean, min-max over {len(actual)} epochs)",
        )
        bars = np.maximum(expected[order], hi)
    for yi, value, e in zip(y, bars, expected[order], strict=True):
        ax.text(value, yi, f"  {e:.4g} ({e / total:.1%})", va="center", fontsize=8)
    ax.set_yticks(y, names, fontsize=8 if len(order) > 20 else 10)
    ax.set_xlabel("images per epoch")
    ax.set_title(title)
    ax.set_xlim(0, float(bars.max(initial=1)) * 1.25)
    ax.legend(loc="lower right", fontsize=8)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig


def plot_validation(
    rows: list[dict[str, str]],
    *,
    training: list[dict[str, str]] | None = None,
    out: str | Path | None = None,
    title: str = "Validation loss per concept",
):
    """Validation loss per concept over the optimizer steps (rows of validation.csv: step, concept, loss), one
    line per concept; with `training` (rows of training_loss.csv and the step each epoch ended at, as
    step, concept, loss), the training loss as dashed lines of the same colour. Returns the Figure; writes a
    PNG when `out` is given."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), layout="constrained")
    ax = fig.add_subplot()
    concepts = list(dict.fromkeys(row["concept"] for row in rows))
    colours = {}
    for concept in concepts:
        points = sorted((int(r["step"]), float(r["loss"])) for r in rows if r["concept"] == concept)
        (line,) = ax.plot(*zip(*points, strict=True), marker="o", markersize=3, linewidth=1.4, label=concept)
        colours[concept] = line.get_color()
    for concept in colours if training else ():
        points = sorted((int(r["step"]), float(r["loss"])) for r in training if r["concept"] == concept)
        if points:
            ax.plot(*zip(*points, strict=True), linestyle="--", linewidth=1, color=colours[concept])
    ax.set_xlabel("step")
    ax.set_ylabel("loss (MSE)")
    ax.set_title(title + ("  (dashed: training)" if training else ""), fontsize=10)
    if len(concepts) <= 12:
        ax.legend(fontsize=7, loc="upper right")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig
