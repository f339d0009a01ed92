"""An exponential moving average of the trained weights (diffusers' EMAModel): stepped after each optimizer
step, kept in checkpoints for exact resume, swapped in for samples and for the checkpoint's EMA copy.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from ..config import TrainConfig
from ..errors import require

__all__ = ["ema_step", "ema_weights", "make_ema"]


def make_ema(config: TrainConfig, params: Sequence[Any]) -> Any:
    """diffusers' EMAModel over the trained parameters (None without ema_decay); on the CPU with ema_on_cpu."""
    if config.ema_decay is None:
        return None
    training_utils = require("diffusers.training_utils")
    ema = training_utils.EMAModel(list(params), decay=config.ema_decay)
    if config.ema_on_cpu:
        ema.to("cpu")
    return ema


def ema_step(ema: Any, params: Sequence[Any], config: TrainConfig, device: Any) -> None:
    """One EMA update after an optimizer step (the average visits the GPU for it when it lives on the CPU)."""
    if ema is None:
        return
    if config.ema_on_cpu:
        ema.to(device)
    ema.step(params)
    if config.ema_on_cpu:
        ema.to("cpu")


@contextmanager
def ema_weights(ema: Any, params: Sequence[Any]) -> Iterator[None]:
    """The EMA weights in the model for the block, the trained ones back after it (nothing without EMA)."""
    if ema is None:
        yield
        return
    torch = require("torch")
    ema.store(params)
    with torch.no_grad():
        ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)
