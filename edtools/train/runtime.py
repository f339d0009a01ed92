"""Processes: one, or several under `accelerate launch` / torchrun, each training its shard of every epoch.

Runtime hides the difference: barrier, sums over ranks and the DDP wrapper are no-ops for one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config import ConfigError, TrainConfig
from ..errors import require

__all__ = ["Runtime", "make_runtime"]


@dataclass
class Runtime:
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
        torch = require("torch")
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()


def make_runtime(config: TrainConfig) -> Runtime:
    torch = require("torch")
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size > 1:
        accelerate = require("accelerate")
        if config.device not in (None, "cpu", "cuda"):
            raise ConfigError(
                f"device is {config.device!r}; under accelerate launch each process picks its own GPU: "
                "use device none, cuda or cpu"
            )
        cpu = config.device == "cpu" or (config.device is None and not torch.cuda.is_available())
        # mixed precision stays ours (train_step's autocast + GradScaler); accelerate only runs DDP.
        accelerator = accelerate.Accelerator(cpu=cpu, mixed_precision="no")
        return Runtime(accelerator.device, accelerator.process_index, accelerator.num_processes, accelerator)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device is {config.device!r} but torch sees no CUDA GPU; use device cpu or none")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device is 'mps' but this torch has no Apple GPU support; use device cpu or none")
    if config.mixed_precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError("mixed_precision is bf16 but this GPU has no bfloat16 support; use fp16")
    return Runtime(device, 0, 1, None)
