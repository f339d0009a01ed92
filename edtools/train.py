"""Training: train_step (latents, noise, UNet, loss_scale-weighted loss, optimizer step) and the train() loop.

Random draws depend only on (seed, epoch, rank, batch): a run stopped and resumed ends with the same weights.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from .config import ConfigError, TrainConfig
from .dataset import Dataset, scan
from .schedule import (
    EpochSchedule,
    build_epoch,
    expected_images_per_epoch,
    make_buckets,
    shard,
    write_schedule,
)

if TYPE_CHECKING:
    import torch

    from .model import SDComponents

__all__ = [
    "StepResult",
    "TrainEvent",
    "TrainResult",
    "TrainState",
    "find_checkpoints",
    "load_checkpoint",
    "make_grad_scaler",
    "make_lr_scheduler",
    "make_optimizer",
    "prepare_modules",
    "save_checkpoint",
    "save_samples",
    "step_generator",
    "train",
    "train_step",
]

log = logging.getLogger("edtools.train")

CHECKPOINTS_DIR = "checkpoints"
SAMPLES_DIR = "samples"
SCHEDULES_DIR = "schedules"
_CHECKPOINT_NAME = re.compile(r"^step-(\d{8,})$")
_TAG_STEP = 0xB0  # keeps the noise/timestep streams apart from the schedule's and the augmentations'
# Settings a resumed run must share with its checkpoint: they fix the schedule positions, the optimizer
# state's layout or the learning-rate curve. (epochs may grow: the LR schedule then stretches to the new end.)
_RESUME_MUST_MATCH = (
    "seed",
    "batch_size",
    "resolution",
    "grad_accum",
    "optimizer",
    "train_text_encoder",
    "lr",
    "lr_scheduler",
    "lr_warmup_steps",
)


def _require(module: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"edtools training needs {module.split('.')[0]}: pip install -r requirements.txt"
        ) from exc


# ---------------------------------------------------------------------------------------------------------
# What the loop reports


@dataclass(frozen=True)
class TrainState:
    """Where training stands: optimizer steps taken, and the next batch (of this rank's shard) to train."""

    global_step: int = 0
    epoch: int = 0
    batch: int = 0
    skipped_steps: int = 0


@dataclass
class StepResult:
    """One batch's outcome. loss is the batch's objective (loss_scale, batch weight and Min-SNR applied);
    per_sample is each image's plain MSE. stepped: this batch closed an accumulation group and the optimizer
    stepped; skipped: it closed one and the step was skipped (non-finite loss or gradient)."""

    loss: float
    per_sample: Any  # torch.Tensor float32 [n] on the CPU
    nonfinite: bool
    stepped: bool = False
    skipped: bool = False
    grad_norm: float | None = None
    lr: float | None = None


@dataclass(frozen=True)
class TrainResult:
    """How a train() call ended. stop_reason: finished, max_steps or callback."""

    out: str
    global_step: int
    epoch: int  # epochs fully trained
    batch: int  # batches of the next epoch already trained (on each rank)
    stop_reason: Literal["finished", "max_steps", "callback"]
    checkpoint: str | None
    skipped_steps: int
    last_loss: float | None
    seconds: float

    def __str__(self) -> str:
        where = f"epoch {self.epoch}" + (f" + {self.batch} batches" if self.batch else "")
        how = {"finished": "finished", "max_steps": "stopped at max_steps", "callback": "stopped on request"}
        loss = "" if self.last_loss is None else f", last loss {self.last_loss:.4f}"
        skipped = f", {self.skipped_steps} step(s) skipped (non-finite)" if self.skipped_steps else ""
        return (
            f"{how[self.stop_reason]} after {self.global_step} optimizer steps ({where}) in "
            f"{self.seconds:.1f} s{loss}{skipped}; checkpoint: {self.checkpoint}"
        )


@dataclass(frozen=True)
class TrainEvent:
    """What the callback receives. kind decides which fields are set:
    step: global_step, epoch, batch, loss (mean MSE of the step's images), loss_per_concept, lr, skipped,
          images (image numbers this rank trained in the step);
    epoch: epoch, images_per_concept (trained this epoch), expected (n_images x multiplier);
    sample: global_step, paths (PNG grids); checkpoint: global_step, path; end: result.
    Under accelerate launch every process calls its callback; sample and checkpoint come from the main one."""

    kind: Literal["step", "epoch", "sample", "checkpoint", "end"]
    global_step: int
    epoch: int
    batch: int | None = None
    loss: float | None = None
    loss_per_concept: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    skipped: bool = False
    images: tuple[int, ...] = ()
    images_per_concept: dict[str, int] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    path: str | None = None
    result: TrainResult | None = None
    rank: int = 0
    world_size: int = 1


# ---------------------------------------------------------------------------------------------------------
# Building blocks


def step_generator(seed: int, epoch: int, rank: int, batch: int) -> torch.Generator:
    """The CPU generator of one batch's noise, timesteps and VAE sample: a pure function of its arguments."""
    torch = _require("torch")
    words = np.random.SeedSequence([seed, _TAG_STEP, epoch, rank, batch]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator("cpu")
    generator.manual_seed(((int(words[0]) << 32) | int(words[1])) & (2**63 - 1))
    return generator


def _quiet_bitsandbytes() -> None:
    """bitsandbytes' import (ours, or diffusers' while loading a model) warns about a 4-bit CPU kernel that
    8-bit AdamW never uses; that one logger is silenced below errors."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)


def _import_bitsandbytes() -> Any:
    """bitsandbytes >= 0.50 (its 8-bit AdamW runs on CPU and GPU), or an error that says what to do."""
    _quiet_bitsandbytes()
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ImportError(
            "optimizer adamw8bit needs bitsandbytes >= 0.50: pip install -U 'bitsandbytes>=0.50' "
            "(or set optimizer: adamw, which takes 4x the optimizer memory)"
        ) from exc
    version = tuple(int(p) for p in re.findall(r"\d+", bitsandbytes.__version__)[:2])
    if version < (0, 50):
        raise ImportError(
            f"optimizer adamw8bit needs bitsandbytes >= 0.50 (found {bitsandbytes.__version__}): "
            "pip install -U 'bitsandbytes>=0.50' (or set optimizer: adamw)"
        )
    return bitsandbytes


def make_optimizer(config: TrainConfig, params: Sequence[Any]) -> Any:
    """AdamW8bit (bitsandbytes; 8-bit moments for tensors of 4096+ values) or torch AdamW."""
    params = list(params)
    if config.optimizer == "adamw8bit":
        bnb = _import_bitsandbytes()
        return bnb.optim.AdamW8bit(params, lr=config.lr, weight_decay=config.weight_decay)
    torch = _require("torch")
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


def make_lr_scheduler(config: TrainConfig, optimizer: Any, total_steps: int) -> Any:
    """diffusers' schedule by name, with warmup, over the run's total optimizer steps."""
    optimization = _require("diffusers.optimization")
    return optimization.get_scheduler(
        config.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max(int(total_steps), 1),
    )


def make_grad_scaler(config: TrainConfig, device: Any) -> Any:
    """A GradScaler, enabled only for fp16 (bf16 and fp32 need no loss scaling)."""
    torch = _require("torch")
    device_type = torch.device(device).type
    enabled = config.mixed_precision == "fp16"
    if hasattr(torch.amp, "GradScaler"):
        return torch.amp.GradScaler(device_type, enabled=enabled)
    return torch.cuda.amp.GradScaler(enabled=enabled and device_type == "cuda")  # torch < 2.3


def _autocast(config: TrainConfig, device: Any):
    torch = _require("torch")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.mixed_precision)
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _any_rank(flag: bool, device: Any) -> bool:
    """True on every rank when it is True on any (one all-reduce; just `flag` when not distributed)."""
    if not _distributed():
        return flag
    import torch
    import torch.distributed as dist

    value = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item() > 0)


def _grad_norm(params: list, max_norm: float | None) -> float:
    """Total gradient norm before clipping; clips to max_norm when given."""
    torch = _require("torch")
    if max_norm is not None:
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    grads = [p.grad for p in params]
    if hasattr(torch.nn.utils, "get_total_norm"):
        return float(torch.nn.utils.get_total_norm(grads))
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))


# ---------------------------------------------------------------------------------------------------------
# One step


def train_step(
    components: SDComponents,
    optimizer: Any,
    batch: dict,
    *,
    config: TrainConfig,
    lr_scheduler: Any,
    scaler: Any,
    latent_cache: Any,
    generator: torch.Generator,
    sync: bool = True,
    nonfinite_before: bool = False,
) -> StepResult:
    """Train one batch: VAE latents (no grad) -> noise and timesteps from `generator` -> add_noise -> text
    encoder -> UNet -> target by prediction type -> per-image MSE -> optional Min-SNR weights -> loss with
    loss_scale, batch weight and the nominal batch size -> backward of loss / grad_accum.

    sync: this batch closes an accumulation group (always when grad_accum is 1); then gradients are unscaled
    (fp16), checked, clipped, and the optimizer and LR scheduler step. A non-finite loss in the group (this
    batch, or an earlier one: nonfinite_before) or a non-finite gradient skips the optimizer step: weights and
    optimizer state stay untouched and the gradients are dropped. components.unet / text_encoder may be
    DistributedDataParallel wrappers: gradients then sync on the closing batch only.
    """
    torch = _require("torch")
    from .loss import batch_loss, compute_snr, min_snr_weights, per_sample_mse, prediction_target

    unet, text_encoder, vae, noise_scheduler = (
        components.unet,
        components.text_encoder,
        components.vae,
        components.noise_scheduler,
    )
    fp16 = scaler is not None and scaler.is_enabled()
    device = vae.device
    distributed = _distributed()
    with ExitStack() as stack:
        if not sync:  # no gradient all-reduce until the group's last batch
            for module in (unet, text_encoder):
                if isinstance(module, torch.nn.parallel.DistributedDataParallel):
                    stack.enter_context(module.no_sync())
        latents = latent_cache.latents(batch, vae, vae.config.scaling_factor, generator=generator).float()
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32).to(device)
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (n,), generator=generator, dtype=torch.int64
        ).to(device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(noise_scheduler, latents, noise, timesteps)
        input_ids = batch["input_ids"].to(device)
        with _autocast(config, device):
            with torch.set_grad_enabled(config.train_text_encoder):
                hidden = text_encoder(input_ids)[0]
            model_pred = unet(noisy, timesteps, hidden).sample
        per_sample = per_sample_mse(model_pred, target)
        snr_weights = None
        if config.min_snr_gamma is not None:
            snr_weights = min_snr_weights(
                compute_snr(noise_scheduler, timesteps),
                config.min_snr_gamma,
                noise_scheduler.config.prediction_type,
            )
        loss = batch_loss(
            per_sample,
            batch["loss_scale"],
            nominal_batch_size=config.batch_size,
            batch_weight=float(batch["batch_weight"]),
            snr_weights=snr_weights,
        )
        loss_value = float(loss.detach())
        nonfinite = not math.isfinite(loss_value)
        if nonfinite:
            log.warning(
                "loss is %s at epoch %s batch %s: this optimizer step is skipped (weights and optimizer "
                "state unchanged)",
                loss_value,
                batch.get("epoch"),
                batch.get("batch"),
            )
        # Under DDP the closing batch's backward all-reduces gradients, so every rank must run it; the
        # non-finite gradients it then holds are dropped below on all ranks alike.
        if not nonfinite or (distributed and sync):
            scaled = loss / config.grad_accum
            (scaler.scale(scaled) if fp16 else scaled).backward()
    result = StepResult(loss=loss_value, per_sample=per_sample.detach().float().cpu(), nonfinite=nonfinite)
    if not sync:
        return result

    result.lr = float(lr_scheduler.get_last_lr()[0])
    skip = _any_rank(nonfinite_before or nonfinite, device)
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    if fp16:
        scaler.unscale_(optimizer)
    if not skip and params:
        result.grad_norm = _grad_norm(params, config.max_grad_norm)
        if not math.isfinite(result.grad_norm):
            skip = True
            level = logging.INFO if fp16 else logging.WARNING  # fp16 overflow is routine: the scale backs off
            log.log(level, "gradient norm is %s: this optimizer step is skipped", result.grad_norm)
    if skip:
        optimizer.zero_grad(set_to_none=True)
        if fp16:
            scaler.update(scaler.get_scale() * scaler.get_backoff_factor())
    else:
        if fp16:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    lr_scheduler.step()  # also on a skipped step: the LR curve follows the schedule's steps
    result.stepped, result.skipped = not skip, skip
    return result


# ---------------------------------------------------------------------------------------------------------
# Checkpoints: out/checkpoints/step-00000123/ is a diffusers pipeline folder (use it as `model`) with one more
# subfolder, resume/ (optimizer, LR scheduler, grad scaler, RNG states, counters, config).


def find_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under out/checkpoints, oldest first. A save in progress or torn (a hidden temp
    folder) never counts: a checkpoint folder only gets its name once everything in it is written."""
    folder = Path(out) / CHECKPOINTS_DIR
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        match = _CHECKPOINT_NAME.match(path.name)
        if (
            match
            and (path / "model_index.json").is_file()
            and (path / "resume" / "state.json").is_file()
            and (path / "resume" / "state.pt").is_file()
        ):
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def _rng_states() -> dict:
    torch = _require("torch")
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
    torch = _require("torch")
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
) -> Path:
    """Write folder/step-<global_step>: a diffusers pipeline folder (safetensors) plus resume/ (optimizer,
    LR scheduler, grad scaler, RNG states, counters, config). It is written inside a hidden temp folder and
    renamed at the end, so a crash mid-save leaves nothing that resume would pick up."""
    torch = _require("torch")
    from .model import save_components

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / f"step-{state.global_step:08d}"
    staging = Path(tempfile.mkdtemp(dir=folder, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        checkpoint = save_components(components, staging / final.name)
        resume = checkpoint / "resume"
        resume.mkdir()
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "lr_scheduler": lr_scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else {},
                "rng": _rng_states(),
            },
            resume / "state.pt",
        )
        (resume / "config.json").write_text(json.dumps(config.to_dict(), indent=2), encoding="utf-8")
        info = {
            **dataclasses.asdict(state),
            "world_size": world_size,
            "schedule_fingerprint": schedule_fingerprint,
            "saved_at": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        (resume / "state.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
        if final.exists():  # the same step saved again (e.g. by a resumed run): swap the old one out
            os.replace(final, staging / "replaced")
        os.replace(checkpoint, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | os.PathLike, *, optimizer: Any, lr_scheduler: Any, scaler: Any, restore_rng: bool = True
) -> tuple[TrainState, dict]:
    """Restore optimizer, LR scheduler, grad scaler (and RNG states) from a checkpoint's resume/ folder.
    The weights are the checkpoint folder itself (load it with model.load_components). Returns (state, info)
    where info holds the saved config ("config"), world_size and schedule_fingerprint."""
    torch = _require("torch")
    info = _checkpoint_info(path)
    payload = torch.load(Path(path) / "resume" / "state.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(payload["optimizer"])
    lr_scheduler.load_state_dict(payload["lr_scheduler"])
    if scaler is not None and payload["scaler"]:
        scaler.load_state_dict(payload["scaler"])
    if restore_rng:
        _set_rng_states(payload["rng"])
    names = {f.name for f in dataclasses.fields(TrainState)}
    return TrainState(**{k: v for k, v in info.items() if k in names}), info


def _checkpoint_info(path: str | os.PathLike) -> dict:
    """A checkpoint's counters (state.json) with its config under "config"."""
    resume = Path(path) / "resume"
    info = json.loads((resume / "state.json").read_text(encoding="utf-8"))
    info["config"] = json.loads((resume / "config.json").read_text(encoding="utf-8"))
    return info


def _schedule_fingerprint(schedule: EpochSchedule) -> str:
    digest = hashlib.sha256()
    for array in (schedule.image_index, schedule.batch_offsets, schedule.batch_bucket):
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()[:16]


def _check_resume(info: dict, config: TrainConfig, world_size: int, checkpoint: Path) -> None:
    saved = info["config"]
    differ = [
        f"{name}: checkpoint {saved.get(name)!r}, now {getattr(config, name)!r}"
        for name in _RESUME_MUST_MATCH
        if saved.get(name) != getattr(config, name)
    ]
    if info.get("world_size", 1) != world_size:
        differ.append(f"processes: checkpoint {info.get('world_size', 1)}, now {world_size}")
    if differ:
        raise ConfigError(
            f"cannot resume from {checkpoint}: these settings differ from the checkpoint's "
            f"({'; '.join(differ)}). "
            f"Use the checkpoint's settings, or start a new run from its weights with model: {checkpoint}"
        )


# ---------------------------------------------------------------------------------------------------------
# Sample images


@contextmanager
def _rng_kept(device: Any):
    """Run a block without disturbing any global random state (torch CPU/CUDA, numpy, python)."""
    torch = _require("torch")
    devices = [torch.device(device).index or 0] if torch.device(device).type == "cuda" else []
    numpy_state, python_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            np.random.set_state(numpy_state)
            random.setstate(python_state)


def _grid(images: list, prompts: Sequence[str], columns: int = 4) -> Any:
    """Images in rows of `columns`, each with its prompt written under it."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    tile_w, tile_h = images[0].size
    size = max(10, tile_w // 24)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: fixed-size bitmap font
        font = ImageFont.load_default()
    chars = max(8, int(tile_w / (size * 0.55)))
    captions = [textwrap.wrap(p, chars)[:3] for p in prompts]
    caption_h = (size + 2) * max(len(c) for c in captions) + 6
    columns = min(columns, len(images))
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * tile_w, rows * (tile_h + caption_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (image, lines) in enumerate(zip(images, captions, strict=True)):
        x, y = (i % columns) * tile_w, (i // columns) * (tile_h + caption_h)
        grid.paste(image.convert("RGB"), (x, y))
        for j, line in enumerate(lines):
            draw.text((x + 3, y + tile_h + 3 + j * (size + 2)), line, fill="black", font=font)
    return grid


def save_samples(
    components: SDComponents, config: TrainConfig, folder: str | os.PathLike, global_step: int, device: Any
) -> tuple[Path, ...]:
    """Generate one image per sample prompt (seed + prompt number, so every sampling is comparable) and save
    them as one PNG grid folder/step-<global_step>.png. Train/eval modes and all RNG states are restored, so
    sampling never changes the training result."""
    torch = _require("torch")
    from .model import make_pipeline

    modules = [components.unet, components.text_encoder, components.vae]
    modes = [m.training for m in modules]
    pipeline = make_pipeline(components)
    images = []
    try:
        for m in modules:
            m.eval()
        with _rng_kept(device), torch.no_grad(), _autocast(config, device):
            prompts = list(config.sample_prompts)
            for start in range(0, len(prompts), 4):
                chunk = prompts[start : start + 4]
                generators = [
                    torch.Generator("cpu").manual_seed(config.seed + start + i) for i in range(len(chunk))
                ]
                images += pipeline(
                    chunk,
                    height=config.resolution,
                    width=config.resolution,
                    num_inference_steps=config.sample_steps,
                    guidance_scale=config.sample_guidance_scale,
                    generator=generators,
                ).images
    finally:
        for m, mode in zip(modules, modes, strict=True):
            m.train(mode)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step-{global_step:08d}.png"
    tmp = folder / f".{path.name}.tmp.png"
    _grid(images, config.sample_prompts).save(tmp)
    os.replace(tmp, path)
    return (path,)


# ---------------------------------------------------------------------------------------------------------
# Processes: one, or several under `accelerate launch` / torchrun


@dataclass
class _Runtime:
    device: Any
    rank: int
    world_size: int
    accelerator: Any | None

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def wrap(self, module: Any) -> Any:
        """DistributedDataParallel over the module when several processes train (gradients sync)."""
        return self.accelerator.prepare_model(module) if self.accelerator is not None else module

    def sum(self, values: list[float]) -> list[float]:
        if self.accelerator is None:
            return values
        torch = _require("torch")
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()


def _runtime(config: TrainConfig) -> _Runtime:
    torch = _require("torch")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        accelerate = _require("accelerate")
        if config.device not in (None, "cpu", "cuda"):
            raise ConfigError(
                f"device is {config.device!r}; under accelerate launch each process picks its own GPU: "
                "use device none, cuda or cpu"
            )
        cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
        # mixed precision stays ours (train_step's autocast + GradScaler); accelerate only runs DDP.
        accelerator = accelerate.Accelerator(cpu=cpu, mixed_precision="no")
        return _Runtime(accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {config.device!r} but torch sees no CUDA GPU; use device cpu or none")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device is 'mps' but this torch has no Apple GPU support; use device cpu or none")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision is bf16 but this GPU has no bfloat16 support; use fp16")
    return _Runtime(device, 0, 1, None)


# ---------------------------------------------------------------------------------------------------------
# The loop


def _load_data(config: TrainConfig, main: bool) -> Dataset:
    """Scan the data root (logging each applied multiply.txt / loss_scale.txt and each warning on the main
    process), refuse errors, apply the config's overrides."""
    from .dataset import DatasetError

    result = scan(config.data_root)
    for line in result.log:
        log.log(logging.INFO if main else logging.DEBUG, line)
    for problem in result.warnings:
        log.log(logging.WARNING if main else logging.DEBUG, "%s", problem)
    dataset = result.raise_for_errors()
    try:
        return dataset.with_values(config.multiplier_overrides, config.loss_scale_overrides)
    except DatasetError as exc:
        raise ConfigError(f"multipliers / loss_scales: {exc}") from None


def _prepare_out(config: TrainConfig, out: Path, runtime: _Runtime) -> Path | None:
    """The checkpoint to resume from (resume), else a fresh out folder; never mixes two runs' checkpoints."""
    checkpoints = find_checkpoints(out)
    if config.resume:
        if not checkpoints:
            raise ConfigError(
                f"resume is set but {out / CHECKPOINTS_DIR} holds no complete checkpoint; "
                "start without resume (or point out at the earlier run's folder)"
            )
        return checkpoints[-1]
    if checkpoints:
        if not config.overwrite:
            raise ConfigError(
                f"{out / CHECKPOINTS_DIR} already holds checkpoints of an earlier run (newest "
                f"{checkpoints[-1].name}); set resume to continue it, overwrite to delete them and start "
                "afresh, or choose another out folder"
            )
        runtime.barrier()
        if runtime.main:
            shutil.rmtree(out / CHECKPOINTS_DIR)
            shutil.rmtree(out / SAMPLES_DIR, ignore_errors=True)
        runtime.barrier()
    return None


def prepare_modules(components: SDComponents, config: TrainConfig, device: Any) -> list:
    """Move to the device, set train/eval modes, freeze the VAE (and the text encoder unless trained), turn on
    gradient checkpointing if asked. Attention stays on diffusers' default processor, which runs torch's
    scaled_dot_product_attention (flash / memory-efficient kernels on GPUs). Returns the trainable parameters
    (UNet first, then text encoder)."""
    components.vae.requires_grad_(False).eval().to(device)
    components.unet.requires_grad_(True).train().to(device)
    if config.gradient_checkpointing:
        components.unet.enable_gradient_checkpointing()
    params = list(components.unet.parameters())
    if config.train_text_encoder:
        components.text_encoder.requires_grad_(True).train().to(device)
        if config.gradient_checkpointing:
            text_encoder = components.text_encoder
            if hasattr(text_encoder, "activation_checkpointing_enable"):  # transformers >= 5
                text_encoder.activation_checkpointing_enable({"use_reentrant": False})
            else:
                text_encoder.gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
        params += list(components.text_encoder.parameters())
    else:
        components.text_encoder.requires_grad_(False).eval().to(device)
    return params


def _steps_in_epoch(n_batches: int, world_size: int, grad_accum: int) -> int:
    per_rank = -(-n_batches // world_size)
    return -(-per_rank // grad_accum)


def train(config: TrainConfig, callback: Callable[[TrainEvent], bool | None] | None = None) -> TrainResult:
    """Train config.model on config.data_root; write checkpoints, samples and schedules under config.out.

    callback gets every TrainEvent; returning True stops cleanly after the current step with a resumable
    checkpoint. Under `accelerate launch` each process trains its shard of every epoch's batches.
    """
    torch = _require("torch")
    from tqdm.auto import tqdm

    from .data import LatentCache, ScheduleBatches, make_loader
    from .model import load_components

    started = time.monotonic()
    _quiet_bitsandbytes()
    runtime = _runtime(config)
    say = log.info if runtime.main else log.debug  # one process tells the story
    out = Path(config.out).expanduser()
    resume_from = _prepare_out(config, out, runtime)
    if resume_from is not None:
        _check_resume(_checkpoint_info(resume_from), config, runtime.world_size, resume_from)
    dataset = _load_data(config, runtime.main)
    concepts = dataset.concept_paths
    buckets = make_buckets(config.resolution)

    def epoch_schedule(epoch: int) -> EpochSchedule:
        return build_epoch(
            dataset, epoch=epoch, seed=config.seed, batch_size=config.batch_size, buckets=buckets
        )

    steps_per_epoch = [
        _steps_in_epoch(epoch_schedule(e).n_batches, runtime.world_size, config.grad_accum)
        for e in range(config.epochs)
    ]
    total_steps = sum(steps_per_epoch)

    # Model, optimizer, schedules of the learning rate and the fp16 loss scale; then the checkpoint's state.
    components = load_components(str(resume_from) if resume_from else config.model)
    params = prepare_modules(components, config, runtime.device)
    optimizer = make_optimizer(config, params)
    lr_scheduler = make_lr_scheduler(config, optimizer, total_steps)
    scaler = make_grad_scaler(config, runtime.device)
    state = TrainState()
    resume_fingerprint = None
    if resume_from is not None:
        state, info = load_checkpoint(
            resume_from, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler
        )
        resume_fingerprint = info.get("schedule_fingerprint")
        say("resuming from %s: step %d, epoch %d, batch %d", resume_from, *dataclasses.astuple(state)[:3])
    step_components = dataclasses.replace(
        components,
        unet=runtime.wrap(components.unet),
        text_encoder=runtime.wrap(components.text_encoder)
        if config.train_text_encoder
        else components.text_encoder,
    )
    latent_cache = LatentCache(config.cache_latents)
    say(
        "training %d images in %d concepts: %d optimizer steps over %d epochs on %s (%s, %s, %d process%s)",
        len(dataset),
        len(concepts),
        total_steps,
        config.epochs,
        runtime.device,
        config.optimizer,
        "fp32" if config.mixed_precision == "no" else config.mixed_precision,
        runtime.world_size,
        "es" if runtime.world_size > 1 else "",
    )

    stop_requested = False
    last_loss: float | None = None
    last_checkpoint: Path | None = resume_from
    last_checkpoint_step = state.global_step if resume_from is not None else -1
    last_checkpoint_time = time.monotonic()
    last_sample_step = -1
    start_step = state.global_step
    progress = tqdm(
        total=total_steps,
        initial=state.global_step,
        unit="step",
        disable=not (config.progress_bar and runtime.main),
        dynamic_ncols=True,
    )

    def emit(event: TrainEvent) -> None:
        nonlocal stop_requested
        if callback is not None and callback(
            dataclasses.replace(event, rank=runtime.rank, world_size=runtime.world_size)
        ):
            stop_requested = True

    def checkpoint(fingerprint: str | None) -> None:
        nonlocal last_checkpoint, last_checkpoint_step, last_checkpoint_time
        if state.global_step == last_checkpoint_step:
            return
        runtime.barrier()
        path = out / CHECKPOINTS_DIR / f"step-{state.global_step:08d}"
        if runtime.main:
            path = save_checkpoint(
                out / CHECKPOINTS_DIR,
                components,
                optimizer=optimizer,
                lr_scheduler=lr_scheduler,
                scaler=scaler,
                state=state,
                config=config,
                world_size=runtime.world_size,
                schedule_fingerprint=fingerprint,
            )
            log.info("checkpoint saved: %s", path)
            if config.keep_checkpoints:
                for old in find_checkpoints(out)[: -config.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
        runtime.barrier()
        last_checkpoint, last_checkpoint_step, last_checkpoint_time = (
            path,
            state.global_step,
            time.monotonic(),
        )
        if runtime.main:
            emit(TrainEvent("checkpoint", state.global_step, state.epoch, path=str(path)))

    def sample() -> None:
        nonlocal last_sample_step
        if not config.sample_prompts or state.global_step == last_sample_step:
            return
        runtime.barrier()
        if runtime.main:
            paths = save_samples(components, config, out / SAMPLES_DIR, state.global_step, runtime.device)
            log.info("samples saved: %s", ", ".join(map(str, paths)))
            emit(TrainEvent("sample", state.global_step, state.epoch, paths=tuple(map(str, paths))))
        runtime.barrier()
        last_sample_step = state.global_step

    def should_stop(fingerprint: str | None) -> str | None:
        """After an optimizer step (or an epoch): samples and timed checkpoints when due. Returns why to
        stop (callback or max_steps; then a checkpoint is saved), else None. All ranks decide alike."""
        every = config.sample_every_steps
        if every and state.global_step % every == 0 and state.global_step != start_step:
            sample()
        minutes = config.checkpoint_every_minutes
        timed = bool(minutes) and runtime.main and time.monotonic() - last_checkpoint_time >= minutes * 60
        at_max = config.max_steps is not None and state.global_step >= config.max_steps
        timed, requested, at_max = (v > 0 for v in runtime.sum([timed, stop_requested, at_max]))
        if timed or requested or at_max:
            checkpoint(fingerprint)
        return "callback" if requested else "max_steps" if at_max else None

    stop_reason = "finished"
    if config.max_steps is not None and state.global_step >= config.max_steps:
        stop_reason = "max_steps"
    epoch = state.epoch
    while stop_reason == "finished" and epoch < config.epochs:
        full = epoch_schedule(epoch)
        fingerprint = _schedule_fingerprint(full)
        if config.write_schedule and runtime.main:
            write_schedule(full, dataset, out / SCHEDULES_DIR)
        local = shard(full, runtime.rank, runtime.world_size) if runtime.world_size > 1 else full
        start = state.batch if epoch == state.epoch else 0
        if start and resume_fingerprint not in (None, fingerprint):
            raise ConfigError(
                f"cannot resume mid-epoch from {resume_from}: epoch {epoch}'s schedule differs from the one "
                "trained (the data root, multipliers or loss_scales changed). Restore them, or resume from a "
                "checkpoint saved at an epoch's end"
            )
        batches = ScheduleBatches(
            dataset,
            local,
            components.tokenizer,
            center_crop=config.center_crop,
            flip_p=config.flip_p,
            seed=config.seed,
        )
        loader = make_loader(
            batches,
            num_workers=config.num_workers,
            start_batch=start,
            pin_memory=torch.device(runtime.device).type == "cuda",
        )
        # Per accumulation group: MSE sums and image counts per concept, the images, a non-finite flag.
        sums, counts, images, nonfinite = np.zeros(len(concepts)), np.zeros(len(concepts)), [], False
        for batch in loader:
            b = int(batch["batch"])
            sync = (b + 1) % config.grad_accum == 0 or b + 1 == local.n_batches
            result = train_step(
                step_components,
                optimizer,
                batch,
                config=config,
                lr_scheduler=lr_scheduler,
                scaler=scaler,
                latent_cache=latent_cache,
                generator=step_generator(config.seed, epoch, runtime.rank, b),
                sync=sync,
                nonfinite_before=nonfinite,
            )
            nonfinite = nonfinite or result.nonfinite
            if batch["batch_weight"] > 0:  # a filler batch (shard padding) trains nothing: not counted
                concept = batch["concept"].numpy()
                np.add.at(sums, concept, result.per_sample.numpy().astype(np.float64))
                np.add.at(counts, concept, 1)
                images += batch["image_index"].tolist()
            if not sync:
                continue
            state = TrainState(state.global_step + 1, epoch, b + 1, state.skipped_steps + int(result.skipped))
            totals = runtime.sum([*sums, *counts])
            sums_all, counts_all = np.array(totals[: len(concepts)]), np.array(totals[len(concepts) :])
            loss = float(sums_all.sum() / counts_all.sum()) if counts_all.sum() else float("nan")
            last_loss = loss
            progress.update(1)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{result.lr:.2e}", refresh=False)
            emit(
                TrainEvent(
                    "step",
                    state.global_step,
                    epoch,
                    batch=b,
                    loss=loss,
                    loss_per_concept={
                        concepts[i]: float(sums_all[i] / counts_all[i]) for i in np.flatnonzero(counts_all)
                    },
                    lr=result.lr,
                    skipped=result.skipped,
                    images=tuple(images),
                )
            )
            sums, counts, images, nonfinite = np.zeros(len(concepts)), np.zeros(len(concepts)), [], False
            if b + 1 < local.n_batches:  # after an epoch's last step this runs once the epoch is done
                stop_reason = should_stop(fingerprint) or stop_reason
                if stop_reason != "finished":
                    break
        if stop_reason != "finished":
            break
        epoch += 1
        state = TrainState(state.global_step, epoch, 0, state.skipped_steps)
        trained = full.images_per_concept(dataset)
        expected = expected_images_per_epoch(dataset)
        emit(
            TrainEvent(
                "epoch",
                state.global_step,
                epoch - 1,
                images_per_concept={c: int(n) for c, n in zip(concepts, trained, strict=True)},
                expected={c: float(e) for c, e in zip(concepts, expected, strict=True)},
            )
        )
        if config.checkpoint_every_epochs and epoch % config.checkpoint_every_epochs == 0:
            checkpoint(None)
        stop_reason = should_stop(None) or stop_reason
    progress.close()

    checkpoint(None if state.batch == 0 else _schedule_fingerprint(epoch_schedule(state.epoch)))
    if stop_reason != "callback" and state.global_step > start_step:
        sample()
    if runtime.main and state.epoch > 0:
        _plot_actual_balance(dataset, [epoch_schedule(e) for e in range(state.epoch)], out)
    result = TrainResult(
        out=str(out),
        global_step=state.global_step,
        epoch=state.epoch,
        batch=state.batch,
        stop_reason=stop_reason,
        checkpoint=str(last_checkpoint) if last_checkpoint is not None else None,
        skipped_steps=state.skipped_steps,
        last_loss=last_loss,
        seconds=time.monotonic() - started,
    )
    say("%s", result)
    emit(TrainEvent("end", state.global_step, state.epoch, result=result))
    return result


def _plot_actual_balance(dataset: Dataset, schedules: list[EpochSchedule], out: Path) -> None:
    """out/balance_actual.png: expected images per concept beside those each trained epoch really held."""
    from .report import plot_balance

    actual = np.stack([s.images_per_concept(dataset) for s in schedules])
    plot_balance(
        dataset,
        actual,
        out=out / "balance_actual.png",
        title=f"Images per concept: expected vs trained, {len(schedules)} epoch(s)",
    )
