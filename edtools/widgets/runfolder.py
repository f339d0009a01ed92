"""An output folder before training: the run it holds (offered for resume with its step and settings), and
whether the checkpoints still to come fit on its drive (measured from one, or estimated from the model's size).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "EarlierRun",
    "SpaceCheck",
    "checkpoint_space",
    "estimate_checkpoint_bytes",
    "find_earlier_run",
    "model_parameters",
    "planned_saves",
    "resume_offer",
    "run_settings",
    "space_check",
]

RUNTIME_HOURS = (
    12  # the longest a Colab runtime runs: timed checkpoints that fill the drive sooner are a problem
)
# Optimizer state per trained parameter in bytes (two fp32 moments; 8-bit ones a byte each; prodigy four).
OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "paged_adamw8bit": 2, "lion8bit": 1, "prodigy": 16}


# ---- the run an output folder holds


@dataclass(frozen=True)
class EarlierRun:
    """What a fresh panel finds in an output folder: the newest intact checkpoint (None when every one is
    damaged), its counters (state.json) and config, newer damaged checkpoints with why, and the run that holds
    the folder's lock now (another process, or another machine such as a Colab runtime that disconnected)."""

    out: Path
    checkpoint: Path | None
    info: Mapping[str, Any]
    config: Mapping[str, Any]
    damaged: tuple[tuple[Path, str], ...] = ()
    lock: Mapping[str, Any] | None = None

    @property
    def finished(self) -> bool:
        """Whether resuming would train nothing more: every epoch done, or max_steps reached."""
        step, epoch = self.info.get("global_step", 0), self.info.get("epoch", 0)
        max_steps = self.config.get("max_steps")
        done = self.info.get("batch", 0) == 0 and epoch >= self.config.get("epochs", 0)
        return done or (max_steps is not None and step >= max_steps)

    @property
    def lock_elsewhere(self) -> bool:
        """The lock is another machine's: on Colab, the runtime before a disconnect."""
        return self.lock is not None and self.lock.get("host") != socket.gethostname()


def find_earlier_run(out: str | os.PathLike) -> EarlierRun | None:
    """The run in an output folder, or None when it holds no checkpoint. Reads what a resume reads: the newest
    checkpoint that is intact (the same check training makes), and the folder's lock."""
    from ..train.checkpoint import checkpoint_info, find_checkpoints
    from ..train.outdir import damage, lock_holder

    out = Path(out).expanduser()
    checkpoints = find_checkpoints(out)
    if not checkpoints:
        return None
    damaged = []
    for checkpoint in reversed(checkpoints):
        problem = damage(checkpoint)
        if problem is None:
            info = checkpoint_info(checkpoint)
            config = info.pop("config")
            return EarlierRun(out, checkpoint, info, config, tuple(damaged), lock_holder(out))
        damaged.append((checkpoint, problem))
    return EarlierRun(out, None, {}, {}, tuple(damaged), lock_holder(out))


def _number(value: Any) -> str:
    return f"{value:g}" if isinstance(value, int | float) else str(value)


def run_settings(config: Mapping[str, Any]) -> str:
    """A run's main settings in one line: preset, LoRA rank or full, learning rate, batch, resolution, model."""
    lora = int(config.get("lora_rank") or 0)
    parts = [f"preset {config['preset']}"] if config.get("preset") else []
    parts += [
        f"LoRA rank {lora}" if lora else "full fine-tune",
        f"lr {_number(config.get('lora_lr' if lora else 'lr'))}",
        f"batch {config.get('batch_size')}",
        f"{config.get('resolution')} px",
        f"{config.get('epochs')} epochs",
        f"model {Path(str(config.get('model'))).name}",
    ]
    return ", ".join(parts)


def resume_offer(run: EarlierRun, data_root: str | os.PathLike | None = None) -> tuple[str, bool]:
    """What to tell a person about an earlier run (plain text), and whether "resume it" is the choice to
    preselect (an unfinished run with an intact checkpoint)."""
    if run.checkpoint is None:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in run.damaged)
        return (
            f"{run.out} holds checkpoints of an earlier run, but none can be resumed from ({reasons}). "
            "Choose 'delete it, start afresh', or another output folder.",
            False,
        )
    step, epoch, batch = (int(run.info.get(k, 0)) for k in ("global_step", "epoch", "batch"))
    epochs = run.config.get("epochs")
    where = f"in epoch {epoch + 1} of {epochs}" if batch else f"after epoch {epoch} of {epochs}"
    saved = f", saved {run.info['saved_at']}" if run.info.get("saved_at") else ""
    settings = run_settings(run.config)
    if run.finished:
        text = (
            f"Found a finished run in {run.out} (step {step}, {where}{saved}; {settings}). The fields below are "
            "its settings: raise epochs and choose 'resume it' to train on, or choose another output folder."
        )
    else:
        text = (
            f"Found a run in {run.out} stopped at step {step}, {where}{saved} ({settings}). The fields below are "
            "its settings: Train resumes it."
        )
    if run.damaged:
        skipped = ", ".join(f"{p.name} ({why})" for p, why in run.damaged)
        text += f" Newer checkpoints cannot be used and are skipped: {skipped}."
    saved_root = run.config.get("data_root")
    if data_root is not None and saved_root and not _same_path(saved_root, data_root):
        text += (
            f" It trained on {saved_root}, not {data_root}: scan that data root above first, or a resume in the "
            "middle of an epoch is refused."
        )
    if run.lock is not None and run.lock_elsewhere:
        text += (
            f" Its lock is from another machine ({run.lock.get('host')}, started {run.lock.get('started', '?')}), "
            "as a Colab runtime that disconnected leaves it: resuming takes it over. If that run still goes on, "
            "choose another output folder instead."
        )
    elif run.lock is not None:
        text += (
            f" Another process on this machine is training into it now (pid {run.lock.get('pid')}): wait for it "
            "to end or stop it first."
        )
    return text, not run.finished


def _same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))


# ---- checkpoints against the drive's free space


def model_parameters(model: str) -> tuple[dict[str, int], str]:
    """Parameters of a model's parts ({"unet", "text", "vae", and "lora_unet" / "lora_text" per unit of LoRA
    rank}) and where they come from: counted from the safetensors headers when the model is here (a diffusers
    folder or one file; no weights are read), else the typical counts of its kind (a hub id)."""
    from ..models.families import guess_family

    path = Path(model).expanduser()
    try:
        if path.is_dir():
            counts = _count_folder(path)
        elif path.is_file() and path.suffix.lower() == ".safetensors":
            counts = _count_single_file(path)
        else:
            counts = None
    except (OSError, ValueError, KeyError):
        counts = None
    if counts and counts["unet"]:
        return counts, f"the model's {_billions(counts)} parameters"
    family = guess_family(model)  # its files, else its name ("xl" in a hub id)
    counts = dict(family.typical_parameters)
    return counts, f"a typical {family.short_label} model's {_billions(counts)} parameters"


def _billions(counts: Mapping[str, int]) -> str:
    n = counts["unet"] + counts["text"] + counts["vae"]
    return f"{n / 1e9:.2f} billion" if n >= 1e8 else f"{n / 1e6:.2f} million"


def _header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as file:
        size = int.from_bytes(file.read(8), "little")
        header = json.loads(file.read(size))
    header.pop("__metadata__", None)
    return header


def _add(counts: dict[str, int], part: str, name: str, shape: list[int]) -> None:
    from ..models.lora import TEXT_ENCODER_TARGETS, UNET_TARGETS

    n = 1
    for side in shape:
        n *= side
    counts[part] += n
    targets = UNET_TARGETS if part == "unet" else TEXT_ENCODER_TARGETS if part == "text" else ()
    if len(shape) in (2, 4) and any(name.endswith(f"{t}.weight") for t in targets):
        counts[f"lora_{part}"] += shape[0] + shape[1]


def _empty() -> dict[str, int]:
    return dict.fromkeys(("unet", "text", "vae", "lora_unet", "lora_text"), 0)


def _count_folder(folder: Path) -> dict[str, int]:
    counts = _empty()
    parts = {"unet": "unet", "text_encoder": "text", "text_encoder_2": "text", "vae": "vae"}
    for sub, part in parts.items():
        files = sorted((folder / sub).glob("*.safetensors"))
        plain = [f for f in files if len(f.name.split(".")) == 2]  # diffusion_pytorch_model.fp16.safetensors
        for file in plain or files[:1]:  # is a variant of the same weights
            for name, entry in _header(file).items():
                _add(counts, part, name, entry["shape"])
    return counts


def _count_single_file(path: Path) -> dict[str, int]:
    counts = _empty()
    for name, entry in _header(path).items():
        if name.startswith("model.diffusion_model."):
            part = "unet"
        elif name.startswith("first_stage_model."):
            part = "vae"
        elif name.startswith(("cond_stage_model.", "conditioner.")):
            part = "text"
        else:
            continue
        _add(counts, part, name, entry["shape"])
    return counts


def estimate_checkpoint_bytes(parameters: Mapping[str, int], config: Mapping[str, Any]) -> int:
    """About how many bytes one checkpoint of this run takes, from the model's parameters (model_parameters)
    and the run's settings: a full fine-tune writes the whole model in fp32 and the optimizer's state of what
    it trains; a LoRA run its adapters (fp16 file, fp32 state). EMA and the single file add their copies."""
    optimizer = OPTIMIZER_BYTES.get(str(config.get("optimizer")), 8)
    rank = int(config.get("lora_rank") or 0)
    if rank:
        adapters = rank * (
            parameters["lora_unet"] + (parameters["lora_text"] if config.get("lora_text_encoder") else 0)
        )
        size = adapters * (2 + 4 + optimizer)
        if config.get("ema_decay"):
            size += adapters * (2 + 4)
        if config.get("save_single_file"):
            size += adapters * 2
        return size
    whole = parameters["unet"] + parameters["text"] + parameters["vae"]
    trained = parameters["unet"] + (parameters["text"] if config.get("train_text_encoder", True) else 0)
    size = whole * 4 + trained * optimizer
    if config.get("ema_decay"):
        size += parameters["unet"] * 4 + trained * 4
    if config.get("save_single_file"):
        size += whole * 2
    return size


def checkpoint_space(*, each: int, existing: int, saves: int, keep: int) -> int:
    """Bytes the checkpoints still to come need on top of those already saved, at the fullest moment: each
    save is written before keep_checkpoints removes the oldest (keep 0 keeps all)."""
    on_disk = peak = existing
    for _ in range(saves):
        on_disk += 1
        peak = max(peak, on_disk)
        if keep:
            on_disk = min(on_disk, keep)
    return (peak - existing) * each


def planned_saves(epochs: int, every_epochs: int, start_epoch: int = 0) -> int:
    """Checkpoints a run saves from start_epoch on: one every `every_epochs` epochs, and one at the end."""
    ends = [e for e in range(start_epoch + 1, epochs + 1) if every_epochs and e % every_epochs == 0]
    return len(ends) + (0 if ends and ends[-1] == epochs else 1)


@dataclass(frozen=True)
class SpaceCheck:
    """Checkpoints against free space: bytes needed and free, one checkpoint's size, the line that says so, and
    whether that line is a warning (they will not fit)."""

    needed: int
    free: int
    each: int
    message: str
    warning: bool


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def space_check(
    out: str | os.PathLike, config: Mapping[str, Any], earlier: EarlierRun | None = None
) -> SpaceCheck:
    """Whether the checkpoints of a run into `out` fit on its drive (shutil.disk_usage of the folder, or of its
    nearest existing parent). config: TrainConfig values (to_dict). A resumed run's checkpoints are counted from
    its epoch on, next to those it keeps, each the size of the one it resumes from (earlier, else
    find_earlier_run); a fresh run's size is estimated from the model, and with overwrite the earlier
    checkpoints' space counts as free."""
    from ..train.checkpoint import checkpoint_bytes, find_checkpoints

    out = Path(out).expanduser()
    existing = find_checkpoints(out)
    drive = next(p for p in (out.absolute(), *out.absolute().parents) if p.exists())
    free = shutil.disk_usage(drive).free
    start_epoch = 0
    if config.get("resume") and existing:
        earlier = earlier if earlier is not None and earlier.out == out else find_earlier_run(out)
    if config.get("resume") and earlier is not None and earlier.checkpoint is not None:
        each, how = checkpoint_bytes(earlier.checkpoint), f"measured from {earlier.checkpoint.name}"
        start_epoch = int(earlier.info.get("epoch", 0))
    else:
        parameters, source = model_parameters(str(config.get("model") or ""))
        each, how = estimate_checkpoint_bytes(parameters, config), f"estimated from {source}"
        if config.get("overwrite"):  # deleted before the first save
            free += sum(checkpoint_bytes(c) for c in existing)
            existing = []
    epochs, every = int(config.get("epochs") or 0), int(config.get("checkpoint_every_epochs") or 0)
    saves = planned_saves(epochs, every, start_epoch)
    keep = int(config.get("keep_checkpoints") or 0)
    needed = checkpoint_space(each=each, existing=len(existing), saves=saves, keep=keep)
    minutes = float(config.get("checkpoint_every_minutes") or 0)
    message = (
        f"Checkpoints: {saves} more to save{f' plus one every {minutes:.3g} minutes' if minutes else ''} "
        f"({f'the newest {keep} kept' if keep else 'every one kept'}), about {_size(each)} each ({how}); "
        f"{_size(needed)} needed, {_size(free)} free on the drive of {out}."
    )
    warning = needed > free
    if minutes and not keep and not warning:  # timed saves kept without end: when does the drive fill?
        hours = (free - needed) // max(each, 1) * minutes / 60
        warning = hours < RUNTIME_HOURS
        message += f" Timed checkpoints fill the drive after about {hours:.3g} h of training."
    if warning:
        message += (
            " They will not fit: set keep checkpoints (e.g. 2), free space on the drive, or choose an output "
            "folder on a larger drive (a checkpoint that finds the drive full stops the run)."
        )
    return SpaceCheck(needed, free, each, message, warning)
