"""Notebook panels without a browser: sliders drive the histogram and totals; Equalize, Reset and Save.

Widgets work without a frontend, so setting a widget's value here is what a user's drag or typing does.
"""

from __future__ import annotations

import threading
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

    training.start()
    finished = training.wait(timeout=300)
    assert finished.stop_reason == "finished"
    assert finished.global_step == training.progress.max  # the panel's step count agrees with train()
    epoch = [e for e in training.events if e.kind == "epoch"][0]
    assert epoch.images_per_concept["people/alice"] == 12  # 24 x 0.5: the unsaved slider value trained
    assert any(e.kind == "sample" for e in training.events)
    assert len(training.samples.children) == 1


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
    monkeypatch.setattr("edtools.widgets.training.gpu_memory_gib", lambda: 15.0)
    training.model.value = str(make_tiny_model(tmp_path / "sdxl", "sdxl"))
    assert training.preset.value == "sdxl-lora-t4" and training.lora_rank.value == 16
    assert "the GPU has 15 GB" in training.preset_note.value
    training.model.value = str(make_tiny_model(tmp_path / "sd", "sd1"))
    assert training.preset.value == "sd15-full-t4" and training.lora_rank.value == 0
    monkeypatch.setattr("edtools.widgets.training.gpu_memory_gib", lambda: None)
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
    assert balance.multipliers["people/alice"] == 2.0
    assert balance.changes()["people/alice"] == {"multiplier": 2.0}  # on the slider, not in the file
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
