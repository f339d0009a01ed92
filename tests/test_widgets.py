"""Notebook panels without a browser: sliders drive the histogram and totals; Equalize, Reset and Save.

Widgets work without a frontend, so setting a widget's value here is what a user's drag or typing does.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipywidgets")

from edtools import widgets as ew  # noqa: E402
from edtools.dataset import scan, synthetic_dataset, write_concept_values  # noqa: E402
from edtools.schedule import expected_images_per_epoch  # noqa: E402


def value_files(root: Path) -> dict[str, bytes]:
    """Every multiply.txt / loss_scale.txt under root: relative path -> content."""
    found = {}
    for name in ("multiply.txt", "loss_scale.txt"):
        for file in root.rglob(name):
            found[file.relative_to(root).as_posix()] = file.read_bytes()
    return found


@pytest.fixture
def demo_like(tree):
    """Four folders: one balanced by a file, one with a loss_scale file, a preservation folder at 0.25."""
    root = tree({"people/alice": 8, "people/bob": 2, "style": 4, "preservation": 20})
    write_concept_values(root, "people/bob", multiplier=4)
    write_concept_values(root, "style", loss_scale=0.5)
    write_concept_values(root, "preservation", multiplier=0.25)
    return root


def panel_for(root: Path, **kwargs) -> ew.BalancePanel:
    return ew.BalancePanel(scan(root), debounce_s=0, **kwargs)


# ---- pure helpers


def test_equalize_multipliers_gives_equal_expected_counts_and_skips_preservation():
    disk = synthetic_dataset({"a": (24, 1.0), "b": (7, 2.0), "c": (3, 1.0), "keep": (500, 0.05)})
    suggested = ew.equalize_multipliers(disk)
    assert set(suggested) == {"a", "b", "c"}
    counts = [disk.concepts[i].n_images * suggested[p] for i, p in enumerate(["a", "b", "c"])]
    assert counts == pytest.approx([24, 24, 24], rel=1e-3)
    assert min(suggested.values()) >= 1.0  # the largest folder sets the target: nothing is cut


def test_equalize_with_only_preservation_folders_suggests_nothing():
    assert ew.equalize_multipliers(synthetic_dataset({"a": (10, 0.5), "b": (40, 0.1)})) == {}


def test_changed_values_lists_only_differences_from_disk():
    disk = synthetic_dataset({"a": (4, 2.0), "b": (4, 1.0, 0.5)})
    changes = ew.changed_values(disk, {"a": 2.0, "b": 3.0}, {"a": 1.0, "b": 0.75})
    assert changes == {"b": {"multiplier": 3.0, "loss_scale": 0.75}}


def test_epoch_totals_counts_steps_from_the_real_schedule():
    disk = synthetic_dataset({"a": (5, 1.0), "b": (3, 2.0)}, sizes=((512, 512), (512, 1024)))
    images, steps = ew.epoch_totals(disk, batch_size=4, resolution=512)
    assert images == 11
    assert steps >= 3  # two aspect buckets: short batches can add a step over ceil(11 / 4)


# ---- balance panel


def test_moving_a_slider_changes_the_histogram_and_the_totals(demo_like):
    panel = panel_for(demo_like)
    before_widths = panel.figure.widths().copy()
    before_png, before_total = panel.histogram.value, panel.totals.value
    assert before_total == "Total: 25 images/epoch, 7 steps/epoch"  # 8 + 2*4 + 4 + 20*0.25, one bucket

    row = panel.rows["people/alice"]
    row.slider.value = 2.0
    assert panel.multipliers["people/alice"] == 2.0
    assert row.box.value == 2.0
    changed = panel.figure.widths() - before_widths
    index = scan(demo_like).dataset.concept_paths.index("people/alice")
    assert changed[index] == pytest.approx(8.0)
    assert np.count_nonzero(changed) == 1
    assert panel.histogram.value != before_png
    assert panel.totals.value == "Total: 33 images/epoch, 9 steps/epoch"
    assert panel.changes() == {"people/alice": {"multiplier": 2.0}}


def test_slider_drags_are_rounded_to_readable_values_and_typed_values_move_the_slider(demo_like):
    panel = panel_for(demo_like)
    row = panel.rows["style"]
    row.slider.value = 10**0.3712
    assert panel.multipliers["style"] == 2.35
    row.box.value = 0.015
    assert row.slider.value == pytest.approx(0.015)
    assert panel.multipliers["style"] == 0.015
    row.box.value = 40.0  # beyond the slider's default span: the slider widens, nothing is clamped
    assert row.slider.value == pytest.approx(40.0)
    assert panel.multipliers["style"] == 40.0


def test_a_bad_typed_multiplier_is_refused_with_a_message(demo_like):
    panel = panel_for(demo_like)
    row = panel.rows["people/bob"]
    row.box.value = 0.0
    assert panel.multipliers["people/bob"] == 4.0
    assert row.box.value == 4.0
    assert "must be a number > 0" in panel.status.value
    with pytest.raises(ValueError, match="finite number > 0"):
        panel.set_multiplier("people/bob", -1)


def test_loss_scale_slider_is_a_change_but_not_of_the_histogram(demo_like):
    panel = panel_for(demo_like)
    widths = panel.figure.widths().copy()
    panel.rows["people/alice"].loss.value = 1.5
    assert panel.changes() == {"people/alice": {"loss_scale": 1.5}}
    assert np.array_equal(panel.figure.widths(), widths)


def test_equalize_button_equalizes_non_preservation_folders(demo_like):
    before = value_files(demo_like)
    panel = panel_for(demo_like)
    panel.equalize_button.click()
    assert value_files(demo_like) == before  # nothing is written before Save
    dataset = panel.dataset()
    expected = dict(zip(dataset.concept_paths, expected_images_per_epoch(dataset), strict=True))
    assert [expected[c] for c in ("people/alice", "people/bob", "style")] == pytest.approx([8, 8, 8])
    assert expected["preservation"] == pytest.approx(5.0)  # 20 x 0.25, left alone
    assert panel.multipliers["preservation"] == 0.25
    assert "preservation folders left alone: preservation" in panel.status.value
    assert panel.rows["style"].box.value == 2.0


def test_save_writes_exactly_the_changed_files(demo_like):
    before = value_files(demo_like)
    bob_mtime = (demo_like / "people/bob/multiply.txt").stat().st_mtime_ns
    panel = panel_for(demo_like)
    panel.rows["people/alice"].box.value = 1.5
    panel.rows["style"].loss.value = 0.75
    panel.rows["preservation"].box.value = 0.3
    panel.rows["preservation"].box.value = 0.25  # changed and changed back: not a change
    panel.save_button.click()

    after = value_files(demo_like)
    assert set(after) - set(before) == {"people/alice/multiply.txt"}
    assert float(after["people/alice/multiply.txt"]) == 1.5
    assert float(after["style/loss_scale.txt"]) == 0.75
    unchanged = {
        k: v for k, v in after.items() if k not in ("people/alice/multiply.txt", "style/loss_scale.txt")
    }
    assert unchanged == {k: before[k] for k in unchanged}
    assert (demo_like / "people/bob/multiply.txt").stat().st_mtime_ns == bob_mtime
    assert "Saved 2 file(s)" in panel.status.value
    assert "people/alice/multiply.txt = 1.5" in panel.status.value
    assert panel.changes() == {}  # the panel now reads the new files as its baseline
    assert panel.disk.concepts[panel.disk.concept_paths.index("people/alice")].multiplier == 1.5


def test_save_with_nothing_changed_writes_nothing(demo_like):
    before = value_files(demo_like)
    panel = panel_for(demo_like)
    assert panel.save() == []
    assert value_files(demo_like) == before
    assert "Nothing to save" in panel.status.value


def test_reset_restores_the_values_on_disk(demo_like):
    panel = panel_for(demo_like)
    panel.rows["people/bob"].box.value = 9.0
    panel.rows["style"].loss.value = 1.25
    write_concept_values(demo_like, "people/alice", multiplier=3)  # edited outside the notebook meanwhile
    panel.reset_button.click()
    assert panel.changes() == {}
    assert panel.multipliers["people/bob"] == 4.0
    assert panel.loss_scales["style"] == 0.5
    assert panel.multipliers["people/alice"] == 3.0
    assert panel.rows["people/bob"].box.value == 4.0
    assert panel.rows["people/alice"].slider.value == pytest.approx(3.0)
    assert panel.totals.value.startswith("Total: 41 images/epoch")  # 8*3 + 2*4 + 4 + 20*0.25, from disk


def test_sixty_folders_build_with_a_scroll_box_and_a_bar_each():
    spec = {f"group{i // 10}/concept_{i:02d}": (3 + i, 0.5 if i % 7 == 0 else 1.0) for i in range(60)}
    disk = synthetic_dataset(spec)
    started = time.perf_counter()
    panel = ew.BalancePanel(disk, debounce_s=0)
    assert time.perf_counter() - started < 10
    assert len(panel.rows_box.children) == 60
    assert panel.rows_box.layout.max_height == ew.ROWS_HEIGHT and panel.rows_box.layout.overflow == "auto"
    assert len(panel.figure.widths()) == 60
    assert panel.figure.widths() == pytest.approx(expected_images_per_epoch(disk))
    panel.rows["group3/concept_33"].box.value = 2.0
    assert panel.figure.widths()[33] == pytest.approx(72.0)


def test_one_folder_at_the_data_root(tree):
    root = tree({".": 3})
    panel = panel_for(root)
    assert list(panel.rows) == ["."]
    assert panel.totals.value == "Total: 3 images/epoch, 1 steps/epoch"
    panel.rows["."].box.value = 2.0
    assert panel.totals.value == "Total: 6 images/epoch, 2 steps/epoch"


def test_redraws_are_throttled_and_end_on_the_latest_values(demo_like):
    panel = ew.BalancePanel(scan(demo_like), debounce_s=0.2)
    start = panel.redraws
    row = panel.rows["people/alice"]
    for exponent in np.linspace(0, 0.9, 12):  # a drag: many events in quick succession
        row.slider.value = 10**exponent
    deadline = time.monotonic() + 5
    while panel._timer is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.05)
    assert 1 <= panel.redraws - start < 12
    index = panel.disk.concept_paths.index("people/alice")
    assert panel.figure.widths()[index] == pytest.approx(8 * panel.multipliers["people/alice"])
    assert panel.multipliers["people/alice"] == float(f"{10**0.9:.3g}")


def test_schedule_settings_change_the_steps(demo_like):
    panel = panel_for(demo_like)
    panel.set_schedule(batch_size=1)
    assert panel.totals.value == "Total: 25 images/epoch, 25 steps/epoch"
    panel.set_schedule(batch_size=0)
    assert "steps unknown" in panel.totals_note.value


# ---- data panel


def test_data_panel_makes_the_demo_when_missing_and_feeds_the_balance_panel(tmp_path, monkeypatch):
    monkeypatch.setenv(ew.DATA_ROOT_ENV, str(tmp_path / "demo"))
    data = ew.DataPanel()
    assert data.result is not None and (tmp_path / "demo").is_dir()
    assert "multiply.txt in &#x27;people/bob&#x27; = 4" in data.report.value
    balance = ew.BalancePanel(data, debounce_s=0)
    assert len(balance.rows) == len(data.result.dataset.concepts)

    n_folders = len(balance.rows)
    image = (tmp_path / "demo" / data.result.dataset.paths[0]).read_bytes()
    (tmp_path / "demo" / "new_folder").mkdir()
    (tmp_path / "demo" / "new_folder" / "x.jpg").write_bytes(image)
    data.scan_button.click()
    assert len(balance.rows) == n_folders + 1
    assert len(balance.figure.widths()) == n_folders + 1


def test_data_panel_shows_every_warning_and_error(tree):
    root = tree({"a": 2, "b": 2})
    (root / "a" / "multiply.txt.txt").write_text("2")
    (root / "b" / "multiply.txt").write_text("two")
    data = ew.DataPanel(root)
    report = data.report.value
    assert "misnamed multiply.txt" in report and "WARNING" in report
    assert "&#x27;two&#x27; is not a number" in report and "ERROR" in report
    assert "Fix the errors" in report
    balance = ew.BalancePanel(data, debounce_s=0)
    assert "training refuses until fixed" in balance.status.value


def test_data_panel_reports_a_missing_folder(tmp_path):
    data = ew.DataPanel(tmp_path / "nowhere")
    assert data.result is None
    assert "is not a folder" in data.report.value


def test_gpu_status_is_one_actionable_line():
    line = ew.gpu_status()
    assert line.startswith(("GPU:", "No GPU found", "torch is not installed"))


def test_a_browser_snapping_shown_values_to_the_slider_step_changes_nothing(demo_like):
    panel = panel_for(demo_like)
    write_concept_values(demo_like, "style", multiplier=3.429, loss_scale=0.33)
    panel.reset()
    row = panel.rows["style"]
    row.slider.value = 10 ** round(np.log10(3.429), 2)  # what the slider view sends back when it renders
    row.loss.value = 0.35
    assert panel.changes() == {}
    assert panel.multipliers["style"] == 3.429 and panel.loss_scales["style"] == 0.33
    row.slider.value = 10 ** (round(np.log10(3.429), 2) + 0.01)  # one key press: a real move
    assert panel.multipliers["style"] == float(f"{10 ** (round(np.log10(3.429), 2) + 0.01):.3g}")
