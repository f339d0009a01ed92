"""The training panel's settings form: the fields that fill a TrainConfig, filled back from a run's config, and
the preset chosen for the model and GPU. TrainingPanel builds on it (run control, live views).
"""

from __future__ import annotations

import dataclasses
import html
from typing import TYPE_CHECKING, Any

from ..presets import PRESETS, choose_preset
from .common import RESOLUTIONS, gpu_has_bf16, gpu_memory_gib, widgets

if TYPE_CHECKING:
    from ..config import TrainConfig
    from .balance import BalancePanel

__all__ = ["SettingsForm"]


class SettingsForm:
    """The settings fields of the training panel and the TrainConfig they describe. The panel sets `balance`
    (the sliders' unsaved values go into the config), `smoke` and `base_config` (what the fields do not show)."""

    balance: BalancePanel
    smoke: bool
    base_config: Any

    def _build_form(self, defaults: dict[str, Any]) -> Any:
        """The fields, filled from `defaults` (TrainConfig's field names), laid out as one VBox."""
        full = widgets.Layout(width="95%")
        text = dict(style={"description_width": "130px"})
        self.model = widgets.Text(
            value=str(defaults.get("model") or "stable-diffusion-v1-5/stable-diffusion-v1-5"),
            description="model",
            placeholder="a .safetensors file (e.g. on Google Drive), a diffusers folder or a Hugging Face hub id",
            layout=full,
            **text,
        )
        self.model_config = widgets.Text(
            value=str(defaults.get("model_config") or ""),
            description="model config",
            placeholder="single files only, when asked: a diffusers folder or hub id with the model's configs",
            layout=full,
            **text,
        )
        self.preset = widgets.Dropdown(
            options=[("none", "")] + [(name, name) for name in PRESETS],
            value=defaults.get("preset") or "",
            description="preset",
            **text,
        )
        self.preset_note = widgets.HTML()
        self.preset_note.add_class("edtools-preset")
        self.lora_rank = widgets.IntText(
            value=int(defaults.get("lora_rank") or 0), description="LoRA rank (0 = full)", **text
        )
        self.validation_split = widgets.BoundedFloatText(
            value=float(defaults.get("validation_split") or 0.0),
            min=0.0,
            max=0.9,
            step=0.05,
            description="validation share",
            tooltip="share of each folder held out to measure validation loss per concept (0 = none)",
            **text,
        )
        self.live_balance = widgets.Checkbox(
            value=bool(defaults.get("live_balance")),
            description="slider changes apply from the next epoch",
            indent=False,
        )
        self.auto_balance = widgets.Checkbox(
            value=bool(defaults.get("auto_balance")),
            description="auto-balance: raise lagging concepts, lower memorising ones (moved sliders stay)",
            indent=False,
        )
        self.suggest_button = widgets.Button(
            description="Suggest multipliers",
            layout=widgets.Layout(width="auto"),
            icon="lightbulb-o",
            tooltip="read this run's validation and balance history and propose multipliers (nothing changes)",
        )
        self.apply_button = widgets.Button(
            description="Apply to sliders", icon="check", disabled=True, layout=widgets.Layout(width="auto")
        )
        self.suggestions = widgets.HTML()
        self.suggestions.add_class("edtools-suggestions")
        self.suggest_button.on_click(lambda _: self.suggest())
        self.apply_button.on_click(lambda _: self.apply_suggestions())
        self._suggested: dict[str, float] = {}
        self.history = widgets.HTML()
        self.history.add_class("edtools-multiplier-history")
        self.epoch_counts = widgets.HTML()
        self.epoch_counts.add_class("edtools-epoch-counts")
        self.save_single_file = widgets.Checkbox(
            value=bool(defaults.get("save_single_file")),
            description="also save a single file for A1111/ComfyUI",
            indent=False,
        )
        self.out = widgets.Text(
            value=str(defaults.get("out") or "edtools_output"),
            description="output folder",
            layout=full,
            continuous_update=False,  # looked into once typed, not at every key
            **text,
        )
        self.cache_dir = widgets.Text(
            value=str(defaults.get("cache_dir") or "") if defaults.get("cache_latents") == "disk" else "",
            description="disk cache folder",
            placeholder="empty: latents cached as the preset says; a folder (e.g. on Drive): latents and caption "
            "embeddings kept there for later runs",
            layout=full,
            continuous_update=False,
            **text,
        )
        self.space_note = widgets.HTML()
        self.space_note.add_class("edtools-space")
        self.keep_checkpoints = widgets.BoundedIntText(
            value=int(defaults.get("keep_checkpoints") or 0),
            min=0,
            max=10**6,
            description="keep checkpoints",
            tooltip="keep only the newest N checkpoints (0 = keep all)",
            **text,
        )
        self.checkpoint_minutes = widgets.BoundedFloatText(
            value=float(defaults.get("checkpoint_every_minutes") or 0.0),
            min=0.0,
            max=10**6,
            description="checkpoint every (min)",
            tooltip="also save a checkpoint every N minutes (0 = at epoch ends only): a disconnect loses the "
            "steps since the last one",
            style={"description_width": "150px"},
        )
        self.checkpoint_minutes.add_class("edtools-checkpoint-minutes")
        resolution = int(defaults.get("resolution") or 512)
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
        self.epochs.add_class("edtools-epochs")
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
            options=["auto", "no", "fp16", "bf16"],
            value=defaults.get("mixed_precision", "auto"),
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
        self.earlier_run.add_class("edtools-earlier-run")
        # The learning rate box shows lr for a full fine-tune and lora_lr for LoRA; each is kept for its kind.
        self._lrs = {False: float(defaults.get("lr", 1e-6)), True: float(defaults.get("lora_lr", 1e-4))}
        self.lr.value = self._lrs[self.lora_rank.value > 0]
        self.lr.observe(
            lambda _: self._lrs.__setitem__(self.lora_rank.value > 0, float(self.lr.value)), "value"
        )
        self.lora_rank.observe(self._lora_changed, "value")
        self.preset.observe(lambda change: self.apply_preset(change["new"]), "value")
        self.model.observe(lambda _: self.suggest_preset(), "value")
        if not self.smoke and not defaults.get("preset"):
            self.suggest_preset()
        form = widgets.VBox(
            [
                self.model,
                self.model_config,
                self.out,
                self.cache_dir,
                self.space_note,
                widgets.HBox([self.preset, self.preset_note]),
                widgets.HBox([self.resolution, self.batch_size, self.epochs]),
                widgets.HBox([self.lr, self.optimizer, self.mixed_precision]),
                widgets.HBox([self.lora_rank, self.seed, self.sample_every]),
                widgets.HBox([self.validation_split, self.live_balance]),
                self.auto_balance,
                self.sample_prompts,
                widgets.HBox([self.keep_checkpoints, self.checkpoint_minutes]),
                widgets.HBox([self.earlier_run, self.save_single_file]),
            ]
        )
        return form

    def suggest_preset(self) -> None:
        """Pick the preset for this model on this GPU (by its total memory) and say which and why."""
        from ..models import guess_architecture

        architecture = guess_architecture(self.model.value.strip()) or "sd"
        preset, why = choose_preset(architecture, gpu_memory_gib(), bf16=gpu_has_bf16())
        self.preset.value = preset.name if preset is not None else ""
        self.preset_note.value = f"<small>{html.escape(why)}</small>"

    def apply_preset(self, name: str) -> None:
        """Show a preset's settings in the form (the rest of them apply when training starts)."""
        if not name:
            self.preset_note.value = "<small>no preset: the settings below and TrainConfig's defaults</small>"
            return
        settings = PRESETS[name].settings
        self.lora_rank.value = int(settings.get("lora_rank", 0))
        lora = self.lora_rank.value > 0
        if "lora_lr" in settings or "lr" in settings:
            self.lr.value = float(settings["lora_lr"] if lora else settings["lr"])
        for key in ("batch_size", "optimizer", "mixed_precision"):
            if key in settings:
                getattr(self, key).value = settings[key]
        if "resolution" in settings:
            resolution = int(settings["resolution"])
            self.resolution.options = sorted(set(self.resolution.options) | {resolution})
            self.resolution.value = resolution
        self.preset_note.value = f"<small>{html.escape(PRESETS[name].summary)}</small>"

    def use_settings(self, config: Any) -> None:
        """Fill the fields from a run's config (a TrainConfig or its to_dict()), and keep the settings they do
        not show as the base config: a resume then passes its checks."""
        from ..config import TrainConfig

        saved = config.to_dict() if isinstance(config, TrainConfig) else dict(config)
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        self.base_config = TrainConfig.from_dict({k: v for k, v in saved.items() if k in known})
        saved = self.base_config.to_dict()
        # the model and preset first: choosing them fills other fields, set to the run's own values below
        self.model.value = saved["model"]
        self.model_config.value = saved["model_config"] or ""
        self.preset.value = saved["preset"] if saved["preset"] in PRESETS else ""
        self._lrs = {False: float(saved["lr"]), True: float(saved["lora_lr"])}
        self.lora_rank.value = int(saved["lora_rank"])
        self.lr.value = self._lrs[self.lora_rank.value > 0]
        for name in ("resolution", "optimizer"):
            widget = getattr(self, name)
            if saved[name] is not None and saved[name] not in widget.options:
                widget.options = [*widget.options, saved[name]]
        if saved["resolution"] is not None:
            self.resolution.value = int(saved["resolution"])
        self.batch_size.value, self.epochs.value = int(saved["batch_size"]), int(saved["epochs"])
        self.optimizer.value, self.mixed_precision.value = saved["optimizer"], saved["mixed_precision"]
        self.seed.value = int(saved["seed"])
        self.sample_prompts.value = "\n".join(saved["sample_prompts"])
        self.sample_every.value = int(saved["sample_every_steps"])
        self.validation_split.value = float(saved["validation_split"])
        self.live_balance.value = bool(saved["live_balance"])
        self.auto_balance.value = bool(saved.get("auto_balance", False))
        self.save_single_file.value = bool(saved["save_single_file"])
        self.keep_checkpoints.value = int(saved["keep_checkpoints"])
        self.checkpoint_minutes.value = float(saved["checkpoint_every_minutes"])
        disk = saved["cache_latents"] == "disk"
        self.cache_dir.value = str(saved["cache_dir"] or "") if disk else ""

    def _lora_changed(self, change) -> None:
        if (change["old"] > 0) != (change["new"] > 0):
            self.lr.value = self._lrs[change["new"] > 0]

    def config(self) -> TrainConfig:
        """The TrainConfig these widgets describe; unsaved balance values go in as multipliers/loss_scales."""
        from ..config import TrainConfig

        changes = self.balance.changes()
        values = {
            "data_root": str(self.balance.disk.root if self.balance.disk else ""),
            "kohya_repeats": self.balance.kohya_repeats,
            "model": self.model.value.strip(),
            "model_config": self.model_config.value.strip() or None,
            "preset": self.preset.value or None,
            "lora_rank": int(self.lora_rank.value),
            "save_single_file": bool(self.save_single_file.value),
            "out": self.out.value.strip(),
            "resolution": int(self.resolution.value),
            "batch_size": int(self.batch_size.value),
            "epochs": int(self.epochs.value),
            ("lora_lr" if self.lora_rank.value > 0 else "lr"): float(self.lr.value),
            "optimizer": self.optimizer.value,
            "mixed_precision": self.mixed_precision.value,
            "seed": int(self.seed.value),
            "sample_prompts": tuple(p.strip() for p in self.sample_prompts.value.splitlines() if p.strip()),
            "sample_every_steps": int(self.sample_every.value),
            "validation_split": float(self.validation_split.value),
            "live_balance": bool(self.live_balance.value),
            "auto_balance": bool(self.auto_balance.value),
            "keep_checkpoints": int(self.keep_checkpoints.value),
            "checkpoint_every_minutes": float(self.checkpoint_minutes.value),
            "resume": self.earlier_run.value == "resume",
            "overwrite": self.earlier_run.value == "overwrite",
            "progress_bar": False,  # the panel has its own
            "multipliers": {c: v["multiplier"] for c, v in changes.items() if "multiplier" in v},
            "loss_scales": {c: v["loss_scale"] for c, v in changes.items() if "loss_scale" in v},
        }
        if self.cache_dir.value.strip():
            values.update(cache_dir=self.cache_dir.value.strip(), cache_latents="disk")
        if self.smoke:
            values.update(sample_steps=2)  # the tiny model's samples are noise anyway: keep them quick
        if self.base_config is not None:
            return TrainConfig.from_dict({**self.base_config.to_dict(), **values})
        return TrainConfig.from_dict(values)
