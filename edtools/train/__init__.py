"""Training: train(config, callback) runs the loop; train_step trains one batch; checkpoints resume exactly.

`loop` the epochs; `step` one batch, with `loss` (the loss maths) and `noise` (training noise, schedules);
`validate` loss, gap and bleed per concept (`bleed`, `metric_plots`); `rebalance` each epoch's values (files,
sliders, auto-balance); `records` the CSV histories; `checkpoint` saving and resuming; `sample` the sample
grids; `runtime` one or several processes; `setup`, `plan`, `outdir`, `host_memory`, `tensorboard`, `events`.
"""

from .checkpoint import TrainState, find_checkpoints, load_checkpoint, save_checkpoint
from .loop import TrainEvent, TrainResult, train
from .sample import save_samples
from .step import (
    StepResult,
    make_grad_scaler,
    make_lr_scheduler,
    make_optimizer,
    prepare_modules,
    step_generator,
    train_step,
)

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
