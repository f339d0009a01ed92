"""What train() reports: a TrainEvent to the callback as things happen, a TrainResult at the end.

Plain frozen dataclasses: the notebook, the CLI and tests read the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

__all__ = ["TrainEvent", "TrainResult"]


@dataclass(frozen=True)
class TrainResult:
    """How a train() call ended. stop_reason: finished, max_steps, callback (the callback or the notebook's Stop),
    interrupted (Ctrl-C / SIGTERM) or data_root_gone (its folder went away mid-run: resume once it is back); all
    but finished leave a resumable checkpoint."""

    out: str
    global_step: int
    epoch: int  # epochs fully trained
    batch: int  # batches of the next epoch already trained (on each rank)
    stop_reason: Literal["finished", "max_steps", "callback", "interrupted", "data_root_gone"]
    checkpoint: str | None
    skipped_steps: int
    last_loss: float | None
    seconds: float

    def __str__(self) -> str:
        where = f"epoch {self.epoch}" + (f" + {self.batch} batches" if self.batch else "")
        how = {
            "finished": "finished",
            "max_steps": "stopped at max_steps",
            "callback": "stopped on request",
            "interrupted": "interrupted",
            "data_root_gone": "stopped: the data root went away",
        }
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
          images (image numbers this rank trained in the step), total_steps (the run's planned steps);
    epoch: epoch, images_per_concept (trained this epoch), expected (n_images x multiplier), multipliers and
           loss_scales (what the epoch trained with);
    validation: global_step, epoch (epochs done), loss_per_concept (held-out loss), images_per_concept (held out),
                train_loss_per_concept (the same loss on a fixed sample of training images), gap_per_concept
                (held-out - training), bleed ({(concept, under): margin}, see train.bleed);
    sample: global_step, paths (PNG grids); checkpoint: global_step, path; end: result.
    Under accelerate launch every process calls its callback; sample and checkpoint come from the main one."""

    kind: Literal["step", "epoch", "validation", "sample", "checkpoint", "end"]
    global_step: int
    epoch: int
    batch: int | None = None
    loss: float | None = None
    loss_per_concept: dict[str, float] = field(default_factory=dict)
    lr: float | None = None
    skipped: bool = False
    images: tuple[int, ...] = ()
    total_steps: int | None = None
    images_per_concept: dict[str, int] = field(default_factory=dict)
    train_loss_per_concept: dict[str, float] = field(default_factory=dict)
    gap_per_concept: dict[str, float] = field(default_factory=dict)
    bleed: dict[tuple[str, str], float] = field(default_factory=dict)
    expected: dict[str, float] = field(default_factory=dict)
    multipliers: dict[str, float] = field(default_factory=dict)
    loss_scales: dict[str, float] = field(default_factory=dict)
    paths: tuple[str, ...] = ()
    path: str | None = None
    result: TrainResult | None = None
    rank: int = 0
    world_size: int = 1
