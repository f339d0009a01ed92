"""A run between its steps: the Run that holds its state, and what happens to it besides training: events to
the callback and TensorBoard, checkpoints (a full drive said in words), validation, samples, interrupts, and
an out folder or data root that went away.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..balance.schedule import EpochSchedule, build_epoch
from ..config import TrainConfig
from ..dataset.scan import Dataset
from ..errors import EdtoolsError
from .checkpoint import (
    CHECKPOINTS_DIR,
    TrainState,
    checkpoint_bytes,
    find_checkpoints,
    remove_checkpoint,
    save_checkpoint,
)
from .ema import ema_weights
from .events import TrainEvent
from .outdir import OutFolderGone
from .rebalance import BalanceSource, saved_values
from .records import append_bleed, append_validation
from .runtime import Runtime
from .sample import SAMPLES_DIR, save_samples

__all__ = [
    "Run",
    "Signals",
    "checkpoint_now",
    "data_root_gone",
    "emit",
    "guard_out",
    "interrupts",
    "sample_now",
    "validate_now",
]

log = logging.getLogger("edtools.train")


class Signals:
    """The signal that asked the run to stop (SIGINT / SIGTERM), or None."""

    interrupted: str | None = None


@dataclass
class Run:
    """One train() call: what it was given, what it built, and where it stands."""

    config: TrainConfig
    callback: Callable[[TrainEvent], bool | None] | None
    balance: BalanceSource | None
    runtime: Runtime
    out: Path
    dataset: Dataset  # the training images, with the multipliers and loss scales of the epoch in progress
    buckets: Any
    validator: Any  # a Validator of the held-out images, or None
    components: Any  # SDComponents: the modules checkpoints and samples use
    step_components: Any  # the same, with DDP-wrapped trainable modules under several processes
    optimizer: Any
    lr_scheduler: Any
    scaler: Any
    latent_cache: Any
    params: list  # the trained parameters (those the optimizer steps)
    ema: Any  # diffusers' EMAModel of them, or None
    tensorboard: Any  # a TensorBoardLog on the main process, or None
    text_cache: Any  # a filled TextEmbeddingCache (frozen text encoders), or None
    progress: Any
    state: TrainState
    resume_from: Path | None
    resume_fingerprint: str | None
    started: float
    start_step: int
    lock: Any = None  # the out folder's OutLock (held by the main process)
    stop_requested: bool = False
    signals: Signals = field(default_factory=Signals)  # a signal that asked the run to stop

    @property
    def interrupted(self) -> str | None:
        return self.signals.interrupted

    last_loss: float | None = None
    last_checkpoint: Path | None = None
    last_checkpoint_step: int = -1
    last_checkpoint_time: float = field(default_factory=time.monotonic)
    last_sample_step: int = -1
    last_validation_step: int = -1
    planned_steps: int = 0  # optimizer steps the LR schedule spans
    epoch_loss: dict[str, list[float]] = field(
        default_factory=dict
    )  # concept -> [MSE sum, images] this epoch
    user_multipliers: dict[str, float] = field(default_factory=dict)  # the user's, this epoch (auto-balance)
    balance_reasons: dict[str, str] = field(default_factory=dict)  # this epoch's automatic changes: why

    def schedule(self, epoch: int) -> EpochSchedule:
        c = self.config
        return build_epoch(
            self.dataset, epoch=epoch, seed=c.seed, batch_size=c.batch_size, buckets=self.buckets
        )

    def say(self, message: str, *args: Any) -> None:
        """Log on the main process only: one process tells the story."""
        log.log(logging.INFO if self.runtime.main else logging.DEBUG, message, *args)


@contextmanager
def interrupts() -> Iterator[Signals]:
    """Ctrl-C (SIGINT) and SIGTERM ask the run to stop after the current step with a checkpoint (also while it
    is still setting up); a second Ctrl-C aborts at once. Only the main thread can take signals (a notebook's
    run has its Stop button)."""
    received = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield received
        return
    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.getsignal(sig) for sig in signals}

    def handler(signum: int, frame: Any) -> None:
        if received.interrupted is not None:
            for sig, action in previous.items():
                signal.signal(sig, action)
            raise KeyboardInterrupt
        received.interrupted = signal.Signals(signum).name
        log.warning(
            "%s: stopping after this step and saving a checkpoint (Ctrl-C again aborts at once, saving nothing)",
            received.interrupted,
        )

    for sig in signals:
        signal.signal(sig, handler)
    try:
        yield received
    finally:
        for sig, action in previous.items():
            signal.signal(sig, action)


def emit(run: Run, event: TrainEvent) -> None:
    """Send an event to TensorBoard and the callback; a True answer asks the run to stop after the current step."""
    if run.tensorboard is not None:
        run.tensorboard(event)
    if run.callback is not None and run.callback(
        dataclasses.replace(event, rank=run.runtime.rank, world_size=run.runtime.world_size)
    ):
        run.stop_requested = True


def checkpoint_now(run: Run, fingerprint: str | None) -> None:
    """Save a checkpoint of the current step (once per step), prune old ones, announce it."""
    state, runtime = run.state, run.runtime
    if state.global_step == run.last_checkpoint_step:
        return
    runtime.barrier()
    folder = run.out / CHECKPOINTS_DIR
    path = folder / f"step-{state.global_step:08d}"
    if runtime.main:
        guard_out(run)
        path = _save_or_say_why(run, folder, fingerprint)
        log.info("checkpoint saved: %s", path)
        if run.config.keep_checkpoints:
            for old in find_checkpoints(run.out)[: -run.config.keep_checkpoints]:
                remove_checkpoint(old)
    runtime.barrier()
    run.last_checkpoint, run.last_checkpoint_step, run.last_checkpoint_time = (
        path,
        state.global_step,
        time.monotonic(),
    )
    if runtime.main:
        emit(run, TrainEvent("checkpoint", state.global_step, state.epoch, path=str(path)))


def _save_or_say_why(run: Run, folder: Path, fingerprint: str | None) -> Path:
    """save_checkpoint, with a full drive said in words: the folder, about how much a checkpoint needs and how
    much is free. The previous complete checkpoint is untouched (saves are atomic)."""
    state = run.state
    try:
        return save_checkpoint(
            folder,
            run.components,
            optimizer=run.optimizer,
            lr_scheduler=run.lr_scheduler,
            scaler=run.scaler,
            state=state,
            config=run.config,
            world_size=run.runtime.world_size,
            schedule_fingerprint=fingerprint,
            metadata=file_metadata(run),
            extra={
                "epoch_values": saved_values(run.dataset, run.user_multipliers, run.balance_reasons),
                "epoch_loss": run.epoch_loss,
            }
            if state.batch
            else None,
            ema=run.ema,
            params=run.params,
        )
    except Exception as exc:
        guard_out(run)  # the folder went away while saving: say that, not the error it caused
        if not _drive_full(exc):
            raise
        previous = find_checkpoints(run.out)
        need = (
            checkpoint_bytes(previous[-1])
            if previous
            else sum(p.numel() * 4 for p in run.components.unet.parameters())
        )
        free = shutil.disk_usage(folder if folder.exists() else run.out).free
        last = (
            f"the last complete checkpoint {previous[-1]} is untouched"
            if previous
            else "no checkpoint was saved"
        )
        raise EdtoolsError(
            f"no space left on the drive of {folder}: a checkpoint needs about {need / 2**30:.1f} GB and "
            f"{free / 2**30:.1f} GB are free; {last}. Free space (keep_checkpoints N keeps only the newest N), "
            "or set out to a folder on a larger drive, then resume"
        ) from None


def _drive_full(exc: BaseException | None) -> bool:
    """Whether an error (or one it came from) is a full drive, a quota or a file-size limit. Libraries that
    write in Rust or C++ (safetensors, torch) report it as their own error type with the OS message inside."""
    seen = 0
    while exc is not None and seen < 10:
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            return True
        text = str(exc)
        if "No space left on device" in text or "os error 28" in text or "File too large" in text:
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False


def file_metadata(run: Run) -> dict[str, str]:
    """What a saved model file says about its training (safetensors header text): base model, progress,
    settings and the concept table with its multipliers and loss scales."""
    from .. import __version__

    config, state = run.config, run.state
    concepts = [
        {"concept": c.path, "images": c.n_images, "multiply": c.multiplier, "loss_scale": c.loss_scale}
        for c in run.dataset.concepts
    ]
    return {
        "edtools.version": __version__,
        "edtools.base_model": config.model,
        "edtools.global_step": str(state.global_step),
        "edtools.epoch": str(state.epoch),
        "edtools.resolution": str(config.resolution),
        "edtools.lora_rank": str(config.lora_rank),
        "edtools.concepts": json.dumps(concepts),
    }


def validate_now(run: Run) -> None:
    """Validation loss per concept on the held-out images, the gap to the training sample and the concept
    bleed (once per step), recorded and reported."""
    state, runtime = run.state, run.runtime
    if run.validator is None or state.global_step == run.last_validation_step:
        return
    runtime.barrier()
    if runtime.main:
        trained_text = any(p.requires_grad for e in run.components.text_encoders for p in e.parameters())
        measures = run.validator.measure(
            run.components, runtime.device, text_frozen=not trained_text, text_cache=run.text_cache
        )
        guard_out(run)
        append_validation(
            run.out, state.global_step, state.epoch, measures.results(), measures.train_loss, measures.gap
        )
        append_bleed(run.out, state.global_step, state.epoch, measures.bleed)
        run.say(
            "validation at step %d: %s",
            state.global_step,
            ", ".join(
                f"{c} {loss:.4f}" + (f" (gap {measures.gap[c]:+.4f})" if c in measures.gap else "")
                for c, loss in measures.loss.items()
            ),
        )
        emit(
            run,
            TrainEvent(
                "validation",
                state.global_step,
                state.epoch,
                loss_per_concept=dict(measures.loss),
                images_per_concept=dict(measures.images),
                train_loss_per_concept=dict(measures.train_loss),
                gap_per_concept=dict(measures.gap),
                bleed=dict(measures.bleed),
            ),
        )
    runtime.barrier()
    run.last_validation_step = state.global_step


def sample_now(run: Run) -> None:
    """Save a sample grid of the current step (once per step) on the main process."""
    state, runtime = run.state, run.runtime
    if not run.config.sample_prompts or state.global_step == run.last_sample_step:
        return
    runtime.barrier()
    if runtime.main:
        guard_out(run)
        with ema_weights(run.ema, run.params):  # samples show the averaged weights when there are any
            paths = save_samples(
                run.components,
                run.config,
                run.out / SAMPLES_DIR,
                state.global_step,
                runtime.device,
                run.text_cache,
            )
        log.info("samples saved: %s", ", ".join(map(str, paths)))
        emit(run, TrainEvent("sample", state.global_step, state.epoch, paths=tuple(map(str, paths))))
    runtime.barrier()
    run.last_sample_step = state.global_step


# ---------------------------------------------------------------------------------------------------------
# Data and output folder


def guard_out(run: Run) -> None:
    """Stop the run when its out folder went away (a Drive unmounted mid-run) or was replaced. It is never
    recreated: its checkpoints would be gone and the new ones written to the local disk that a disconnect wipes.
    Nor is a checkpoint written elsewhere: nothing here is known to outlast the session. So the run stops with
    the last checkpoint saved there, to resume from once the drive is back. Checked on the main process (it
    holds the lock) before each write and after each step; cheap (two stat calls)."""
    problem = run.lock.problem() if run.runtime.main and run.lock is not None else None
    if problem is None:
        return
    state, checkpoint = run.state, run.last_checkpoint
    where = f"step {state.global_step} (epoch {state.epoch}{f', batch {state.batch}' if state.batch else ''})"
    if checkpoint is None:
        after = "No checkpoint had been saved yet: once the drive is back, start the run again"
    else:
        after = (
            f"The last checkpoint saved is {checkpoint} (step {run.last_checkpoint_step}), in that folder: once "
            "the drive is back (mounted again at the same path), resume from it (edtools train ... --resume; in "
            "the notebook, resume)"
        )
    raise OutFolderGone(
        f"the out folder {run.out} {problem}. The run stopped at {where}, writing nothing more there and not "
        f"recreating it (after an unmount that path is the local disk, which a disconnect wipes). {after}",
        checkpoint,
    )


def data_root_gone(run: Run, batch: dict) -> bool:
    """Whether the data root itself went away (a Drive unmounted mid-run): it no longer exists or is empty.
    Then every image would be skipped, epoch after epoch of empty steps; instead the run stops with a
    checkpoint, to resume once the data is back (the schedule is the same, so it resumes exactly). Images that
    vanish one by one are only skipped and listed. Looked at only when a batch lost an image; under several
    processes every rank sums its answer on every batch, so all stop at the same batch."""
    gone = bool(batch["skipped_images"]) and not _has_entries(Path(run.dataset.root))
    if run.runtime.world_size > 1:
        gone = run.runtime.sum([float(gone)])[0] > 0
    if gone and run.runtime.main:
        log.error(
            "the data root %s disappeared during the run (a Drive that was unmounted?): stopping at step %d "
            "with a checkpoint; once the data root is back, resume (edtools train ... --resume)",
            run.dataset.root,
            run.state.global_step,
        )
    return gone


def _has_entries(folder: Path) -> bool:
    try:
        with os.scandir(folder) as entries:
            return next(entries, None) is not None
    except OSError:  # gone, or a mount that no longer answers
        return False
