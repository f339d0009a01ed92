"""The training panel: its settings form (widgets.settings), Train and Stop, live progress, balance, losses, samples.

Training runs in a background thread so Stop and the balance panel stay responsive.
"""

from __future__ import annotations

import dataclasses
import html
import io
import logging
import os
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..balance.schedule import build_epoch, make_buckets
from ..dataset.scan import Dataset
from .balance import BalancePanel
from .colab import drive_settings, end_runtime, in_colab
from .common import (
    DEMO_DIR,
    _Panel,
    _png,
    default_data_root,
    smoke_mode,
    widgets,
)
from .metrics import MetricsView
from .progress import LossFigure, WidgetLogHandler, counts_html, history_html
from .runfolder import EarlierRun, SpaceCheck, find_earlier_run, resume_offer, space_check
from .settings import SettingsForm

if TYPE_CHECKING:
    from ..config import TrainConfig
    from ..train import TrainResult

__all__ = ["TrainingPanel"]

_log = logging.getLogger("edtools")


def _auto_reasons(out: str, epoch: int) -> dict[str, str]:
    """{concept: why} of auto-balance's changes at epoch `epoch`'s start, from out/balance_history.csv."""
    from ..train.records import BALANCE_HISTORY_CSV, read_csv

    try:
        rows = read_csv(Path(out).expanduser() / BALANCE_HISTORY_CSV) if out else []
    except (OSError, ValueError):  # a drive that went away: the history just has no marks
        return {}
    return {r["concept"]: r["reason"] for r in rows if r.get("reason") and r["epoch"] == str(epoch)}


def _config_field_defaults() -> dict[str, Any]:
    from ..config import TrainConfig

    return {
        f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING
    }


NOTEBOOK_DEFAULTS = {"validation_split": 0.1, "live_balance": True}
_ACTIVE: TrainingPanel | None = None  # one run per kernel: a re-run cell must not start a second one


class TrainingPanel(SettingsForm, _Panel):
    """Training settings that fill a TrainConfig, Train / Stop, and live progress, balance, loss and samples.

    Training runs in a background thread so Stop (and the balance panel) stay responsive; `wait()` blocks
    until it ends and re-raises its error, for notebooks run headless. A run found in the output folder (after
    a disconnect, say) is offered for resume with its own settings in the fields.
    """

    def __init__(
        self,
        balance: BalancePanel,
        *,
        smoke: bool | None = None,
        base_config: Any = None,
        drive: str | os.PathLike | None = None,
    ) -> None:
        """base_config: a TrainConfig or a YAML/JSON file of one: the settings these widgets do not show.
        drive: a mounted Google Drive (colab_drive()): the output folder and disk caches are proposed there."""
        self.balance = balance
        self.smoke = smoke_mode() if smoke is None else smoke
        if isinstance(base_config, str | os.PathLike):
            from ..config import TrainConfig

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
        self._loss_figure: LossFigure | None = None
        self._multiplier_history: list[dict[str, float]] = []
        self._auto_history: list[dict[str, str]] = []  # per epoch: {concept: why auto-balance set it}
        self._max_steps: int | None = None
        self._colab = in_colab()
        self._quiet = True  # no free-space checks while the fields are filled in
        self._offered = False
        self._foreign_lock: tuple[Path, dict] | None = None
        self._earlier: EarlierRun | None = None  # the run offer_resume found in the output folder

        # The notebook closes the balance loop by default: a validation share and slider edits live.
        defaults = (
            {**_config_field_defaults(), **NOTEBOOK_DEFAULTS}
            if base_config is None
            else base_config.to_dict()
        )
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
        # on Drive a new runtime proposes the same folders, so it finds the run and the caches again
        if drive is not None:
            data_root = balance.disk.root if balance.disk is not None else default_data_root()
            defaults = {**defaults, **drive_settings(drive, data_root)}
        form = self._build_form(defaults)
        self.train_button = widgets.Button(description="Train", icon="play", button_style="primary")
        self.stop_button = widgets.Button(
            description="Stop",
            icon="stop",
            button_style="danger",
            disabled=True,
            tooltip="stop after the current step and save a resumable checkpoint",
        )
        self.disconnect = widgets.Checkbox(
            value=False,
            description="disconnect the runtime when training ends",
            tooltip="Colab: hand the runtime back when the run finishes or fails, so paid compute stops (not "
            "after Stop)",
            indent=False,
            disabled=not self._colab,
            layout=widgets.Layout(width="auto", display=None if self._colab else "none"),
        )
        self.check_button = widgets.Button(
            description="Check",
            icon="search",
            tooltip="everything Train does before its first step (model loaded as kept, data, plan, optimizer), "
            "then the plan with the host memory measured; nothing is written",
        )
        self.check_button.on_click(lambda _: self.check())
        self.train_button.on_click(lambda _: self._start_from_button())
        self.stop_button.on_click(lambda _: self.stop())
        self.progress = widgets.IntProgress(value=0, min=0, max=1, layout=widgets.Layout(width="60%"))
        self.progress_text = widgets.Label()
        self.progress_text.add_class("edtools-progress")
        self.status = widgets.HTML()
        self.status.add_class("edtools-train-status")
        self.balance_image = widgets.Image(format="png", layout=widgets.Layout(width="48%"))
        self.balance_image.add_class("edtools-actual-histogram")
        self.loss_image = widgets.Image(format="png", layout=widgets.Layout(width="48%"))
        self.metrics = MetricsView()  # memorisation gap and concept bleed, per validation
        self.samples = widgets.HBox(layout=widgets.Layout(flex_flow="row wrap"))
        self.keep_samples = 3
        self.log = widgets.HTML(layout=widgets.Layout(max_height="160px", overflow="auto"))
        for widget in (self.batch_size, self.resolution, self.seed):
            widget.observe(lambda _: self._schedule_changed(), "value")
        self._schedule_changed()
        self.out.observe(lambda _: self.offer_resume(), "value")
        for widget in (
            self.model,
            self.preset,
            self.lora_rank,
            self.optimizer,
            self.epochs,
            self.keep_checkpoints,
            self.checkpoint_minutes,
            self.save_single_file,
            self.earlier_run,
        ):
            widget.observe(lambda _: self.check_space(), "value")

        self.widget = widgets.VBox(
            [
                form,
                widgets.HBox([self.check_button, self.train_button, self.stop_button, self.disconnect]),
                widgets.HBox([self.progress, self.progress_text]),
                self.status,
                self.epoch_counts,
                widgets.HBox(
                    [self.balance_image, self.loss_image], layout=widgets.Layout(flex_flow="row wrap")
                ),
                self.metrics.widget,
                self.history,
                widgets.HBox([self.suggest_button, self.apply_button]),
                self.suggestions,
                self.samples,
                self.log,
            ]
        )
        self.widget.add_class("edtools-training")
        self._initial_choice = self.earlier_run.value
        self.offer_resume()

    # ---- the output folder: an earlier run to resume, room for checkpoints

    def offer_resume(self) -> EarlierRun | None:
        """Look into the output folder: a run there is described in the status line with its step and settings,
        its settings fill the fields and, unless it is finished, "resume it" is chosen (Train resumes it)."""
        from ..config import ConfigError

        out = self.out.value.strip()
        self._foreign_lock = None
        try:
            run = self._earlier = find_earlier_run(out) if out else None
        except (OSError, ValueError) as exc:  # an unreadable folder (a Drive mount gone, say): say so, go on
            self._earlier, self._quiet = None, False
            self._say(f"could not look into {html.escape(out)}: {html.escape(str(exc))}", error=True)
            return None
        if run is None or run.checkpoint is None:
            if self._offered:  # a folder without that run: the choice made for it no longer applies
                self.earlier_run.value, self._offered = self._initial_choice, False
                self._say("")
            if run is not None:
                self._say(html.escape(resume_offer(run)[0]), error=True)
            self._quiet = False
            self.check_space()
            return run
        self._quiet = True
        try:
            self.use_settings(run.config)
            restored = self._restore_balance(run)
        except ConfigError as exc:  # saved by another edtools version, say: the fields stay as they are
            self._say(
                f"a run in {html.escape(out)} cannot be resumed here: {html.escape(str(exc))}", error=True
            )
            return run
        finally:
            self._quiet = False
        data_root = str(self.balance.disk.root) if self.balance.disk is not None else None
        text, preselect = resume_offer(run, data_root)
        if restored:
            text += f" Its unsaved multipliers / loss scales are back on the sliders: {restored}."
        if _ACTIVE is not None and _ACTIVE.running and _ACTIVE.out.value.strip() == out:
            text += " A run in this kernel is training into it now (the panel of an earlier cell)."
        if preselect:
            self.earlier_run.value, self._offered = "resume", True
        if run.lock is not None and run.lock_elsewhere:
            self._foreign_lock = (run.out, dict(run.lock))
        self._say(html.escape(text))
        self.check_space()
        return run

    def _restore_balance(self, run: EarlierRun) -> str:
        """Put a run's slider values that are not in the files back on the sliders (unsaved), as it trained
        them: its overrides, or with live balance the values of the epoch it stopped in. Says which."""
        if self.balance.disk is None:
            return ""
        values = (
            run.info.get("epoch_values") if run.info.get("batch") and run.config.get("live_balance") else None
        )
        if values:  # the user's multiplier (v[2]), not auto-balance's: a slider that moved would lock it
            multipliers = {c: v[2] if len(v) > 2 else v[0] for c, v in values.items()}
            loss_scales = {c: v[1] for c, v in values.items()}
        else:
            multipliers = dict(run.config.get("multipliers") or {})
            loss_scales = dict(run.config.get("loss_scales") or {})
        changed = []
        for concept, value in multipliers.items():
            if concept in self.balance.rows and self.balance.multipliers[concept] != value:
                self.balance.set_multiplier(concept, value)
                changed.append(f"{concept} x{value:g}")
        for concept, value in loss_scales.items():
            if concept in self.balance.rows and self.balance.loss_scales[concept] != value:
                self.balance.set_loss_scale(concept, value)
                changed.append(f"{concept} loss_scale {value:g}")
        return ", ".join(changed)

    def check_space(self) -> SpaceCheck | None:
        """Count the checkpoints still to come against the free space of the output folder's drive and say it
        under the folder (a warning when they will not fit)."""
        if self._quiet:
            return None
        out = self.out.value.strip()
        try:
            check = space_check(out, self.config().to_dict(), self._earlier) if out else None
        except (OSError, ValueError) as exc:  # a setting not valid yet: the Train button will say which
            self.space_note.value = f"<small>free space not checked: {html.escape(str(exc))}</small>"
            return None
        if check is None:
            self.space_note.value = ""
        else:
            colour = "#b00020" if check.warning else "#606060"
            self.space_note.value = f"<small style='color:{colour}'>{html.escape(check.message)}</small>"
        return check

    def _schedule_changed(self) -> None:
        self.balance.set_schedule(
            batch_size=self.batch_size.value, resolution=self.resolution.value, seed=self.seed.value
        )

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
        if config.resume and self._foreign_lock is not None:
            from ..train.outdir import take_over_lock

            folder, holder = self._foreign_lock
            if folder == Path(config.out).expanduser():  # the person chose to resume what that runtime left
                take_over_lock(folder, holder)
        space = self.check_space()
        self.events, self.result, self.error = [], None, None
        self._actual = []
        self._loss_figure = LossFigure()
        self.metrics.reset()
        self._multiplier_history, self._auto_history = [], []
        self.history.value = self.epoch_counts.value = ""
        self._last_loss_draw = 0.0
        self._stop.clear()
        self.samples.children = []
        self.train_button.disabled, self.stop_button.disabled = True, False
        self._say(
            "starting…" + (f"<br>{self.space_note.value}" if space is not None and space.warning else "")
        )
        self._thread = threading.Thread(target=self._run, args=(config,), name="edtools-train", daemon=True)
        _ACTIVE = self
        self._thread.start()

    def check(self) -> str | None:
        """The dry run of what Train would start (edtools train --dry-run): the plan in the status line, nothing
        written. Returns the plan's text, or None when the settings or the model are refused (said in red)."""
        from ..errors import EdtoolsError
        from ..train.plan import check_run, format_plan

        if self.running:
            self._say("training is running: Check is for before Train", error=True)
            return None
        try:
            config = self.config()
            self._make_smoke_model(config)
            self._say("checking: loading the model as training keeps it, scanning, planning…")
            plan = format_plan(check_run(config))
        except (EdtoolsError, ValueError, OSError) as exc:
            self._say(html.escape(str(exc)), error=True)
            return None
        self._say(f"<pre style='white-space:pre-wrap'>{html.escape(plan)}</pre>")
        return plan

    def _make_smoke_model(self, config: TrainConfig) -> None:
        if self.smoke and not Path(config.model).exists():
            from ..models import make_tiny_model

            self._say(f"making the tiny smoke-test model in {config.model}…")
            make_tiny_model(config.model)

    def stop(self) -> None:
        """Ask training to stop after the current step; it saves a resumable checkpoint."""
        if self.running:
            self._stop.set()
            self._say("stopping after the current step, then saving a resumable checkpoint…")

    def wait(self, timeout: float | None = None) -> TrainResult | None:
        """Block until training ends; re-raise its error. Returns the TrainResult. A kernel interrupt meanwhile
        stops the run as the Stop button does: after the current step, with a resumable checkpoint."""
        if self._thread is not None:
            try:
                self._thread.join(timeout)
            except KeyboardInterrupt:
                self.stop()
                self._thread.join()
            if self._thread.is_alive():
                raise TimeoutError(f"training still running after {timeout} s")
        if self.error is not None:
            raise RuntimeError(f"training failed: {self.error}") from self.error
        return self.result

    def _run(self, config) -> None:
        handler = WidgetLogHandler(self.log)
        level = _log.level
        _log.addHandler(handler)
        if level == logging.NOTSET or level > logging.INFO:
            _log.setLevel(logging.INFO)
        try:
            self._make_smoke_model(config)
            self._set_progress_total(config)
            from ..train import train

            self._say("training…")
            source = self.balance_values if config.live_balance else None
            self.result = train(config, self._on_event, balance=source)
            if self.result.stop_reason == "callback":
                self.earlier_run.value = "resume"
                self._say(f"Stopped cleanly: {html.escape(str(self.result))}. Press Train to resume.")
            elif self.result.stop_reason == "data_root_gone":  # a Drive unmounted mid-run
                self.earlier_run.value = "resume"
                self._say(
                    f"{html.escape(str(self.result))}. Once the data root is back (mount the drive again), "
                    "press Train to resume.",
                    error=True,
                )
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
            stopped = self.result is not None and self.result.stop_reason == "callback"
            if self._colab and self.disconnect.value and not stopped:
                self._end_runtime()

    def _end_runtime(self) -> None:
        """The checkbox: hand the Colab runtime back now that the run ended (by itself or by an error)."""
        self.status.value += "<br><small>disconnecting the runtime (the checkbox above)…</small>"
        try:
            end_runtime()
        except Exception as exc:  # the result above stays; say why the runtime is still there
            self.status.value += (
                f"<br><small>could not disconnect the runtime: {html.escape(str(exc))}</small>"
            )

    def _set_progress_total(self, config) -> None:
        """Optimizer steps as train() plans them (until the first step event says so itself)."""
        from ..balance.holdout import split_validation

        dataset = self._trained_dataset
        if config.validation_split:
            dataset = split_validation(dataset, config.validation_split, config.seed)[0]
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
        self._max_steps = config.max_steps

    # ---- events from the training thread

    def _on_event(self, event) -> bool:
        self.events.append(event)
        handler = getattr(self, f"_on_{event.kind}", None)
        if handler is not None:
            handler(event)
        return self._stop.is_set()

    def _on_step(self, event) -> None:
        if event.total_steps:  # live rebalancing may lengthen or shorten the run
            limit = self._max_steps if self._max_steps is not None else event.total_steps
            self.progress.max = max(1, min(event.total_steps, limit))
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
        from ..balance.report import plot_balance

        dataset = self._trained_dataset
        concepts = dataset.concept_paths
        self._actual.append(np.array([event.images_per_concept.get(c, 0) for c in concepts]))
        figure = plot_balance(
            dataset,
            np.stack(self._actual),
            expected=np.array([event.expected.get(c, 0.0) for c in concepts]),
            title=f"Images per concept: expected (epoch {event.epoch}) vs actual, {len(self._actual)} epoch(s)",
        )
        self.balance_image.value = _png(figure)
        self.epoch_counts.value = counts_html(event.epoch, event.images_per_concept)
        self._multiplier_history.append(dict(event.multipliers))
        self._auto_history.append(_auto_reasons(self.out.value.strip(), event.epoch))
        self.history.value = history_html(self._multiplier_history, concepts, self._auto_history)
        self.balance.show_trained(event.images_per_concept, event.epoch)
        if self._loss_figure is not None:
            self.loss_image.value = self._loss_figure.render()

    def _on_validation(self, event) -> None:
        if self._loss_figure is not None:
            self._loss_figure.add_validation(int(event.global_step), event.loss_per_concept)
            self.loss_image.value = self._loss_figure.render()
        self.metrics.add(event)

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

    def balance_values(self, epoch: int) -> tuple[dict[str, float], dict[str, float]]:
        """The balance panel's values (saved or not) for the next epoch of a live-balanced run."""
        return dict(self.balance.multipliers), dict(self.balance.loss_scales)

    def suggest(self) -> None:
        """Proposals from the output folder's records, shown with their reasons; nothing changes yet."""
        from ..errors import EdtoolsError
        from ..train.records import suggest_run

        try:
            suggestions = suggest_run(self.out.value.strip())
        except EdtoolsError as exc:
            self.suggestions.value = f"<small>{html.escape(str(exc))}</small>"
            return
        self._suggested = {s.concept: s.suggested for s in suggestions if s.changes}
        rows = "".join(
            f"<tr><td>{html.escape(s.concept)}</td><td style='text-align:right'>{s.multiplier:g}</td>"
            f"<td style='text-align:right'>{'<b>' if s.changes else ''}{s.suggested:g}{'</b>' if s.changes else ''}"
            f"</td><td>{html.escape(s.reason)}</td></tr>"
            for s in suggestions
        )
        self.suggestions.value = (
            "<table style='font-size:85%'><tr><th>folder</th><th>multiply</th><th>suggested</th><th>why</th></tr>"
            f"{rows}</table>"
            if suggestions
            else "<small>no suggestions yet: each concept needs at least two validation results</small>"
        )
        self.apply_button.disabled = not self._suggested

    def apply_suggestions(self) -> None:
        """Put the suggested multipliers on the sliders (unsaved; a live run takes them next epoch)."""
        for concept, value in self._suggested.items():
            if concept in self.balance.rows:
                self.balance.set_multiplier(concept, value)
        self.apply_button.disabled = True

    def _on_end(self, event) -> None:
        self.progress.value = self.progress.max if not self._stop.is_set() else self.progress.value
        if self._loss_figure is not None:
            self.loss_image.value = self._loss_figure.render()

    def _say(self, message: str, *, error: bool = False) -> None:
        colour = "#b00020" if error else "#205020"
        self.status.value = f"<span style='color:{colour}'>{message}</span>"
