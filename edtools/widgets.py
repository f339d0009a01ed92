"""Notebook panels: scan a data root, balance concepts with live histograms, and train with a Stop button.

The notebook cells only create these panels; the balance maths are plain functions tested without a browser.
"""

from __future__ import annotations

import contextlib
import dataclasses
import html
import io
import logging
import math
import os
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dataset import Dataset, DatasetError, ScanResult, scan, write_concept_values
from .schedule import build_epoch, expected_images_per_epoch, make_buckets

if TYPE_CHECKING:
    from .config import TrainConfig
    from .train import TrainResult

try:
    import ipywidgets as widgets
except ImportError as exc:  # the panels are what this module is for
    raise ImportError(
        "edtools.widgets needs ipywidgets: pip install ipywidgets (or the [notebook] extra)"
    ) from exc

__all__ = [
    "BalancePanel",
    "DataPanel",
    "TrainingPanel",
    "changed_values",
    "default_data_root",
    "epoch_totals",
    "equalize_multipliers",
    "gpu_status",
    "is_preservation",
    "save_values",
    "smoke_mode",
]

DEMO_DIR = Path("edtools_demo")  # relative to the notebook's folder (/content on Colab)
SMOKE_ENV = "EDTOOLS_SMOKE"
DATA_ROOT_ENV = "EDTOOLS_DATA_ROOT"
RESOLUTIONS = (64, 128, 256, 384, 512, 576, 640, 704, 768, 832, 896, 960, 1024)
MULTIPLIER_RANGE = (0.01, 10.0)  # the slider's default span; typed values outside it widen the slider
ROWS_HEIGHT = "420px"  # fixed-height scroll boxes keep 60 folders usable
_log = logging.getLogger("edtools")


def smoke_mode() -> bool:
    """True when EDTOOLS_SMOKE=1: the tiny model at resolution 64 for 2 epochs, started by the notebook."""
    return os.environ.get(SMOKE_ENV, "") == "1"


def default_data_root() -> Path:
    """$EDTOOLS_DATA_ROOT, else the demo data root next to the notebook (made on the fly when missing)."""
    return Path(os.environ.get(DATA_ROOT_ENV) or DEMO_DIR / "data")


def gpu_status() -> str:
    """One line for a person: which GPU training will use, or what to do when there is none."""
    try:
        import torch
    except ImportError:
        return "torch is not installed: run the install cell (pip install -r requirements.txt)."
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return (
            f"GPU: {props.name} ({props.total_memory / 2**30:.0f} GiB), torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}"
        )
    return (
        "No GPU found: training runs on the CPU, which only suits the tiny smoke-test model. "
        "On Colab choose Runtime > Change runtime type > GPU (e.g. T4), then run the cells again."
    )


# ---------------------------------------------------------------------------------------------------------
# Balance maths on plain data


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


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _short(path: str, width: int = 30) -> str:
    """A folder name for a narrow column: long paths keep start and end ("people/…/alice_closeups")."""
    name = "(data root)" if path == "." else path
    if len(name) <= width:
        return name
    head = width // 3
    return name[:head] + "…" + name[-(width - head - 1) :]


def _png(fig, dpi: int = 80) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


class _Panel:
    """Displays as its root widget (display(panel) or a cell ending with it), with ipywidgets 7 or 8."""

    widget: widgets.Widget

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)


# ---------------------------------------------------------------------------------------------------------
# Data panel


def _scan_html(result: ScanResult) -> str:
    """The scan as HTML: summary, every problem (first, so none hides below a long table), files, table."""
    dataset = result.dataset
    total = float(expected_images_per_epoch(dataset).sum()) or 1.0

    def value(number: float, from_file: bool) -> str:
        return _fmt(number) + (" <small>(file)</small>" if from_file else "")

    cell = "style='padding:1px 10px;text-align:right'"
    rows = "".join(
        f"<tr><td style='padding:1px 10px'>{html.escape(_short(c.path, 60))}</td><td {cell}>{c.n_images}</td>"
        f"<td {cell}>{value(c.multiplier, c.multiplier_from_file)}</td>"
        f"<td {cell}>{value(c.loss_scale, c.loss_scale_from_file)}</td>"
        f"<td {cell}>{_fmt(c.images_per_epoch)}</td><td {cell}>{c.images_per_epoch / total:.1%}</td></tr>"
        for c in dataset.concepts
    )
    header = "".join(
        f"<th {cell}>{name}</th>" for name in ("images", "multiply", "loss_scale", "per epoch", "share")
    )
    table = (
        "<table class='edtools-table' style='border-collapse:collapse'>"
        f"<tr><th style='padding:1px 10px;text-align:left'>folder</th>{header}</tr>{rows}</table>"
    )
    summary = (
        f"<b>{html.escape(str(dataset.root))}</b>: {len(dataset)} images in "
        f"{len(dataset.concepts)} folder(s), "
        f"{len(result.errors)} error(s), {len(result.warnings)} warning(s)"
    )
    colours = {"error": "#b00020", "warning": "#a05a00"}
    problems = "".join(
        f"<li style='color:{colours[p.severity]}'><b>{p.severity.upper()}</b> {html.escape(p.path)}: "
        f"{html.escape(p.message)}</li>"
        for p in result.problems
    )
    log = (
        "".join(f"<li>{html.escape(line)}</li>" for line in result.log)
        or "<li>no multiply.txt / loss_scale.txt</li>"
    )
    parts = [summary]
    if result.errors:
        parts.append(
            "<br><b style='color:#b00020'>Fix the errors below before training, then press Scan.</b>"
        )
    if problems:
        parts.append(f"<div class='edtools-problems'><ul>{problems}</ul></div>")
    parts += [f"<details open><summary>files applied</summary><ul>{log}</ul></details>", table]
    return "".join(parts)


class DataPanel(_Panel):
    """A data_root field, a Scan button, and the scan: per-folder table, applied files, warnings and errors.

    The demo data root is written first when it is the chosen folder and does not exist yet.
    """

    def __init__(self, data_root: str | os.PathLike | None = None, *, scan_now: bool = True) -> None:
        self.result: ScanResult | None = None
        self._listeners: list[Callable[[ScanResult], None]] = []
        self.root_text = widgets.Text(
            value=str(data_root if data_root is not None else default_data_root()),
            description="data_root",
            layout=widgets.Layout(width="70%"),
        )
        self.scan_button = widgets.Button(description="Scan", icon="search", button_style="primary")
        self.scan_button.on_click(lambda _: self.scan())
        self.report = widgets.HTML(layout=widgets.Layout(max_height=ROWS_HEIGHT, overflow="auto"))
        self.report.add_class("edtools-scan")
        self.widget = widgets.VBox([widgets.HBox([self.root_text, self.scan_button]), self.report])
        if scan_now:
            self.scan()

    @property
    def data_root(self) -> Path:
        return Path(self.root_text.value).expanduser()

    def on_scan(self, listener: Callable[[ScanResult], None]) -> None:
        """Call listener(result) after every successful scan."""
        self._listeners.append(listener)

    def scan(self) -> ScanResult | None:
        root = self.data_root
        if not root.exists() and root == default_data_root():
            from .demo import make_demo_dataset

            make_demo_dataset(root)
        try:
            result = scan(root)
        except DatasetError as exc:
            self.report.value = f"<b style='color:#b00020'>{html.escape(str(exc))}</b>"
            return None
        self.result = result
        self.report.value = _scan_html(result)
        for listener in self._listeners:
            listener(result)
        return result


# ---------------------------------------------------------------------------------------------------------
# Balance panel


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
            right = float(max(expected.max(initial=0), self.disk_expected.max(initial=0))) or 1.0
            self.ax.set_xlim(0, right * 1.35)
            self.ax.set_xlabel(f"images per epoch (share of the epoch); {_fmt(float(expected.sum()))} in all")
            png = _png(self.figure)
            if not self.laid_out:  # labels keep their size: lay out once, later renders only redraw
                self.figure.set_layout_engine("none")
                self.laid_out = True
            return png

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

    def _rescan(self) -> None:
        """Read the files again; the data panel's table shows the same scan."""
        result = scan(self.disk.root)
        if self.data_panel is not None:
            self.data_panel.result = result
            self.data_panel.report.value = _scan_html(result)
        self.load(result)

    # ---- display

    def say(self, message: str, *, error: bool = False) -> None:
        colour = "#b00020" if error else "#205020"
        self.status.value = f"<span style='color:{colour}'>{message}</span>" if message else ""

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


# ---------------------------------------------------------------------------------------------------------
# Training panel


class _WidgetLogHandler(logging.Handler):
    """Keeps the last log lines of a training run in an HTML widget."""

    def __init__(self, target: widgets.HTML, keep: int = 200) -> None:
        super().__init__(logging.INFO)
        self.target, self.keep, self.lines = target, keep, []
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines = (self.lines + [html.escape(self.format(record))])[-self.keep :]
        self.target.value = "<pre style='font-size:80%;margin:0'>" + "\n".join(self.lines) + "</pre>"


class _LossFigure:
    """Per-concept loss curves (exponential moving average), updated in place."""

    def __init__(self) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        self.figure = Figure(figsize=(6.4, 3.2), layout="constrained")
        FigureCanvasAgg(self.figure)
        self.ax = self.figure.add_subplot()
        self.ax.set_xlabel("step")
        self.ax.set_ylabel("loss (moving average)")
        self.ax.set_title("Loss per concept", fontsize=10)
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        self.lines: dict[str, Any] = {}
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

    def render(self) -> bytes:
        with self.lock:
            new_lines = False
            for concept, (steps, values) in self.series.items():
                if concept not in self.lines:
                    (self.lines[concept],) = self.ax.plot([], [], linewidth=1.2, label=_short(concept, 24))
                    new_lines = True
                self.lines[concept].set_data(steps, values)
            if new_lines and len(self.lines) <= 12:
                self.ax.legend(fontsize=7, loc="upper right")
            elif new_lines and self.ax.get_legend() is not None:  # too many concepts to tell apart by colour
                self.ax.get_legend().remove()
            self.ax.relim()
            self.ax.autoscale_view()
            return _png(self.figure)


def _config_field_defaults() -> dict[str, Any]:
    from .config import TrainConfig

    return {
        f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING
    }


_ACTIVE: TrainingPanel | None = None  # one run per kernel: a re-run cell must not start a second one


class TrainingPanel(_Panel):
    """Training settings that fill a TrainConfig, Train / Stop, and live progress, balance, loss and samples.

    Training runs in a background thread so Stop (and the balance panel) stay responsive; `wait()` blocks
    until it ends and re-raises its error, for notebooks run headless.
    """

    def __init__(self, balance: BalancePanel, *, smoke: bool | None = None, base_config: Any = None) -> None:
        """base_config: a TrainConfig or a YAML/JSON file of one: the settings these widgets do not show."""
        self.balance = balance
        self.smoke = smoke_mode() if smoke is None else smoke
        if isinstance(base_config, str | os.PathLike):
            from .config import TrainConfig

            base_config = TrainConfig.from_file(base_config)
        self.base_config = base_config
        self.events: list[Any] = []
        self.result: Any = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._actual: list[np.ndarray] = []
        self._last_loss_draw = 0.0
        self._trained_dataset: Dataset | None = None
        self._loss_figure: _LossFigure | None = None

        defaults = _config_field_defaults() if base_config is None else base_config.to_dict()
        if self.smoke:
            defaults = {
                **defaults,
                "model": str(DEMO_DIR / "tiny-model"),
                "out": str(DEMO_DIR / "run"),
                "resolution": 64,
                "epochs": 2,
                "batch_size": 4,
                "lr": 1e-4,
                "sample_prompts": ("a photo of alice", "an ink drawing"),
                "sample_every_steps": 20,
                "overwrite": True,  # the demo run is scratch: running the notebook again starts afresh
            }
        full = widgets.Layout(width="95%")
        text = dict(style={"description_width": "130px"})
        self.model = widgets.Text(
            value=str(defaults.get("model") or "stable-diffusion-v1-5/stable-diffusion-v1-5"),
            description="model",
            placeholder="diffusers folder or Hugging Face hub id",
            layout=full,
            **text,
        )
        self.out = widgets.Text(
            value=str(defaults.get("out") or "edtools_output"),
            description="output folder",
            layout=full,
            **text,
        )
        resolution = int(defaults.get("resolution", 512))
        self.resolution = widgets.Dropdown(
            options=sorted(set(RESOLUTIONS) | {resolution}),
            value=resolution,
            description="resolution",
            **text,
        )
        self.batch_size = widgets.IntText(
            value=int(defaults.get("batch_size", 4)), description="batch size", **text
        )
        self.epochs = widgets.IntText(value=int(defaults.get("epochs", 10)), description="epochs", **text)
        self.lr = widgets.FloatText(
            value=float(defaults.get("lr", 1e-6)), description="learning rate", **text
        )
        self.optimizer = widgets.Dropdown(
            options=["adamw8bit", "adamw"],
            value=defaults.get("optimizer", "adamw8bit"),
            description="optimizer",
            **text,
        )
        self.mixed_precision = widgets.Dropdown(
            options=["no", "fp16", "bf16"],
            value=defaults.get("mixed_precision", "no"),
            description="mixed precision",
            **text,
        )
        self.seed = widgets.IntText(value=int(defaults.get("seed", 555)), description="seed", **text)
        self.sample_prompts = widgets.Textarea(
            value="\n".join(defaults.get("sample_prompts") or ()),
            description="sample prompts",
            placeholder="one prompt per line",
            layout=full,
            **text,
        )
        self.sample_every = widgets.IntText(
            value=int(defaults.get("sample_every_steps", 0)), description="sample every", **text
        )
        self.earlier_run = widgets.Dropdown(
            options=[
                ("refuse to start", "refuse"),
                ("resume it", "resume"),
                ("delete it, start afresh", "overwrite"),
            ],
            value="resume"
            if defaults.get("resume")
            else "overwrite"
            if defaults.get("overwrite")
            else "refuse",
            description="earlier run in output folder",
            style={"description_width": "190px"},
            layout=widgets.Layout(width="420px"),
        )
        self.train_button = widgets.Button(description="Train", icon="play", button_style="primary")
        self.stop_button = widgets.Button(
            description="Stop",
            icon="stop",
            button_style="danger",
            disabled=True,
            tooltip="stop after the current step and save a resumable checkpoint",
        )
        self.train_button.on_click(lambda _: self._start_from_button())
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="60%"))
        self.progress_text = widgets.Label()
        self.progress_text.add_class("edtools-progress")
        self.status = widgets.HTML()
        self.status.add_class("edtools-train-status")
        self.balance_image = widgets.Image(format="png", layout=widgets.Layout(width="48%"))
        self.loss_image = widgets.Image(format="png", layout=widgets.Layout(width="48%"))
        self.samples = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.keep_samples = 3
        self.log = widgets.HTML(layout=widgets.Layout(max_height="160px", overflow="auto"))
        for widget in (self.batch_size, self.resolution, self.seed):
            widget.observe(lambda _: self._schedule_changed(), "value")
        self._schedule_changed()

        form = widgets.VBox(
            [
                self.model,
                self.out,
                widgets.HBox([self.resolution, self.batch_size, self.epochs]),
                widgets.HBox([self.lr, self.optimizer, self.mixed_precision]),
                widgets.HBox([self.seed, self.sample_every]),
                self.sample_prompts,
                self.earlier_run,
            ]
        )
        self.widget = widgets.VBox(
            [
                form,
                widgets.HBox([self.train_button, self.stop_button]),
                widgets.HBox([self.progress, self.progress_text]),
                self.status,
                widgets.HBox(
                    [self.balance_image, self.loss_image], layout=widgets.Layout(flex_flow="row wrap")
                ),
                self.samples,
                self.log,
            ]
        )
        self.widget.add_class("edtools-training")

    def _schedule_changed(self) -> None:
        self.balance.set_schedule(
            batch_size=self.batch_size.value, resolution=self.resolution.value, seed=self.seed.value
        )

    def config(self) -> TrainConfig:
        """The TrainConfig these widgets describe; unsaved balance values go in as multipliers/loss_scales."""
        from .config import TrainConfig

        changes = self.balance.changes()
        values = {
            "data_root": str(self.balance.disk.root if self.balance.disk else ""),
            "model": self.model.value.strip(),
            "out": self.out.value.strip(),
            "resolution": int(self.resolution.value),
            "batch_size": int(self.batch_size.value),
            "epochs": int(self.epochs.value),
            "lr": float(self.lr.value),
            "optimizer": self.optimizer.value,
            "mixed_precision": self.mixed_precision.value,
            "seed": int(self.seed.value),
            "sample_prompts": tuple(p.strip() for p in self.sample_prompts.value.splitlines() if p.strip()),
            "sample_every_steps": int(self.sample_every.value),
            "resume": self.earlier_run.value == "resume",
            "overwrite": self.earlier_run.value == "overwrite",
            "progress_bar": False,  # the panel has its own
            "multipliers": {c: v["multiplier"] for c, v in changes.items() if "multiplier" in v},
            "loss_scales": {c: v["loss_scale"] for c, v in changes.items() if "loss_scale" in v},
        }
        if self.smoke:
            values.update(sample_steps=2)  # the tiny model's samples are noise anyway: keep them quick
        if self.base_config is not None:
            return TrainConfig.from_dict({**self.base_config.to_dict(), **values})
        return TrainConfig.from_dict(values)

    # ---- run control

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _start_from_button(self) -> None:
        try:
            self.start()
        except Exception as exc:  # a click has no cell to raise into: say it in the panel
            self._say(f"not started: {exc}", error=True)

    def start(self) -> None:
        """Check the settings and start training in a background thread (returns at once)."""
        global _ACTIVE
        if _ACTIVE is not None and _ACTIVE.running:
            raise RuntimeError(
                "a training run is still going (maybe from an earlier cell): press its Stop first"
            )
        config = self.config()  # a bad value stops here with the field's name in the message
        self._trained_dataset = self.balance.dataset()
        self.events, self.result, self.error = [], None, None
        self._actual = []
        self._loss_figure = _LossFigure()
        self._last_loss_draw = 0.0
        self._stop.clear()
        self.samples.children = []
        self.train_button.disabled, self.stop_button.disabled = True, False
        self._say("starting…")
        self._thread = threading.Thread(target=self._run, args=(config,), name="edtools-train", daemon=True)
        _ACTIVE = self
        self._thread.start()

    def stop(self) -> None:
        """Ask training to stop after the current step; it saves a resumable checkpoint."""
        if self.running:
            self._stop.set()
            self._say("stopping after the current step, then saving a resumable checkpoint…")

    def wait(self, timeout: float | None = None) -> TrainResult | None:
        """Block until training ends; re-raise its error. Returns the TrainResult."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"training still running after {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"training failed: {self.error}") from self.error
        return self.result

    def _run(self, config) -> None:
        handler = _WidgetLogHandler(self.log)
        level = _log.level
        _log.addHandler(handler)
        if level == logging.NOTSET or level > logging.INFO:
            _log.setLevel(logging.INFO)
        try:
            if self.smoke and not Path(config.model).exists():
                from .model import make_tiny_model

                self._say(f"making the tiny smoke-test model in {config.model}…")
                make_tiny_model(config.model)
            self._set_progress_total(config)
            from .train import train

            self._say("training…")
            self.result = train(config, self._on_event)
            if self.result.stop_reason == "callback":
                self.earlier_run.value = "resume"
                self._say(f"Stopped cleanly: {html.escape(str(self.result))}. Press Train to resume.")
            else:
                self._say(f"Done: {html.escape(str(self.result))}")
        except BaseException as exc:  # shown in the panel; wait() re-raises it
            self.error = exc
            self._say(
                f"training failed: {html.escape(str(exc))}<details><summary>traceback</summary><pre>"
                f"{html.escape(traceback.format_exc())}</pre></details>",
                error=True,
            )
        finally:
            _log.removeHandler(handler)
            _log.setLevel(level)
            self.train_button.disabled, self.stop_button.disabled = False, True

    def _set_progress_total(self, config) -> None:
        dataset = self._trained_dataset
        buckets = make_buckets(config.resolution)
        batches = [
            build_epoch(
                dataset, epoch=e, seed=config.seed, batch_size=config.batch_size, buckets=buckets
            ).n_batches
            for e in range(config.epochs)
        ]
        total = sum(-(-n // config.grad_accum) for n in batches)  # optimizer steps, as train() counts them
        if config.max_steps is not None:
            total = min(total, config.max_steps)
        self.progress.max, self.progress.value = max(total, 1), 0

    # ---- events from the training thread

    def _on_event(self, event) -> bool:
        self.events.append(event)
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)
        return self._stop.is_set()

    def _on_step(self, event) -> None:
        self.progress.value = min(int(event.global_step), self.progress.max)
        self.progress_text.value = (
            f"step {event.global_step}/{self.progress.max}, epoch {event.epoch + 1}, loss {event.loss:.4f}"
        )
        self._loss_figure.add(int(event.global_step), event.loss_per_concept)
        now = time.monotonic()
        if now - self._last_loss_draw > 1.0:  # rendering competes with training for the CPU
            self._last_loss_draw = now
            self.loss_image.value = self._loss_figure.render()

    def _on_epoch(self, event) -> None:
        from .report import plot_balance

        dataset = self._trained_dataset
        self._actual.append(np.array([event.images_per_concept.get(c, 0) for c in dataset.concept_paths]))
        figure = plot_balance(
            dataset,
            np.stack(self._actual),
            title=f"Images per concept: expected vs actual, {len(self._actual)} epoch(s)",
        )
        self.balance_image.value = _png(figure)
        if self._loss_figure is not None:
            self.loss_image.value = self._loss_figure.render()

    def _on_sample(self, event) -> None:
        from PIL import Image

        images = []
        for path in event.paths:
            data = Path(path).read_bytes()
            with Image.open(io.BytesIO(data)) as grid:
                width = grid.width
            shown = min(max(width, 256), 640)  # small grids (tiny models) enlarged, big ones shrunk
            images.append(widgets.Image(value=data, format="png", layout=widgets.Layout(width=f"{shown}px")))
        label = widgets.HTML(f"<b>samples at step {event.global_step}</b>")
        newest = widgets.VBox([label, *images], layout=widgets.Layout(margin="0 12px 8px 0"))
        self.samples.children = ([newest] + list(self.samples.children))[: self.keep_samples]

    def _on_end(self, event) -> None:
        self.progress.value = self.progress.max if not self._stop.is_set() else self.progress.value
        if self._loss_figure is not None:
            self.loss_image.value = self._loss_figure.render()

    def _say(self, message: str, *, error: bool = False) -> None:
        colour = "#b00020" if error else "#205020"
        self.status.value = f"<span style='color:{colour}'>{message}</span>"
