"""Checkpoints: out/checkpoints/step-00000123/ is a diffusers folder (usable as `model`) plus resume/ with the
optimizer, LR scheduler, grad scaler, RNG states, counters and config; saved atomically, found, restored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..atomic import atomic_file, atomic_folder
from ..balance.schedule import EpochSchedule
from ..config import ConfigError, TrainConfig
from ..errors import require
from ..models.sd import quiet_progress

if TYPE_CHECKING:
    from ..models import SDComponents

__all__ = [
    "CHECKPOINTS_DIR",
    "LORA_FILE",
    "TrainState",
    "check_resume",
    "checkpoint_bytes",
    "checkpoint_info",
    "find_checkpoints",
    "load_checkpoint",
    "remove_checkpoint",
    "save_checkpoint",
    "schedule_fingerprint",
    "single_file_of",
]

CHECKPOINTS_DIR = "checkpoints"
LORA_FILE = (
    "lora.safetensors"  # a LoRA run's checkpoint: the adapters in kohya format, which A1111/ComfyUI load
)
EMA_UNET_DIR = "unet_ema"  # the UNet with its EMA weights (UNet2DConditionModel.from_pretrained reads it)
EMA_LORA_FILE = "lora_ema.safetensors"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8,})$")
# Settings a resumed run must share with its checkpoint: they fix the schedule positions, the optimizer
# state's layout or the learning-rate curve. (epochs may grow: the LR schedule then stretches to the new end.)
_RESUME_MUST_MATCH = (
    "seed",
    "batch_size",
    "resolution",
    "grad_accum",
    "optimizer",
    "train_text_encoder",
    "train_text_encoder_2",
    "lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "lora_rank",
    "lora_alpha",
    "lora_text_encoder",
    "lora_lr",
    "text_encoder_lr",
    "prediction_type",
    "zero_terminal_snr",
    "flow_shift",
    "ema_decay",
)


@dataclass(frozen=True)
class TrainState:
    """Where training stands: optimizer steps taken, and the next batch (of this rank's shard) to train."""

    global_step: int = 0
    epoch: int = 0
    batch: int = 0
    skipped_steps: int = 0


def find_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under out/checkpoints, oldest first. A save in progress or torn (a hidden temp
    folder) never counts: a checkpoint folder only gets its name once everything in it is written. A full
    fine-tune's checkpoint is a diffusers folder; a LoRA run's holds lora.safetensors."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if (
            match
            and ((path / "model_index.json").is_file() or (path / LORA_FILE).is_file())
            and (path / "resume" / "state.json").is_file()
            and (path / "resume" / "state.pt").is_file()
        ):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _rng_states() -> dict:
    torch = require("torch")
    numpy_state = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _set_rng_states(states: dict) -> None:
    torch = require("torch")
    torch.set_rng_state(states["torch"])
    kind, keys, *rest = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(
    folder: str | os.PathLike,
    components: SDComponents,
    *,
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    state: TrainState,
    config: TrainConfig,
    world_size: int = 1,
    schedule_fingerprint: str | None = None,
    metadata: dict[str, str] | None = None,
    extra: dict | None = None,
    ema: Any = None,
    params: Any = None,
) -> Path:
    """Write folder/step-<global_step>: a diffusers pipeline folder (safetensors), or for a LoRA run (lora_rank
    > 0) lora.safetensors, plus resume/ (optimizer, LR scheduler, grad scaler, RNG states, counters, config,
    LoRA adapters), atomically. With config.save_single_file, folder/step-<global_step>.safetensors
    follows (fp16): the whole model in the layout AUTOMATIC1111 and ComfyUI load, or the LoRA file.
    metadata: text for the safetensors headers (training facts: base model, steps, concept table). extra:
    more JSON-ready facts for resume/state.json (the epoch in progress's multipliers, its loss sums). ema (with
    the trained params): its state for resume, and its weights as unet_ema/ (lora_ema.safetensors for LoRA).
    Tensors are copied to the CPU one at a time, so saving does not add to the GPU memory of a step."""
    torch = require("torch")

    folder = Path(folder)
    final = folder / f"step-{state.global_step:08d}"
    lora = config.lora_rank > 0
    payload = {
        "optimizer": optimizer.state_dict(),
        "lr_scheduler": lr_scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "rng": _rng_states(),
    }
    if ema is not None:
        payload["ema"] = ema.state_dict()
    with atomic_folder(final) as checkpoint:  # a crash mid-save leaves nothing that resume would pick up
        if lora:
            from ..models.lora import lora_state_dict, save_lora_file

            save_lora_file(components, checkpoint / LORA_FILE, metadata=metadata)
            payload["lora"] = lora_state_dict(components)
        else:
            from ..models.sd import write_components

            write_components(components, checkpoint)
        if ema is not None:
            from .ema import ema_weights

            with ema_weights(ema, params):
                if lora:
                    save_lora_file(components, checkpoint / EMA_LORA_FILE, metadata=metadata)
                else:
                    with quiet_progress():
                        components.unet.save_pretrained(checkpoint / EMA_UNET_DIR, safe_serialization=True)
        resume = checkpoint / "resume"
        resume.mkdir()
        torch.save(payload, resume / "state.pt")
        (resume / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
        info = {
            **dataclasses.asdict(state),
            "world_size": world_size,
            "schedule_fingerprint": schedule_fingerprint,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
            **(extra or {}),
        }
        (resume / "state.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    if config.save_single_file:
        single = single_file_of(final)
        if lora:  # the same kohya file, where A1111 / ComfyUI users look for the run's results
            with atomic_file(single) as tmp:
                shutil.copyfile(final / LORA_FILE, tmp)
        else:
            from ..models import save_single_file

            save_single_file(components, single, dtype="fp16", metadata=metadata)
    return final


def single_file_of(checkpoint: Path) -> Path:
    """checkpoints/step-N.safetensors: the single file saved beside checkpoint folder step-N."""
    return checkpoint.with_name(checkpoint.name + ".safetensors")


def checkpoint_bytes(checkpoint: Path) -> int:
    """The disk space one checkpoint takes: its folder and the single file beside it."""
    files = [p for p in checkpoint.rglob("*") if p.is_file()] + [single_file_of(checkpoint)]
    return sum(p.stat().st_size for p in files if p.is_file())


def remove_checkpoint(checkpoint: Path) -> None:
    """Delete a checkpoint folder and the single file beside it (keep_checkpoints)."""
    shutil.rmtree(checkpoint, ignore_errors=True)
    single_file_of(checkpoint).unlink(missing_ok=True)


def load_checkpoint(
    path: str | os.PathLike,
    *,
    optimizer: Any,
    lr_scheduler: Any,
    scaler: Any,
    components: SDComponents | None = None,
    ema: Any = None,
    restore_rng: bool = True,
) -> tuple[TrainState, dict]:
    """Restore optimizer, LR scheduler, grad scaler, LoRA adapters (into components, which must carry them
    already) and RNG states from a checkpoint's resume/ folder. A full fine-tune's weights are the checkpoint
    folder itself (load it with models.load_components). Returns (state, info) where info holds the saved
    config ("config"), world_size and schedule_fingerprint."""
    torch = require("torch")
    info = checkpoint_info(path)
    payload = torch.load(Path(path) / "resume" / "state.pt", map_location="cpu", weights_only=True)
    if "lora" in payload:
        if components is None:
            raise ValueError(f"{path} holds LoRA adapters: pass the components they belong to")
        from ..models.lora import load_lora_state_dict

        load_lora_state_dict(components, payload["lora"])
    if ema is not None:
        if "ema" not in payload:
            raise ConfigError(f"cannot resume from {path} with ema_decay: it was saved without an EMA")
        ema.load_state_dict(payload["ema"])
    optimizer.load_state_dict(payload["optimizer"])
    lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if scaler is not None and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        _set_rng_states(payload["rng"])
    names = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in info.items() if k in names}), info


def checkpoint_info(path: str | os.PathLike) -> dict:
    """A checkpoint's counters (state.json) with its config under "config"."""
    resume = Path(path) / "resume"
    info = json.loads((resume / "state.json").read_text(encoding="utf-8"))
    info["config"] = json.loads((resume / "config.json").read_text(encoding="utf-8"))
    return info


def schedule_fingerprint(schedule: EpochSchedule) -> str:
    digest = hashlib.sha256()
    for array in (schedule.image_index, schedule.batch_offsets, schedule.batch_bucket):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def check_resume(info: dict, config: TrainConfig, world_size: int, checkpoint: Path) -> None:
    saved = info["config"]
    differ = [
        f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
        for name in _RESUME_MUST_MATCH
        if saved.get(name) != getattr(config, name)
    ]
    if config.lora_rank and saved.get("model") != config.model:  # the adapters belong to their base model
        differ.append(f"model: checkpoint {saved.get('model')!r}, now {config.model!r}")
    if info.get("world_size", 1) != world_size:
        differ.append(f"processes: checkpoint {info.get('world_size', 1)}, now {world_size}")
    if differ:
        raise ConfigError(
            f"cannot resume from {checkpoint}: these settings differ from the checkpoint's "
            f"({'; '.join(differ)}). "
            f"Use the checkpoint's settings, or start a new run from its weights with model: {checkpoint}"
        )
