"""What the training panel shows while a run goes: loss curves (training and validation per concept on one
chart), the multipliers each epoch trained with, the images it held, and the run's log lines.
"""

from __future__ import annotations

import html
import logging
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from .common import _fmt, _png, _short, widgets

__all__ = ["LossFigure", "WidgetLogHandler", "counts_html", "history_html"]


class WidgetLogHandler(logging.Handler):
    """Keeps the last log lines of a training run in an HTML widget."""

    def __init__(self, target: widgets.HTML, keep: int = 200) -> None:
        super().__init__(logging.INFO)
        self.target, self.keep, self.lines = target, keep, []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines = (self.lines + [html.escape(self.format(record))])[-self.keep :]
        self.target.value = "<pre style='font-size:80%;margin:0'>" + "\n".join(self.lines) + "</pre>"


class LossFigure:
    """Per-concept loss on one chart, updated in place: the training loss (exponential moving average) as a line,
    the validation loss on held-out images as dots joined by a dashed line of the same colour."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(6.4, 3.2), layout="constrained")
        FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_subplot()
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss")
        self.ax.set_title("Loss per concept (line: training, average; dots: validation)", fontsize=9)
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        self.validation: dict[str, tuple[list[int], list[float]]] = {}
        self.lines: dict[str, Any] = {}
        self.dots: dict[str, Any] = {}
        self.lock = threading.Lock()

    def add(self, step: int, losses: Mapping[str, float], smoothing: float = 0.9) -> None:
        with self.lock:
            for concept, loss in losses.items():
                if not math.isfinite(loss):  # a skipped step: it would poison the moving average
                    continue
                steps, values = self.series.setdefault(concept, ([], []))
                values.append(
                    float(loss) if not values else smoothing * values[-1] + (1 - smoothing) * float(loss)
                )
                steps.append(step)

    def add_validation(self, step: int, losses: Mapping[str, float]) -> None:
        with self.lock:
            for concept, loss in losses.items():
                steps, values = self.validation.setdefault(concept, ([], []))
                steps.append(step)
                values.append(float(loss))

    def _line(self, concept: str) -> Any:
        if concept not in self.lines:
            (self.lines[concept],) = self.ax.plot([], [], linewidth=1.2, label=_short(concept, 24))
        return self.lines[concept]

    def render(self) -> bytes:
        with self.lock:
            known = len(self.lines)
            for concept, (steps, values) in self.series.items():
                self._line(concept).set_data(steps, values)
            for concept, (steps, values) in self.validation.items():
                colour = self._line(concept).get_color()
                if concept not in self.dots:
                    (self.dots[concept],) = self.ax.plot(
                        [], [], "o--", color=colour, markersize=3, linewidth=0.8
                    )
                self.dots[concept].set_data(steps, values)
            if len(self.lines) != known and len(self.lines) <= 12:
                self.ax.legend(fontsize=7, loc="upper right")
            elif len(self.lines) != known and self.ax.get_legend() is not None:  # too many to tell apart
                self.ax.get_legend().remove()
            self.ax.relim()
            self.ax.autoscale_view()
            return _png(self.figure)


def history_html(
    history: Sequence[Mapping[str, float]],
    concepts: Sequence[str],
    auto: Sequence[Mapping[str, str]] = (),
) -> str:
    """A table of the multiplier each epoch trained with, per concept; a changed value is bold, one that
    auto-balance set (`auto`: per epoch {concept: reason}) is marked 'a' with its reason on hover."""
    if not history:
        return ""
    head = "".join(f"<th style='padding:0 6px'>{e}</th>" for e in range(len(history)))
    rows = []
    for concept in concepts:
        cells, previous = [], None
        for epoch, values in enumerate(history):
            value = values.get(concept)
            text = "" if value is None else _fmt(value)
            bold = previous is not None and value != previous
            text = "<b>" + text + "</b>" if bold else text
            reason = auto[epoch].get(concept) if epoch < len(auto) else None
            if reason:
                text = f"<span title='{html.escape(reason, quote=True)}'>{text}<sup>a</sup></span>"
            cells.append(f"<td style='padding:0 6px;text-align:right'>{text}</td>")
            previous = value
        rows.append(
            f"<tr><td style='padding:0 6px'>{html.escape(_short(concept, 30))}</td>{''.join(cells)}</tr>"
        )
    legend = "<br><small><sup>a</sup> set by auto-balance (hover for why)</small>" if any(auto) else ""
    return (
        "<details open><summary>multiplier per epoch</summary><table style='font-size:85%'>"
        f"<tr><th style='text-align:left;padding:0 6px'>folder / epoch</th>{head}</tr>{''.join(rows)}</table>"
        f"{legend}</details>"
    )


def counts_html(epoch: int, counts: Mapping[str, int]) -> str:
    """One line: the images per concept an epoch trained."""
    parts = ", ".join(f"{html.escape(concept)} {n}" for concept, n in counts.items())
    return f"<small>epoch {epoch} trained: {parts}</small>"
