"""TensorBoard logging of a run's events under out/logs/: loss, loss per concept, learning rate, images per
second, validation loss, memorisation gap and concept bleed margins per concept. Open it with `tensorboard --logdir OUT/logs`.
"""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import require
from .events import TrainEvent

__all__ = ["LOGS_DIR", "TensorBoardLog"]

LOGS_DIR = "logs"


class TensorBoardLog:
    """A TrainEvent consumer: each event kind becomes scalars at its optimizer step."""

    def __init__(self, folder: str | Path) -> None:
        tensorboard = require("torch.utils.tensorboard", feature="log_with tensorboard")
        self.writer = tensorboard.SummaryWriter(log_dir=str(folder))
        self._last: tuple[float, int] | None = None  # (time, step) of the previous step event

    def __call__(self, event: TrainEvent) -> None:
        step = event.global_step
        if event.kind == "step":
            if event.loss is not None:
                self.writer.add_scalar("loss", event.loss, step)
            for concept, loss in event.loss_per_concept.items():
                self.writer.add_scalar(f"loss_per_concept/{concept}", loss, step)
            if event.lr is not None:
                self.writer.add_scalar("lr", event.lr, step)
            now = time.monotonic()
            if self._last is not None and now > self._last[0]:
                self.writer.add_scalar("images_per_second", len(event.images) / (now - self._last[0]), step)
            self._last = (now, step)
        elif event.kind == "validation":
            for concept, loss in event.loss_per_concept.items():
                self.writer.add_scalar(f"validation/{concept}", loss, step)
            for concept, loss in event.train_loss_per_concept.items():
                self.writer.add_scalar(f"validation_train_images/{concept}", loss, step)
            for concept, gap in event.gap_per_concept.items():
                self.writer.add_scalar(f"gap/{concept}", gap, step)
            for (concept, under), margin in event.bleed.items():
                self.writer.add_scalar(f"bleed/{concept}/under/{under}", margin, step)
        elif event.kind == "epoch":
            for concept, n in event.images_per_concept.items():
                self.writer.add_scalar(f"images_per_epoch/{concept}", n, step)
        elif event.kind == "end":
            self.close()

    def close(self) -> None:
        self.writer.flush()
        self.writer.close()
