"""The training panel's live memorisation gap chart and concept bleed heatmap, redrawn at each validation from
the TrainEvents (gap_per_concept, bleed); the same pictures as out/validation.png's gap panel and out/bleed.png.
"""

from __future__ import annotations

import threading
from typing import Any

from .common import _png, widgets

__all__ = ["MetricsView"]


class MetricsView:
    """Two images side by side: the gap per concept over the steps and the latest validation's bleed margins.
    Both stay hidden until a validation has measured them."""

    def __init__(self) -> None:
        self.gap_image = widgets.Image(format="png", layout=widgets.Layout(width="48%", display="none"))
        self.gap_image.add_class("edtools-gap-chart")
        self.bleed_image = widgets.Image(format="png", layout=widgets.Layout(width="40%", display="none"))
        self.bleed_image.add_class("edtools-bleed-heatmap")
        self.widget = widgets.HBox(
            [self.gap_image, self.bleed_image], layout=widgets.Layout(flex_flow="row wrap")
        )
        self.widget.add_class("edtools-metrics")
        self.lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget the previous run's numbers (a new run starts)."""
        with self.lock:
            self.gaps: dict[str, tuple[list[int], list[float]]] = {}
            self.bleed: dict[tuple[str, str], float] = {}
            self.bleed_step: int | None = None
        for image in (self.gap_image, self.bleed_image):
            image.layout.display = "none"

    def add(self, event: Any) -> None:
        """Take a validation event's gap and bleed and redraw what changed."""
        with self.lock:
            for concept, gap in event.gap_per_concept.items():
                steps, values = self.gaps.setdefault(concept, ([], []))
                steps.append(int(event.global_step))
                values.append(float(gap))
            if event.bleed:
                self.bleed, self.bleed_step = dict(event.bleed), int(event.global_step)
        if event.gap_per_concept:
            self.gap_image.value = self.render_gap()
            self.gap_image.layout.display = ""
        if event.bleed:
            self.bleed_image.value = self.render_bleed()
            self.bleed_image.layout.display = ""

    def render_gap(self) -> bytes:
        from matplotlib.figure import Figure

        from ..train.metric_plots import draw_gap

        with self.lock:
            rows = [
                {"step": str(s), "concept": concept, "gap": repr(v)}
                for concept, (steps, values) in self.gaps.items()
                for s, v in zip(steps, values, strict=True)
            ]
        fig = Figure(figsize=(6.4, 3.2), layout="constrained")
        draw_gap(fig.add_subplot(), rows)
        return _png(fig)

    def render_bleed(self) -> bytes:
        from matplotlib.figure import Figure

        from ..train.metric_plots import draw_bleed

        with self.lock:
            margins, step = dict(self.bleed), self.bleed_step
        size = max(3.2, 1.0 + 0.5 * len({c for c, _ in margins}))
        fig = Figure(figsize=(size + 2.2, size), layout="constrained")
        draw_bleed(fig, margins, f"Concept bleed at step {step} (near 0: not told apart)")
        return _png(fig)
