"""Notebook panels without a browser: sliders drive the histogram and totals; Equalize, Reset and Save.

Widgets work without a frontend, so setting a widget's value here is what a user's drag or typing does.
"""

from __future__ import annotations

import csv
import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("ipywidgets")

from edtools import widgets as ew  # noqa: E402
from edtools.balance.schedule import expected_images_per_epoch  # noqa: E402
from edtools.dataset.scan import scan, synthetic_dataset, write_concept_values  # noqa: E402


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
    assert all(
        row.widget.layout.flex == "0 0 auto" for row in panel.rows.values()
    )  # rows scroll, never squeeze
    assert panel.histogram.layout.flex == "0 0 auto"
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
    final = float(f"{10**0.9:.3g}")
    assert panel.multipliers["people/alice"] == final
    index = panel.disk.concept_paths.index("people/alice")
    deadline = time.monotonic() + 20  # generous: a loaded machine renders slowly
    while time.monotonic() < deadline and (
        panel.redraws == start or panel.figure.widths()[index] != pytest.approx(8 * final)
    ):
        time.sleep(0.05)
    assert panel.figure.widths()[index] == pytest.approx(8 * final)  # the last redraw saw the last value
    assert 1 <= panel.redraws - start < 12


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
    assert "Fix the errors below" in report
    balance = ew.BalancePanel(data, debounce_s=0)
    assert "training refuses until fixed" in balance.status.value


def test_kohya_switch_applies_folder_names_to_the_sliders_and_the_training_config(tree, tmp_path):
    root = tree({"10_alice": 2, "5_carl": 1, "bob": 3, "2_style": 1})
    (root / "2_style" / "multiply.txt").write_text("0.5")  # a file wins over the folder name
    data = ew.DataPanel(root)
    balance = ew.BalancePanel(data, debounce_s=0)
    training = ew.TrainingPanel(balance, smoke=False)
    assert "named the kohya way (10 repeats)" in data.report.value
    assert balance.multipliers == {"10_alice": 1.0, "5_carl": 1.0, "bob": 1.0, "2_style": 0.5}
    assert training.config().kohya_repeats is False

    data.kohya_repeats.value = True  # rescans: the name gives 10_alice its multiplier
    assert "kohya folder name &#x27;10_alice&#x27; = 10: 2 images -&gt; 20 per epoch" in data.report.value
    assert balance.multipliers == {"10_alice": 10.0, "5_carl": 5.0, "bob": 1.0, "2_style": 0.5}
    assert balance.changes() == {} and balance.save() == []  # nothing to write: the name already says 10
    training.model.value, training.out.value = str(tmp_path / "model"), str(tmp_path / "run")
    assert training.config().kohya_repeats is True

    balance.set_multiplier("10_alice", 3.0)
    assert [p.name for p in balance.save()] == ["multiply.txt"]  # the rescan keeps the switch: the file wins
    assert (root / "10_alice" / "multiply.txt").read_text().strip() == "3"
    assert balance.multipliers == {"10_alice": 3.0, "5_carl": 5.0, "bob": 1.0, "2_style": 0.5}


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


# ---- training panel


@pytest.fixture
def training_parts(demo_like, tmp_path):
    """A balance panel on the demo-like root and a training panel writing into tmp_path/run."""
    pytest.importorskip("edtools.config")
    balance = panel_for(demo_like)
    training = ew.TrainingPanel(balance, smoke=False)
    training.model.value = str(tmp_path / "model")
    training.out.value = str(tmp_path / "run")
    return balance, training


def fake_train(events_per_epoch: int = 3, fail: bool = False):
    """A stand-in for edtools.train.train: the same events and the same stop rule, no model."""
    from edtools.train import TrainEvent, TrainResult

    def train(config, callback, balance=None):
        step, reason = 0, "finished"
        for epoch in range(config.epochs):
            for batch in range(events_per_epoch):
                step += 1
                if fail and step == 2:
                    raise RuntimeError("CUDA out of memory (pretend)")
                losses = {"people/alice": 1.0 / step, "style": 0.5 / step}
                if callback(TrainEvent("step", step, epoch, batch=batch, loss=0.7, loss_per_concept=losses)):
                    reason = "callback"
                    break
            if reason == "callback":
                break
            counts = {"people/alice": 8, "people/bob": 8, "style": 4, "preservation": 5}
            values = balance(epoch + 1)[0] if balance is not None else {c: 1.0 for c in counts}
            callback(
                TrainEvent(
                    "epoch",
                    step,
                    epoch,
                    images_per_concept=counts,
                    expected={c: float(n) for c, n in counts.items()},
                    multipliers=dict(values),
                )
            )
            losses = {"people/alice": 0.3 / (epoch + 1), "style": 0.2}
            callback(TrainEvent("validation", step, epoch + 1, loss_per_concept=losses))
        result = TrainResult(str(config.out), step, epoch, 0, reason, "ckpt", 0, 0.7, 0.1)
        callback(TrainEvent("end", step, epoch, result=result))
        return result

    return train


def test_training_widgets_fill_the_train_config_with_unsaved_balance_values(training_parts, demo_like):
    balance, training = training_parts
    balance.rows["people/alice"].box.value = 2.5
    balance.rows["style"].loss.value = 0.75
    training.batch_size.value = 2
    training.resolution.value = 256
    training.epochs.value = 3
    training.lr.value = 2e-6
    training.optimizer.value = "adamw"
    training.mixed_precision.value = "bf16"
    training.sample_prompts.value = "a photo of alice\n\n  an ink drawing  \n"
    training.earlier_run.value = "resume"
    config = training.config()
    assert config.data_root == str(demo_like.resolve())
    assert (config.batch_size, config.resolution, config.epochs, config.lr) == (2, 256, 3, 2e-6)
    assert (config.optimizer, config.mixed_precision) == ("adamw", "bf16")
    assert config.sample_prompts == ("a photo of alice", "an ink drawing")
    assert config.resume and not config.overwrite
    assert dict(config.multipliers) == {"people/alice": 2.5}
    assert dict(config.loss_scales) == {"style": 0.75}
    assert config.progress_bar is False
    assert balance.totals_note.value.count("batch size 2, resolution 256") == 1  # steps follow the form


def test_training_defaults_come_from_the_train_config(training_parts):
    from edtools.config import TrainConfig

    _, training = training_parts
    defaults = {
        f: TrainConfig.__dataclass_fields__[f].default for f in ("epochs", "batch_size", "lr", "optimizer")
    }
    assert training.epochs.value == defaults["epochs"] and training.batch_size.value == defaults["batch_size"]
    assert (
        training.lr.value == defaults["lr"]
        and training.optimizer.value == defaults["optimizer"] == "adamw8bit"
    )


def test_a_bad_setting_is_reported_in_the_panel_and_nothing_starts(training_parts):
    _, training = training_parts
    training.batch_size.value = 0
    training.train_button.click()
    assert "not started" in training.status.value and "batch_size" in training.status.value
    assert not training.running
    with pytest.raises(ValueError, match="batch_size"):
        training.start()


def test_training_events_drive_progress_histogram_losses_and_stop(training_parts, monkeypatch):
    pytest.importorskip("edtools.train")
    _, training = training_parts
    monkeypatch.setattr("edtools.train.train", fake_train(events_per_epoch=3))
    training.epochs.value = 2
    training.resolution.value = 64
    training.start()
    result = training.wait(timeout=30)
    assert result.stop_reason == "finished" and result.global_step == 6
    kinds = [e.kind for e in training.events]
    assert kinds.count("step") == 6 and kinds.count("epoch") == 2 and kinds[-1] == "end"
    assert training.progress.value == training.progress.max
    assert training.progress_text.value.startswith("step 6/")
    assert training.balance_image.value[:4] == b"\x89PNG" and training.loss_image.value[:4] == b"\x89PNG"
    assert set(training._loss_figure.series) == {"people/alice", "style"}
    assert "Done:" in training.status.value
    assert not training.train_button.disabled and training.stop_button.disabled


def test_stop_button_makes_the_callback_return_true(training_parts, monkeypatch):
    pytest.importorskip("edtools.train")
    _, training = training_parts
    fake = fake_train(events_per_epoch=1000)
    seen = []

    def slow_train(config, callback, balance=None):
        def wrapped(event):
            seen.append(event.kind)
            if event.kind == "step" and event.global_step == 3:
                training.stop_button.click()  # what a click from the browser does meanwhile
            return callback(event)

        return fake(config, wrapped)

    monkeypatch.setattr("edtools.train.train", slow_train)
    training.start()
    result = training.wait(timeout=30)
    assert result.stop_reason == "callback" and result.global_step == 3
    assert training.earlier_run.value == "resume"  # pressing Train again continues the run
    assert "Stopped cleanly" in training.status.value


def test_a_kernel_interrupt_while_waiting_stops_the_run_like_the_stop_button(training_parts, monkeypatch):
    """The notebook's interrupt button raises KeyboardInterrupt in the cell that waits: the run stops after
    its step with a resumable checkpoint instead of running on unseen in its thread."""
    pytest.importorskip("edtools.train")
    _, training = training_parts
    fake = fake_train(events_per_epoch=10**6)
    third_step = threading.Event()

    def slow_train(config, callback, balance=None):
        def wrapped(event):
            if event.kind == "step" and event.global_step == 3:
                third_step.set()
                time.sleep(0.2)  # the interrupt comes while this step runs
            return callback(event)

        return fake(config, wrapped)

    monkeypatch.setattr("edtools.train.train", slow_train)
    training.start()
    thread = training._thread

    class InterruptedOnce:  # the kernel's SIGINT arriving while the cell waits in join()
        def join(self, timeout=None):
            if not hasattr(self, "raised"):
                self.raised = third_step.wait(30)
                raise KeyboardInterrupt
            thread.join(timeout)

        def is_alive(self):
            return thread.is_alive()

    training._thread = InterruptedOnce()
    result = training.wait(timeout=30)
    assert result.stop_reason == "callback" and 3 <= result.global_step <= 4
    assert training.earlier_run.value == "resume" and "Stopped cleanly" in training.status.value


def test_a_training_error_shows_in_the_panel_and_wait_raises_it(training_parts, monkeypatch):
    pytest.importorskip("edtools.train")
    _, training = training_parts
    monkeypatch.setattr("edtools.train.train", fake_train(fail=True))
    training.start()
    with pytest.raises(RuntimeError, match="out of memory"):
        training.wait(timeout=30)
    assert "training failed" in training.status.value and "out of memory" in training.status.value
    assert not training.train_button.disabled


@pytest.mark.slow
def test_tiny_model_trains_stops_and_resumes_from_the_panel(tmp_path, monkeypatch):
    pytest.importorskip("edtools.train")
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    data = ew.DataPanel()  # the demo data root, made here
    balance = ew.BalancePanel(data, debounce_s=0)
    training = ew.TrainingPanel(balance, smoke=True)
    training.epochs.value = 1
    training.sample_every.value = 0
    training.sample_prompts.value = "a photo of alice"
    training.validation_split.value = 0.0  # every image trains: the counts below are the folder's
    balance.rows["people/alice"].box.value = 0.5  # unsaved: must still reach the trainer

    def stop_after_two_steps(event):
        if event.kind == "step" and event.global_step == 2:
            training.stop()

    original = training._on_event
    monkeypatch.setattr(training, "_on_event", lambda e: (stop_after_two_steps(e), original(e))[1])
    training.start()
    stopped = training.wait(timeout=300)
    assert stopped.stop_reason == "callback" and stopped.global_step == 2
    assert Path(stopped.checkpoint).is_dir()
    assert training.earlier_run.value == "resume"

    # the cells run again (a new kernel would rescan too): the new panel offers the run with its settings
    balance.reset()
    again = ew.TrainingPanel(balance, smoke=True)
    assert "stopped at step 2, in epoch 1 of 1" in again.status.value and again.earlier_run.value == "resume"
    assert balance.multipliers["people/alice"] == 0.5 and again.sample_every.value == 0
    again.start()
    finished = again.wait(timeout=300)
    assert finished.stop_reason == "finished"
    assert finished.global_step == again.progress.max  # the panel's step count agrees with train()
    epoch = [e for e in again.events if e.kind == "epoch"][0]
    assert epoch.images_per_concept["people/alice"] == 12  # 24 x 0.5: the unsaved slider value trained
    assert any(e.kind == "sample" for e in again.events)
    assert len(again.samples.children) == 1


def test_preset_fills_the_form_and_the_rest_of_the_config(training_parts):
    _, training = training_parts
    training.preset.value = "sdxl-lora-t4"
    assert (training.resolution.value, training.batch_size.value, training.lora_rank.value) == (1024, 1, 16)
    assert training.mixed_precision.value == "fp16" and training.lr.value == 1e-4
    assert "SDXL LoRA" in training.preset_note.value
    training.save_single_file.value = True
    training.model_config.value = " configs/sdxl "
    config = training.config()
    assert (config.preset, config.lora_rank, config.lora_lr, config.resolution) == (
        "sdxl-lora-t4",
        16,
        1e-4,
        1024,
    )
    assert config.cache_text_embeddings and config.gradient_checkpointing  # from the preset, not the form
    assert config.save_single_file and config.model_config == "configs/sdxl"
    training.batch_size.value = 2  # the form's own values win over the preset's
    assert training.config().batch_size == 2


def test_learning_rate_box_follows_full_or_lora(training_parts):
    _, training = training_parts
    training.lora_rank.value = 0
    training.lr.value = 3e-6
    training.lora_rank.value = 8
    assert training.lr.value == 1e-4  # the LoRA learning rate
    training.lr.value = 5e-5
    assert training.config().lora_lr == 5e-5 and training.config().lr == 1e-6
    training.lora_rank.value = 0
    assert training.lr.value == 3e-6 and training.config().lr == 3e-6


def test_preset_is_suggested_from_the_model_and_the_gpu_memory(training_parts, tmp_path, monkeypatch):
    pytest.importorskip("diffusers")
    from edtools.models import make_tiny_model

    _, training = training_parts
    monkeypatch.setattr("edtools.widgets.settings.gpu_memory_gib", lambda: 15.0)
    training.model.value = str(make_tiny_model(tmp_path / "sdxl", "sdxl"))
    assert training.preset.value == "sdxl-lora-t4" and training.lora_rank.value == 16
    assert "the GPU has 15 GB" in training.preset_note.value
    training.model.value = str(make_tiny_model(tmp_path / "sd", "sd1"))
    assert training.preset.value == "sd15-full-t4" and training.lora_rank.value == 0
    monkeypatch.setattr("edtools.widgets.settings.gpu_has_bf16", lambda: False)  # a T4
    training.model.value = str(make_tiny_model(tmp_path / "sd3", "sd3"))
    assert training.preset.value == "sd35m-lora-t4" and training.lora_rank.value == 16
    assert "it fits a free Colab T4" in training.preset_note.value
    monkeypatch.setattr("edtools.widgets.settings.gpu_memory_gib", lambda: None)
    training.suggest_preset()
    assert training.preset.value == "" and "no GPU" in training.preset_note.value


@pytest.mark.slow
def test_tiny_sdxl_lora_trains_from_the_panel_and_saves_a_single_file(tmp_path, tree, monkeypatch):
    pytest.importorskip("edtools.train")
    pytest.importorskip("torch")
    from edtools.models import make_tiny_model

    monkeypatch.chdir(tmp_path)
    data = ew.DataPanel(tree({"people/alice": 4, "style": 2}))
    balance = ew.BalancePanel(data, debounce_s=0)
    training = ew.TrainingPanel(balance, smoke=True)
    training.model.value = str(make_tiny_model(tmp_path / "sdxl", "sdxl"))
    training.epochs.value = 1
    training.lora_rank.value = 4
    training.save_single_file.value = True
    training.sample_every.value = 0
    training.sample_prompts.value = "a photo of alice"
    training.start()
    result = training.wait(timeout=300)
    assert result.stop_reason == "finished" and result.global_step == training.progress.max
    checkpoint = Path(result.checkpoint)
    assert (checkpoint / "lora.safetensors").is_file()
    assert checkpoint.with_name(checkpoint.name + ".safetensors").is_file()
    assert len(training.samples.children) == 1


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["sd3", "flux-dev"])
def test_flow_matching_loras_train_from_the_panel_with_samples_and_validation(
    tmp_path, tree, monkeypatch, variant
):
    pytest.importorskip("edtools.train")
    pytest.importorskip("torch")
    from edtools.models import make_tiny_model

    monkeypatch.chdir(tmp_path)
    data = ew.DataPanel(tree({"people/alice": 4, "style": 4}))
    balance = ew.BalancePanel(data, debounce_s=0)
    training = ew.TrainingPanel(balance, smoke=True)
    training.model.value = str(make_tiny_model(tmp_path / variant, variant))
    training.epochs.value = 1
    training.lora_rank.value = 4
    training.sample_every.value = 0
    training.sample_prompts.value = "a photo of alice"
    training.start()
    result = training.wait(timeout=300)
    assert result.stop_reason == "finished" and result.global_step == training.progress.max
    assert (Path(result.checkpoint) / "lora.safetensors").is_file()
    assert len(training.samples.children) == 1  # from the family's own pipeline
    with open(Path(result.checkpoint).parents[1] / "validation.csv", encoding="utf-8") as file:
        assert {row["concept"] for row in csv.DictReader(file)} == {"people/alice", "style"}


def test_epochs_and_validation_show_history_counts_and_trained_bars(training_parts, monkeypatch):
    pytest.importorskip("edtools.train")
    balance, training = training_parts
    monkeypatch.setattr("edtools.train.train", fake_train(events_per_epoch=2))
    training.epochs.value = 2
    training.resolution.value = 64
    balance.rows["style"].box.value = 3.0  # unsaved; the fake reads the panel's values as live balance does
    assert training.config().live_balance and training.config().validation_split == 0.1  # notebook defaults
    training.start()
    training.wait(timeout=30)
    assert "epoch 1 trained: people/alice 8" in training.epoch_counts.value
    history = training.history.value
    assert "multiplier per epoch" in history and "<b>" not in history and history.count(">3<") == 2
    assert list(balance.figure.trained) == [8.0, 8.0, 4.0, 5.0] or sorted(balance.figure.trained) == [
        4,
        5,
        8,
        8,
    ]
    assert "trained in epoch 1" in [t.get_text() for t in balance.figure.ax.get_legend().get_texts()]
    figure = training._loss_figure
    assert figure.validation["people/alice"] == ([2, 4], [0.3, 0.15])
    assert set(figure.dots) == {"people/alice", "style"}
    assert figure.dots["style"].get_color() == figure.lines["style"].get_color()  # one colour per concept


def test_suggestions_show_reasons_and_apply_to_the_sliders_unsaved(training_parts, tmp_path):
    balance, training = training_parts
    run = tmp_path / "run"
    run.mkdir()
    (run / "validation.csv").write_text(
        "step,epoch,concept,loss,images\n0,0,people/alice,0.3,2\n0,0,style,0.3,2\n0,0,people/bob,0.3,2\n"
        "10,1,people/alice,0.29,2\n10,1,style,0.2,2\n10,1,people/bob,0.21,2\n"
    )
    (run / "balance_history.csv").write_text(
        "epoch,concept,multiply,loss_scale,expected,actual\n0,people/alice,1,1,24,24\n0,style,1,1,12,12\n"
    )
    training.out.value = str(run)
    training.suggest_button.click()
    assert "lags behind; raise it" in training.suggestions.value and not training.apply_button.disabled
    training.apply_button.click()
    assert balance.multipliers["people/alice"] == 1.5  # one step of the auto-balance rules: x1.5
    assert balance.changes()["people/alice"] == {"multiplier": 1.5}  # on the slider, not in the file
    assert not (balance.disk.root / "people" / "alice" / "multiply.txt").exists()
    training.out.value = str(tmp_path / "nothing")
    training.suggest_button.click()
    assert "no validation.csv" in training.suggestions.value


@pytest.mark.slow
def test_a_slider_moved_during_a_run_changes_the_next_epoch(tmp_path, tree, monkeypatch):
    pytest.importorskip("edtools.train")
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    data = ew.DataPanel(tree({"a": 4, "b": 2}))
    balance = ew.BalancePanel(data, debounce_s=0)
    training = ew.TrainingPanel(balance, smoke=True)
    training.epochs.value = 3
    training.sample_prompts.value = ""
    training.validation_split.value = 0.0

    def move_slider_after_epoch_0(event):
        if event.kind == "epoch" and event.epoch == 0:
            balance.rows["b"].box.value = 3.0  # as a person types while the run goes on

    original = training._on_event
    monkeypatch.setattr(training, "_on_event", lambda e: (move_slider_after_epoch_0(e), original(e))[1])
    training.start()
    result = training.wait(timeout=300)
    assert result.stop_reason == "finished"
    counts = [e.images_per_concept["b"] for e in training.events if e.kind == "epoch"]
    assert counts == [2, 6, 6]
    assert "<b>3</b>" in training.history.value  # the change is marked in the history
    assert training.progress.value == training.progress.max == result.global_step


# ---- back after a disconnect: Drive folders, the run in the output folder, free space, ending the runtime


def fake_checkpoint(out: Path, step: int, *, epoch: int, batch: int, **settings) -> Path:
    """A checkpoint folder as save_checkpoint lays it out, without weights: what a panel reads of a run."""
    import json
    import zipfile

    from edtools.config import TrainConfig

    folder = out / "checkpoints" / f"step-{step:08d}"
    (folder / "resume").mkdir(parents=True)
    (folder / "model_index.json").write_text("{}")
    with zipfile.ZipFile(folder / "resume" / "state.pt", "w") as archive:
        archive.writestr("state/data.pkl", b"\x80\x04N.")
    config = TrainConfig.from_dict(
        {"model": "stabilityai/stable-diffusion-xl-base-1.0", "out": str(out), **settings}
    )
    (folder / "resume" / "config.json").write_text(json.dumps(config.to_dict()))
    state = {"global_step": step, "epoch": epoch, "batch": batch, "skipped_steps": 0, "world_size": 1}
    (folder / "resume" / "state.json").write_text(json.dumps({**state, "saved_at": "2025-06-01 10:00:00"}))
    return folder


@pytest.fixture
def fake_colab(monkeypatch):
    """A google.colab module in sys.modules (so the panel believes it is on Colab) that records its calls."""
    import sys
    import types

    calls: list[str] = []
    colab = types.ModuleType("google.colab")
    colab.drive = types.SimpleNamespace(flush_and_unmount=lambda: calls.append("flush"))
    colab.runtime = types.SimpleNamespace(unassign=lambda: calls.append("unassign"))
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    return calls


def test_drive_settings_put_runs_and_caches_on_drive_the_same_on_every_runtime(tmp_path, fake_colab):
    drive = tmp_path / "MyDrive"
    settings = ew.drive_settings(drive, "/content/drive/MyDrive/data sets/Alice & Bob")
    assert settings == {
        "out": str(drive / "edtools" / "runs" / "Alice_Bob"),
        "cache_dir": str(drive / "edtools" / "cache"),
        "cache_latents": "disk",
        "checkpoint_every_minutes": 30.0,
    }
    assert ew.drive_settings(drive, "/content/drive/MyDrive/data sets/Alice & Bob/") == settings
    assert ew.colab_drive(drive) is None  # not mounted
    drive.mkdir()
    assert ew.colab_drive(drive) == drive


def test_outside_colab_there_is_no_drive_and_no_disconnect(training_parts, tmp_path):
    drive = tmp_path / "MyDrive"
    drive.mkdir()
    assert not ew.in_colab() and ew.colab_drive(drive) is None
    _, training = training_parts
    assert training.disconnect.disabled and training.disconnect.layout.display == "none"
    with pytest.raises(RuntimeError, match="not a Colab runtime"):
        ew.end_runtime()


def test_the_training_panel_proposes_the_run_and_its_caches_on_drive(demo_like, tmp_path):
    drive = tmp_path / "MyDrive"
    balance = panel_for(demo_like)
    training = ew.TrainingPanel(balance, smoke=False, drive=drive)
    assert training.out.value == str(drive / "edtools" / "runs" / demo_like.name)
    assert training.cache_dir.value == str(drive / "edtools" / "cache")
    config = training.config()
    assert (config.out, config.cache_dir, config.cache_latents) == (
        training.out.value,
        training.cache_dir.value,
        "disk",
    )
    assert config.checkpoint_every_minutes == 30.0
    training.cache_dir.value = ""  # no disk cache: the preset's choice again
    training.preset.value = "sd15-full-t4"
    assert training.config().cache_latents == "memory"


def test_a_run_in_the_output_folder_is_offered_for_resume_with_its_own_settings(demo_like, tmp_path):
    from edtools.train.checkpoint import check_resume, checkpoint_info

    out = tmp_path / "runs" / "alice"
    settings = dict(
        data_root=str(demo_like),
        preset="sdxl-lora-t4",
        epochs=10,
        seed=7,
        validation_split=0.1,
        live_balance=True,
        multipliers={"people/alice": 2.5},
        keep_checkpoints=3,
    )
    fake_checkpoint(out, 100, epoch=3, batch=0, **settings)
    newest = fake_checkpoint(out, 120, epoch=3, batch=5, **settings)
    damaged = fake_checkpoint(out, 130, epoch=3, batch=15, **settings)
    (damaged / "resume" / "state.json").write_text("{")  # cut off mid-write
    balance = panel_for(demo_like)
    training = ew.TrainingPanel(balance, smoke=False)
    assert training.earlier_run.value == "refuse"
    training.out.value = str(out)
    status = training.status.value
    assert f"Found a run in {out} stopped at step 120, in epoch 4 of 10" in status
    assert "(preset sdxl-lora-t4, LoRA rank 16, lr 0.0001, batch 1, 1024 px, 10 epochs" in status
    assert "Train resumes it" in status and "step-00000130 (resume/state.json is damaged" in status
    assert training.earlier_run.value == "resume"
    assert (training.lora_rank.value, training.resolution.value, training.batch_size.value) == (16, 1024, 1)
    assert (training.epochs.value, training.seed.value, training.lr.value) == (10, 7, 1e-4)
    assert training.keep_checkpoints.value == 3 and training.mixed_precision.value == "fp16"
    assert balance.multipliers["people/alice"] == 2.5 and "people/alice x2.5" in status  # back, unsaved
    config = training.config()
    assert config.resume and dict(config.multipliers) == {"people/alice": 2.5}
    assert config.cache_text_embeddings  # a setting the fields do not show, kept from the run
    check_resume(checkpoint_info(newest), config, 1, newest)  # the resume is accepted
    assert "measured from step-00000120" in training.space_note.value  # the checkpoint it resumes from


def test_a_finished_run_is_described_and_another_folder_takes_the_offer_back(demo_like, tmp_path):
    fake_checkpoint(tmp_path / "done", 40, epoch=4, batch=0, data_root=str(demo_like), epochs=4)
    fake_checkpoint(tmp_path / "cut", 12, epoch=1, batch=0, data_root=str(tmp_path / "elsewhere"), epochs=4)
    balance = panel_for(demo_like)
    training = ew.TrainingPanel(balance, smoke=False)
    training.out.value = str(tmp_path / "done")
    assert "Found a finished run" in training.status.value and "raise epochs" in training.status.value
    assert training.earlier_run.value == "refuse"
    training.out.value = str(tmp_path / "cut")
    assert "stopped at step 12, after epoch 1 of 4" in training.status.value
    assert f"It trained on {tmp_path / 'elsewhere'}" in training.status.value
    assert training.earlier_run.value == "resume"
    training.out.value = str(tmp_path / "new")
    assert training.earlier_run.value == "refuse" and training.status.value.count("Found") == 0


def test_a_lock_left_on_drive_by_a_disconnected_runtime_is_taken_over_on_resume(
    training_parts, demo_like, tmp_path, monkeypatch
):
    import json

    pytest.importorskip("edtools.train")
    out = tmp_path / "run"
    fake_checkpoint(out, 12, epoch=1, batch=3, data_root=str(demo_like), epochs=4, resolution=64)
    lock = {"pid": 4242, "host": "colab-runtime-before", "started": "2025-06-01 09:00:00"}
    (out / ".edtools.lock").write_text(json.dumps(lock))
    _, training = training_parts
    training.out.value = str(out)
    training.out.value = str(out) + "/"  # looked at again: the same run
    assert "another machine (colab-runtime-before" in training.status.value
    monkeypatch.setattr("edtools.train.train", fake_train(events_per_epoch=1))
    training.start()
    training.wait(timeout=30)
    assert not (out / ".edtools.lock").exists()


def test_checkpoints_are_counted_against_the_free_space_of_the_drive(training_parts, tmp_path, monkeypatch):
    import shutil

    _, training = training_parts
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=100 * 10**9))
    training.preset.value = ""
    training.model.value = "stabilityai/stable-diffusion-xl-base-1.0"  # a hub id: a typical SDXL's size
    training.lora_rank.value = 0
    training.optimizer.value = "adamw8bit"
    training.epochs.value = 10
    note = training.space_note.value
    assert "10 more to save (every one kept), about 20.6 GB each (estimated from a typical SDXL" in note
    assert "206.5 GB needed, 100.0 GB free" in note and "will not fit" in note and "#b00020" in note
    training.keep_checkpoints.value = 2  # the newest two kept: three at once while a save is written
    assert "61.9 GB needed" in training.space_note.value and "will not fit" not in training.space_note.value
    training.epochs.value, training.keep_checkpoints.value = 2, 0
    assert "will not fit" not in training.space_note.value
    training.checkpoint_minutes.value = 30.0  # timed saves kept without end fill 100 GB within Colab's 12 h
    assert "fill the drive after about 1 h of training" in training.space_note.value
    assert "will not fit" in training.space_note.value
    training.lora_rank.value = 16  # LoRA checkpoints are small
    assert "about 340 MB each" in training.space_note.value


def test_checkpoint_space_and_saves_counted_as_a_run_makes_them():
    from edtools.widgets.runfolder import checkpoint_space, planned_saves

    assert checkpoint_space(each=10, existing=0, saves=5, keep=0) == 50
    assert checkpoint_space(each=10, existing=0, saves=5, keep=2) == 30  # saved before the oldest goes
    assert checkpoint_space(each=10, existing=5, saves=1, keep=2) == 10
    assert checkpoint_space(each=10, existing=2, saves=0, keep=2) == 0
    assert planned_saves(10, 1) == 10 and planned_saves(10, 3) == 4 and planned_saves(10, 0) == 1
    assert planned_saves(10, 1, start_epoch=4) == 6 and planned_saves(10, 1, start_epoch=10) == 1


def test_the_estimate_counts_the_model_parameters_from_its_files(tiny_model):
    from edtools.models import load_components
    from edtools.models.lora import add_lora, lora_parameters

    counts, source = ew.model_parameters(str(tiny_model))
    components = load_components(str(tiny_model))
    assert "the model's" in source
    assert counts["unet"] == sum(p.numel() for p in components.unet.parameters())
    assert counts["text"] == sum(p.numel() for p in components.text_encoder.parameters())
    assert counts["vae"] == sum(p.numel() for p in components.vae.parameters())
    add_lora(components, rank=4, text_encoders=True)
    assert 4 * (counts["lora_unet"] + counts["lora_text"]) == sum(
        p.numel() for p in lora_parameters(components)
    )
    full = ew.estimate_checkpoint_bytes(counts, {"optimizer": "adamw", "train_text_encoder": True})
    assert full == 4 * (counts["unet"] + counts["text"] + counts["vae"]) + 8 * (
        counts["unet"] + counts["text"]
    )


def test_the_runtime_is_disconnected_when_training_ends_if_asked(training_parts, fake_colab, monkeypatch):
    pytest.importorskip("edtools.train")
    balance, _ = training_parts
    training = ew.TrainingPanel(balance, smoke=False)  # made on "Colab"
    training.out.value = str(Path(balance.disk.root).parent / "run")
    assert not training.disconnect.disabled and training.disconnect.layout.display != "none"
    monkeypatch.setattr("edtools.train.train", fake_train(events_per_epoch=2))
    training.epochs.value, training.resolution.value = 1, 64
    training.start()
    training.wait(timeout=30)
    assert fake_colab == []  # not asked
    training.disconnect.value = True
    training.start()
    training.wait(timeout=30)
    assert fake_colab == ["flush", "unassign"]  # Drive written out first, then the runtime handed back
    assert "Done:" in training.status.value and "disconnecting the runtime" in training.status.value

    fake_colab.clear()
    monkeypatch.setattr("edtools.train.train", fake_train(fail=True))
    training.start()
    with pytest.raises(RuntimeError):
        training.wait(timeout=30)
    assert fake_colab == ["flush", "unassign"]  # a failed run stops paying too

    fake_colab.clear()
    fake = fake_train(events_per_epoch=1000)
    monkeypatch.setattr(
        "edtools.train.train",
        lambda config, callback, balance=None: fake(
            config, lambda e: (e.kind == "step" and e.global_step == 2 and training.stop(), callback(e))[1]
        ),
    )
    training.start()
    assert training.wait(timeout=30).stop_reason == "callback"
    assert fake_colab == []  # Stop: the person is there and may resume


def test_runs_that_cannot_be_resumed_are_named_and_the_fields_stay(training_parts, demo_like, tmp_path):
    import json

    _, training = training_parts
    broken = fake_checkpoint(tmp_path / "broken", 5, epoch=0, batch=5, data_root=str(demo_like))
    (broken / "resume" / "state.pt").write_bytes(b"PK\x03\x04 cut")
    training.out.value = str(tmp_path / "broken")
    assert "none can be resumed from (step-00000005: resume/state.pt is damaged" in training.status.value
    assert training.earlier_run.value == "refuse"
    other = fake_checkpoint(tmp_path / "other", 5, epoch=0, batch=5, data_root=str(demo_like))
    saved = json.loads((other / "resume" / "config.json").read_text())
    (other / "resume" / "config.json").write_text(json.dumps({**saved, "optimizer": "sgd"}))
    epochs = training.epochs.value
    training.out.value = str(tmp_path / "other")
    assert "cannot be resumed here" in training.status.value and "optimizer" in training.status.value
    assert training.epochs.value == epochs and training.earlier_run.value == "refuse"


@pytest.mark.slow
def test_check_shows_the_plan_of_what_train_would_start_and_writes_nothing(tmp_path, monkeypatch):
    pytest.importorskip("edtools.train")
    pytest.importorskip("torch")
    monkeypatch.chdir(tmp_path)
    balance = ew.BalancePanel(ew.DataPanel(), debounce_s=0)
    training = ew.TrainingPanel(balance, smoke=True)
    training.epochs.value = 2
    plan = training.check()
    assert plan is not None and "dry run" in plan, training.status.value
    assert "optimizer steps over 2 epochs" in plan
    assert "host memory measured" in training.status.value
    assert not Path(training.config().out).exists()
    training.batch_size.value = 0  # a refused setting is said in the panel, in red
    assert training.check() is None and "#b00020" in training.status.value
