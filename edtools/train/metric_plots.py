"""Plots of the memorisation gap and the concept bleed: validation.png with a gap panel beside the losses, and
bleed.png, a heatmap of one validation's margins (concept rows, the prompt it was scored under in columns).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["bleed_matrix", "draw_bleed", "draw_gap", "plot_bleed", "plot_validation_gap"]


def _short(text: str, width: int = 24) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1) :]


def draw_gap(ax: Any, rows: Sequence[Mapping[str, str]]) -> None:
    """Gap (held-out loss - training-image loss) per concept over the steps, on `ax`; rows of validation.csv.
    Rows without a gap (not measured) are left out."""
    concepts = list(dict.fromkeys(row["concept"] for row in rows))
    for concept in concepts:
        points = sorted(
            (int(r["step"]), float(r["gap"])) for r in rows if r["concept"] == concept and r.get("gap")
        )
        if points:
            ax.plot(
                *zip(*points, strict=True), marker="o", markersize=3, linewidth=1.4, label=_short(concept)
            )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out - training loss")
    ax.set_title("Memorisation gap per concept (rising: memorising)", fontsize=10)
    if 0 < len(concepts) <= 12 and ax.get_lines()[:-1]:
        ax.legend(fontsize=7, loc="upper left")


def plot_validation_gap(
    rows: list[dict[str, str]], *, training: list[dict[str, str]] | None = None, out: str | Path | None = None
) -> Any:
    """report.plot_validation's chart with the gap panel beside it. Returns the Figure; writes a PNG when
    `out` is given."""
    from ..balance.report import plot_validation

    fig = plot_validation(rows, training=training)
    grid = fig.add_gridspec(1, 2)
    fig.axes[0].set_subplotspec(grid[0])
    draw_gap(fig.add_subplot(grid[1]), rows)
    fig.set_size_inches(13, 4.2)
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig


def bleed_matrix(margins: Mapping[tuple[str, str], float]) -> tuple[list[str], list[str], np.ndarray]:
    """(concepts, unders, matrix) of {(concept, under): margin}, in first-seen order; nan where not measured."""
    concepts = list(dict.fromkeys(c for c, _ in margins))
    unders = list(dict.fromkeys([*concepts, *(u for _, u in margins)]))
    matrix = np.full((len(concepts), len(unders)), np.nan)
    for (concept, under), margin in margins.items():
        matrix[concepts.index(concept), unders.index(under)] = margin
    return concepts, unders, matrix


def draw_bleed(fig: Any, margins: Mapping[tuple[str, str], float], title: str) -> None:
    """The heatmap of one validation's margins on `fig`: rows are concepts, columns the prompts they were
    scored under; small values (pale) mean the model no longer tells the two apart."""
    ax = fig.add_subplot()
    concepts, unders, matrix = bleed_matrix(margins)
    if not concepts:
        ax.text(0.5, 0.5, "no bleed measured yet", ha="center", va="center")
        ax.set_axis_off()
        return
    finite = np.abs(matrix[np.isfinite(matrix)])
    scale = float(finite.max()) if finite.size and finite.max() > 0 else 1.0
    image = ax.imshow(matrix, cmap="RdBu_r", vmin=-scale, vmax=scale, aspect="auto")
    ax.set_xticks(range(len(unders)), [_short(u, 18) for u in unders], rotation=40, ha="right", fontsize=7)
    ax.set_yticks(range(len(concepts)), [_short(c, 24) for c in concepts], fontsize=7)
    if len(concepts) * len(unders) <= 100:
        for (r, c), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                ax.text(c, r, f"{value:.3g}", ha="center", va="center", fontsize=6)
    ax.set_xlabel("scored under the prompt of")
    ax.set_ylabel("held-out images of")
    ax.set_title(title, fontsize=10)
    fig.colorbar(image, ax=ax, label="margin (loss under it - own caption)")


def plot_bleed(rows: list[dict[str, str]], *, out: str | Path | None = None) -> Any:
    """bleed.png: the heatmap of the latest validation in rows of bleed.csv. Returns the Figure; writes a PNG
    when `out` is given."""
    from matplotlib.figure import Figure

    step = max(int(row["step"]) for row in rows)
    margins = {(r["concept"], r["under"]): float(r["margin"]) for r in rows if int(r["step"]) == step}
    size = max(4.0, 1.0 + 0.6 * len({c for c, _ in margins}))
    fig = Figure(figsize=(size + 2.5, size), layout="constrained")
    draw_bleed(fig, margins, f"Concept bleed at step {step} (near 0: not told apart)")
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=100)
    return fig
