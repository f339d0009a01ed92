"""The balance panel: a multiplier and loss_scale slider per folder, a live histogram, Equalize/Reset/Save.

The balance maths (equalize, changed values, totals) are plain functions over a Dataset, tested without a browser.
"""

from __future__ import annotations

import contextlib
import html
import math
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..balance.schedule import build_epoch, expected_images_per_epoch, make_buckets
from ..dataset.scan import Dataset, DatasetError, ScanResult, scan, write_concept_values
from .common import MULTIPLIER_RANGE, ROWS_HEIGHT, _fmt, _Panel, _png, _short, widgets
from .data import DataPanel

__all__ = [
    "BalancePanel",
    "changed_values",
    "epoch_totals",
    "equalize_multipliers",
    "is_preservation",
    "save_values",
]


def is_preservation(multiplier_on_disk: float) -> bool:
    """A preservation folder is one whose multiply.txt on disk is below 1 (a sampled share of a large set)."""
    return multiplier_on_disk < 1.0


def _round_sig(value: float, digits: int) -> float:
    return float(f"{value:.{digits}g}")


def equalize_multipliers(disk: Dataset, *, digits: int = 4) -> dict[str, float]:
    """Multipliers giving every non-preservation concept the images per epoch of the largest such folder.

    Preservation folders (multiplier < 1 on disk) are left out of the result. Values are rounded to `digits`
    significant digits so the files stay readable; expected counts then agree to that precision.
    """
    trained = [c for c in disk.concepts if not is_preservation(c.multiplier)]
    if not trained:
        return {}
    target = max(c.n_images for c in trained)
    return {c.path: _round_sig(target / c.n_images, digits) for c in trained}


def changed_values(
    disk: Dataset, multipliers: Mapping[str, float], loss_scales: Mapping[str, float]
) -> dict[str, dict[str, float]]:
    """{concept: {"multiplier": v, "loss_scale": v}} for the values that differ from the files on disk."""
    changes: dict[str, dict[str, float]] = {}
    for concept in disk.concepts:
        values = {}
        if concept.path in multipliers and multipliers[concept.path] != concept.multiplier:
            values["multiplier"] = float(multipliers[concept.path])
        if concept.path in loss_scales and loss_scales[concept.path] != concept.loss_scale:
            values["loss_scale"] = float(loss_scales[concept.path])
        if values:
            changes[concept.path] = values
    return changes


def save_values(
    disk: Dataset, multipliers: Mapping[str, float], loss_scales: Mapping[str, float]
) -> list[Path]:
    """Write multiply.txt / loss_scale.txt for the changed values only (atomically); returns the files."""
    written: list[Path] = []
    for concept, values in changed_values(disk, multipliers, loss_scales).items():
        written += write_concept_values(
            disk.root, concept, multiplier=values.get("multiplier"), loss_scale=values.get("loss_scale")
        )
    return written


def epoch_totals(dataset: Dataset, *, batch_size: int, resolution: int, seed: int = 555) -> tuple[float, int]:
    """(expected images per epoch, steps in epoch 0 of the real schedule: buckets add short batches)."""
    expected = float(expected_images_per_epoch(dataset).sum())
    if not dataset.concepts:
        return expected, 0
    schedule = build_epoch(
        dataset, epoch=0, seed=seed, batch_size=batch_size, buckets=make_buckets(resolution)
    )
    return expected, schedule.n_batches


class _BalanceFigure:
    """The balance histogram, built once; updates move the existing bars and labels, then render a PNG."""

    def __init__(
        self, concepts: tuple[str, ...], disk_expected: np.ndarray, preservation: np.ndarray
    ) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(concepts)
        self.figure = Figure(figsize=(5.6, max(2.4, 0.24 * n + 1.3)), layout="constrained")
        FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_subplot()
        y = np.arange(n)
        self.disk_bars = self.ax.barh(
            y, np.zeros(n), height=0.8, fill=False, edgecolor="#888888", linestyle="--", label="on disk"
        )
        self.bars = self.ax.barh(y, np.zeros(n), height=0.55, color="#4c72b0", label="now")
        # what the last trained epoch really held, shown once a run reports one
        self.trained_bars = self.ax.barh(y + 0.3, np.zeros(n), height=0.18, color="#dd8452")
        self.trained = np.zeros(n)
        self.ax.barh([0], [0], color="#8fa8c8", label="preservation (multiplier < 1 on disk)")
        self.labels = [self.ax.text(0, yi, "", va="center", fontsize=8) for yi in y]
        self.ax.set_yticks(y, [_short(c, 28) for c in concepts], fontsize=8 if n > 20 else 9)
        self.ax.set_ylim(max(n, 1) - 0.5, -0.5)  # first folder on top, same order as the rows
        self.ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=3, fontsize=8, frameon=False)
        self.laid_out = False
        self.lock = threading.Lock()
        self.set_disk(disk_expected, preservation)

    def set_disk(self, disk_expected: np.ndarray, preservation: np.ndarray) -> None:
        """The dashed outlines (values in the files) and the bar colours (preservation folders paler)."""
        with self.lock:
            self.disk_expected = np.asarray(disk_expected, dtype=np.float64)
            for outline, bar, value, pale in zip(
                self.disk_bars, self.bars, self.disk_expected, preservation, strict=True
            ):
                outline.set_width(value)
                bar.set_color("#8fa8c8" if pale else "#4c72b0")

    def update(self, expected: np.ndarray) -> bytes:
        with self.lock:
            total = float(expected.sum()) or 1.0
            for bar, label, value in zip(self.bars, self.labels, expected, strict=True):
                bar.set_width(value)
                label.set_x(value)
                label.set_text(f" {_fmt(value)} ({value / total:.1%})")
            right = max(
                expected.max(initial=0), self.disk_expected.max(initial=0), self.trained.max(initial=0)
            )
            right = float(right) or 1.0
            self.ax.set_xlim(0, right * 1.35)
            self.ax.set_xlabel(f"images per epoch (share of the epoch); {_fmt(float(expected.sum()))} in all")
            png = _png(self.figure)
            if not self.laid_out:  # labels keep their size: lay out once, later renders only redraw
                self.figure.set_layout_engine("none")
                self.laid_out = True
            return png

    def set_trained(self, counts: np.ndarray, epoch: int) -> None:
        """Thin bars of the images the last trained epoch held, under the current values' bars."""
        with self.lock:
            self.trained = np.asarray(counts, dtype=np.float64)
            for bar, value in zip(self.trained_bars, self.trained, strict=True):
                bar.set_width(value)
            self.trained_bars.set_label(f"trained in epoch {epoch}")
            self.ax.legend(loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=2, fontsize=8, frameon=False)
            self.figure.set_layout_engine("constrained")  # the legend grew: lay out once more
            self.laid_out = False

    def widths(self) -> np.ndarray:
        return np.array([bar.get_width() for bar in self.bars])


class _ConceptRow:
    """One folder: name, image count, multiplier (log slider + typed box in sync), loss_scale, per epoch."""

    def __init__(self, panel: BalancePanel, path: str, n_images: int) -> None:
        self.panel, self.path, self.n_images = panel, path, n_images
        self._syncing = False
        lo, hi = (math.log10(v) for v in MULTIPLIER_RANGE)
        self.name = widgets.HTML(
            f"<div title='{html.escape(path)}' style='white-space:nowrap;overflow:hidden;font-size:95%'>"
            f"{html.escape(_short(path, 21))}</div>",
            layout=widgets.Layout(width="170px", overflow="hidden"),
        )
        self.count = widgets.Label(str(n_images), layout=widgets.Layout(width="50px"))
        self.slider = widgets.FloatLogSlider(
            value=1.0, base=10, min=lo, max=hi, step=0.01, readout=False, layout=widgets.Layout(width="170px")
        )
        self.slider.add_class("edtools-multiplier-slider")
        self.box = widgets.FloatText(value=1.0, layout=widgets.Layout(width="72px"))
        self.box.add_class("edtools-multiplier-box")
        self.loss = widgets.FloatSlider(
            value=1.0, min=0.0, max=2.0, step=0.05, readout_format=".2f", layout=widgets.Layout(width="180px")
        )
        self.loss.add_class("edtools-loss-slider")
        self.per_epoch = widgets.HTML(layout=widgets.Layout(width="70px"))
        self.slider.observe(self._slider_moved, "value")
        self.box.observe(self._box_typed, "value")
        self.loss.observe(self._loss_moved, "value")
        self.widget = widgets.HBox(
            [self.name, self.count, self.slider, self.box, self.loss, self.per_epoch],
            layout=widgets.Layout(align_items="center", flex="0 0 auto"),  # no squeezing: the box scrolls
        )
        self.widget.add_class("edtools-row")

    @contextlib.contextmanager
    def _quiet(self):
        """Set widget values without the observers taking them for user edits."""
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    def _put_slider(self, multiplier: float) -> None:
        """Move the log slider, widening its range for a typed value outside it (never clamp)."""
        exponent = math.log10(multiplier)
        self.slider.min = min(self.slider.min, math.floor(exponent))
        self.slider.max = max(self.slider.max, math.ceil(exponent))
        self.slider.value = multiplier

    def show(self, multiplier: float, loss_scale: float, changed: bool) -> None:
        """Put values into the widgets without echoing them back as user edits."""
        with self._quiet():
            self._put_slider(multiplier)
            self.box.value = multiplier
            self.loss.min = min(self.loss.min, math.floor(loss_scale))
            self.loss.max = max(self.loss.max, math.ceil(loss_scale))
            self.loss.value = loss_scale
        self.show_per_epoch(multiplier, changed)

    def show_per_epoch(self, multiplier: float, changed: bool) -> None:
        text = _fmt(self.n_images * multiplier)
        self.per_epoch.value = f"<b>{text}</b> *" if changed else text

    def _slider_moved(self, change) -> None:
        if self._syncing:
            return
        current = self.panel.multipliers[self.path]
        if abs(math.log10(change["new"]) - math.log10(current)) <= self.slider.step / 2 + 1e-9:
            return  # the browser snapping a shown value to the slider's step: not a user move
        value = _round_sig(change["new"], 3)  # a drag position, quantised to a readable value
        with self._quiet():
            self.box.value = value
        self.panel.set_multiplier(self.path, value, from_row=True)

    def _box_typed(self, change) -> None:
        if self._syncing:
            return
        value = float(change["new"])
        if not math.isfinite(value) or value <= 0:
            self.panel.say(
                f"multiplier for '{self.path}' must be a number > 0 (e.g. 0.1 or 2), not {value:g}; "
                f"kept {_fmt(self.panel.multipliers[self.path])}",
                error=True,
            )
            with self._quiet():
                self.box.value = self.panel.multipliers[self.path]
            return
        with self._quiet():
            self._put_slider(value)
        self.panel.set_multiplier(self.path, value, from_row=True)

    def _loss_moved(self, change) -> None:
        if self._syncing:
            return
        if abs(change["new"] - self.panel.loss_scales[self.path]) <= self.loss.step / 2 + 1e-9:
            return  # the browser snapping a shown value to the slider's step: not a user move
        self.panel.set_loss_scale(self.path, float(change["new"]), from_row=True)


class BalancePanel(_Panel):
    """One row per folder (multiplier and loss_scale), a live histogram, totals, and Equalize / Reset / Save.

    Values live in `multipliers` / `loss_scales` (concept path -> number); files change only on Save.
    Histogram redraws are throttled to one per `debounce_s` while a slider moves (0: redraw at once).
    """

    def __init__(
        self,
        data: DataPanel | ScanResult | Dataset,
        *,
        batch_size: int = 4,
        resolution: int = 512,
        seed: int = 555,
        debounce_s: float = 0.15,
    ) -> None:
        self.batch_size, self.resolution, self.seed = batch_size, resolution, seed
        self.debounce_s = debounce_s
        self.disk: Dataset | None = None
        self.multipliers: dict[str, float] = {}
        self.loss_scales: dict[str, float] = {}
        self.rows: dict[str, _ConceptRow] = {}
        self.figure: _BalanceFigure | None = None
        self._timer: threading.Timer | None = None
        self._timer_lock = threading.Lock()
        self.redraws = 0

        self.totals = widgets.Label()
        self.totals.add_class("edtools-total")
        self.totals_note = widgets.HTML()
        self.status = widgets.HTML()
        self.status.add_class("edtools-status")
        self.equalize_button = widgets.Button(
            description="Equalize",
            icon="balance-scale",
            tooltip="same images per epoch for every non-preservation folder",
        )
        self.reset_button = widgets.Button(
            description="Reset", icon="undo", tooltip="back to the files on disk"
        )
        self.save_button = widgets.Button(
            description="Save",
            icon="save",
            button_style="success",
            tooltip="write multiply.txt / loss_scale.txt",
        )
        self.equalize_button.on_click(lambda _: self.equalize())
        self.reset_button.on_click(lambda _: self.reset())
        self.save_button.on_click(lambda _: self.save())
        self.histogram = widgets.Image(format="png", layout=widgets.Layout(width="100%", flex="0 0 auto"))
        self.histogram.add_class("edtools-histogram")
        header = widgets.HTML(
            "<div style='display:flex;font-weight:bold;font-size:90%'><span style='width:174px'>folder</span>"
            "<span style='width:54px'>images</span>"
            "<span style='width:250px'>multiplier (0.01-10, or type)</span>"
            "<span style='width:184px'>loss_scale</span><span style='width:74px'>per epoch</span></div>"
        )
        self.rows_box = widgets.VBox(layout=widgets.Layout(max_height=ROWS_HEIGHT, overflow="auto"))
        self.rows_box.add_class("edtools-rows")
        histogram_box = widgets.VBox(
            [self.histogram], layout=widgets.Layout(max_height=ROWS_HEIGHT, overflow="auto", width="450px")
        )
        self.widget = widgets.VBox(
            [
                widgets.HBox([self.equalize_button, self.reset_button, self.save_button]),
                widgets.HBox([self.totals, self.totals_note], layout=widgets.Layout(align_items="center")),
                widgets.Box(
                    [widgets.VBox([header, self.rows_box]), histogram_box],
                    layout=widgets.Layout(flex_flow="row wrap", align_items="flex-start"),
                ),
                self.status,
            ]
        )
        self.widget.add_class("edtools-balance")

        if isinstance(data, DataPanel):
            self.data_panel: DataPanel | None = data
            data.on_scan(self.load)
            if data.result is not None:
                self.load(data.result)
            else:
                self.say("scan a data root first (the Scan button above)", error=True)
        else:
            self.data_panel = None
            self.load(data)

    # ---- state

    def load(self, source: ScanResult | Dataset) -> None:
        """Take a (new) scan: rows and histogram rebuilt when the folders differ, else values refreshed."""
        disk = source.dataset if isinstance(source, ScanResult) else source
        same_folders = self.disk is not None and disk.concept_paths == self.disk.concept_paths
        self.disk = disk
        self.multipliers = {c.path: c.multiplier for c in disk.concepts}
        self.loss_scales = {c.path: c.loss_scale for c in disk.concepts}
        preservation = np.array([is_preservation(c.multiplier) for c in disk.concepts], dtype=bool)
        if not same_folders or self.figure is None:
            self.rows = {c.path: _ConceptRow(self, c.path, c.n_images) for c in disk.concepts}
            self.rows_box.children = [row.widget for row in self.rows.values()]
            self.figure = _BalanceFigure(disk.concept_paths, expected_images_per_epoch(disk), preservation)
        else:
            self.figure.set_disk(expected_images_per_epoch(disk), preservation)
        for row in self.rows.values():
            row.show(self.multipliers[row.path], self.loss_scales[row.path], changed=False)
        if isinstance(source, ScanResult) and source.errors:
            self.say(
                f"{len(source.errors)} error(s) in the data root (see the scan above): "
                "training refuses until fixed",
                error=True,
            )
        else:
            self.say("")
        self.flush()

    def dataset(self) -> Dataset:
        """The scanned dataset with the panel's current values."""
        if self.disk is None:
            raise DatasetError("no data root scanned yet: press Scan in the data panel")
        return self.disk.with_values(self.multipliers, self.loss_scales)

    def changes(self) -> dict[str, dict[str, float]]:
        """Unsaved values: {concept: {"multiplier"/"loss_scale": value}}."""
        return changed_values(self.disk, self.multipliers, self.loss_scales) if self.disk else {}

    def set_multiplier(self, concept: str, value: float, *, from_row: bool = False) -> None:
        value = float(value)
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"multiplier for '{concept}' must be a finite number > 0, got {value}")
        self.multipliers[concept] = value
        self._after_change(concept, from_row)

    def set_loss_scale(self, concept: str, value: float, *, from_row: bool = False) -> None:
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"loss_scale for '{concept}' must be a finite number, got {value}")
        self.loss_scales[concept] = value
        self._after_change(concept, from_row)

    def set_schedule(
        self, *, batch_size: int | None = None, resolution: int | None = None, seed: int | None = None
    ) -> None:
        """The training settings that decide steps per epoch (the training panel keeps them in step)."""
        self.batch_size = self.batch_size if batch_size is None else batch_size
        self.resolution = self.resolution if resolution is None else resolution
        self.seed = self.seed if seed is None else seed
        self.request_redraw()

    def _after_change(self, concept: str, from_row: bool) -> None:
        row = self.rows[concept]
        changed = concept in self.changes()
        if from_row:
            row.show_per_epoch(self.multipliers[concept], changed)
        else:
            row.show(self.multipliers[concept], self.loss_scales[concept], changed)
        self.request_redraw()

    # ---- buttons

    def equalize(self) -> dict[str, float]:
        """Suggest equal images per epoch for the non-preservation folders (saved only by Save)."""
        suggested = equalize_multipliers(self.disk) if self.disk else {}
        if not suggested:
            self.say("nothing to equalize: no folder outside preservation (multiplier < 1 on disk)")
            return suggested
        for concept, value in suggested.items():
            self.multipliers[concept] = value
            self.rows[concept].show(value, self.loss_scales[concept], concept in self.changes())
        target = max(c.n_images for c in self.disk.concepts if c.path in suggested)
        kept = [html.escape(c.path) for c in self.disk.concepts if c.path not in suggested]
        self.say(
            f"Equalized {len(suggested)} folder(s) to {target} images/epoch each"
            + (f"; preservation folders left alone: {', '.join(kept)}" if kept else "")
            + ". Press Save to write the files."
        )
        self.request_redraw()
        return suggested

    def reset(self) -> None:
        """Back to the files on disk (re-read them: they may have been edited meanwhile)."""
        if self.disk is None:
            return
        self._rescan()
        self.say("Reset to the values in the files on disk.")

    def save(self) -> list[Path]:
        """Write the changed values (atomic, a file per changed value), re-scan, and say what was written."""
        if self.disk is None:
            return []
        changes = self.changes()
        try:
            written = save_values(self.disk, self.multipliers, self.loss_scales)
        except (DatasetError, OSError) as exc:
            self.say(f"nothing saved: {exc}", error=True)
            return []
        if not written:
            self.say("Nothing to save: every value equals its file on disk.")
            return []
        root = self.disk.root
        self._rescan()
        lines = []
        for concept, values in changes.items():
            for kind, name in (("multiplier", "multiply.txt"), ("loss_scale", "loss_scale.txt")):
                if kind in values:
                    lines.append(f"{html.escape(_short(concept, 60))}/{name} = {_fmt(values[kind])}")
        self.say(f"Saved {len(written)} file(s) in {html.escape(str(root))}: " + "; ".join(lines))
        return written

    @property
    def kohya_repeats(self) -> bool:
        """Whether this panel's scans apply kohya folder names (the data panel's switch; off without one)."""
        return self.data_panel is not None and bool(self.data_panel.kohya_repeats.value)

    def _rescan(self) -> None:
        """Read the files again; the data panel's table shows the same scan."""
        result = scan(self.disk.root, kohya_repeats=self.kohya_repeats)
        if self.data_panel is not None:
            self.data_panel.show(result)
        self.load(result)

    # ---- display

    def say(self, message: str, *, error: bool = False) -> None:
        colour = "#b00020" if error else "#205020"
        self.status.value = f"<span style='color:{colour}'>{message}</span>" if message else ""

    def show_trained(self, counts: Mapping[str, int], epoch: int) -> None:
        """During a run: the images the last finished epoch trained per folder, beside the values the next
        epoch will use (the sliders), so a change shows what it does."""
        if self.figure is None or self.disk is None:
            return
        self.figure.set_trained(
            np.array([counts.get(c, 0) for c in self.disk.concept_paths], dtype=float), epoch
        )
        self.request_redraw()

    def request_redraw(self) -> None:
        """Redraw soon: at most once per debounce_s while events arrive, always with the latest values."""
        if self.debounce_s <= 0:
            self.flush()
            return
        with self._timer_lock:
            if self._timer is not None:
                return  # the pending redraw reads the values when it fires
            self._timer = threading.Timer(self.debounce_s, self._timer_fired)
            self._timer.daemon = True
            self._timer.start()

    def _timer_fired(self) -> None:
        with self._timer_lock:
            self._timer = None
        try:
            self.flush()
        except Exception as exc:  # a timer thread has no cell to report to
            self.say(f"redraw failed: {exc}", error=True)

    def flush(self) -> None:
        """Redraw the histogram and totals now from the current values."""
        if self.disk is None or self.figure is None:
            return
        dataset = self.dataset()
        self.histogram.value = self.figure.update(expected_images_per_epoch(dataset))
        self.redraws += 1
        try:
            images, steps = epoch_totals(
                dataset, batch_size=self.batch_size, resolution=self.resolution, seed=self.seed
            )
        except ValueError as exc:  # e.g. a batch size of 0 typed in the training panel
            self.totals.value = f"Total: {_fmt(float(expected_images_per_epoch(dataset).sum()))} images/epoch"
            self.totals_note.value = (
                f"<span style='color:#b00020'>steps unknown: {html.escape(str(exc))}</span>"
            )
            return
        self.totals.value = f"Total: {_fmt(images)} images/epoch, {steps} steps/epoch"
        n_changes = len(self.changes())
        unsaved = f"; <b>{n_changes} unsaved folder(s)</b> (marked *)" if n_changes else ""
        self.totals_note.value = (
            f"<small>&nbsp;steps at batch size {self.batch_size}, "
            f"resolution {self.resolution}{unsaved}</small>"
        )
