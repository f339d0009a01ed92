"""The data panel: a data_root field, a Scan button, and the scan as a table with every problem listed first.

The demo data root is made on first use when it is the chosen folder.
"""

from __future__ import annotations

import html
import os
from collections.abc import Callable
from pathlib import Path

from ..balance.schedule import expected_images_per_epoch
from ..dataset.scan import DatasetError, ScanResult, scan
from .common import ROWS_HEIGHT, _fmt, _Panel, _short, default_data_root, widgets

__all__ = ["DataPanel"]


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

    def __init__(
        self,
        data_root: str | os.PathLike | None = None,
        *,
        scan_now: bool = True,
        kohya_repeats: bool = False,
    ) -> None:
        self.result: ScanResult | None = None
        self._listeners: list[Callable[[ScanResult], None]] = []
        self.root_text = widgets.Text(
            value=str(data_root if data_root is not None else default_data_root()),
            description="data_root",
            layout=widgets.Layout(width="70%"),
        )
        self.scan_button = widgets.Button(description="Scan", icon="search", button_style="primary")
        self.scan_button.on_click(lambda _: self.scan())
        # kohya's folder names (10_alice): the number as the folder's multiplier where it has no multiply.txt
        self.kohya_repeats = widgets.Checkbox(
            value=kohya_repeats,
            description="kohya folder names repeat (10_alice: 10 per epoch)",
            indent=False,
            layout=widgets.Layout(width="auto"),
        )
        self.kohya_repeats.observe(lambda _: self.scan(), names="value")
        self.report = widgets.HTML(layout=widgets.Layout(max_height=ROWS_HEIGHT, overflow="auto"))
        self.report.add_class("edtools-scan")
        self.widget = widgets.VBox(
            [widgets.HBox([self.root_text, self.scan_button]), self.kohya_repeats, self.report]
        )
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
            from ..demo import make_demo_dataset

            make_demo_dataset(root)
        try:
            result = scan(root, kohya_repeats=self.kohya_repeats.value)
        except DatasetError as exc:
            self.report.value = f"<b style='color:#b00020'>{html.escape(str(exc))}</b>"
            return None
        self.show(result)
        for listener in self._listeners:
            listener(result)
        return result

    def show(self, result: ScanResult) -> None:
        """Display a scan (also one made elsewhere, e.g. the balance panel's re-read) without telling listeners."""
        self.result = result
        self.report.value = _scan_html(result)
