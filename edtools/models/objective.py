"""The noise objective: what the denoiser learns to output for a noisy latent, from the scheduler's prediction
type (the noise for epsilon models, the velocity for v_prediction models). Pure tensor maths.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

__all__ = ["PREDICTION_TYPES", "check_prediction_type", "prediction_target"]

PREDICTION_TYPES = ("epsilon", "v_prediction")


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(
            f"prediction_type is '{prediction_type}'; edtools trains {' or '.join(PREDICTION_TYPES)} models "
            "(set by the model's scheduler/scheduler_config.json)"
        )


def prediction_target(
    noise_scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """What the UNet should output: the noise (epsilon models) or the velocity (v_prediction models)."""
    prediction_type = noise_scheduler.config.prediction_type
    check_prediction_type(prediction_type)
    if prediction_type == "epsilon":
        return noise
    return noise_scheduler.get_velocity(latents, noise, timesteps)
