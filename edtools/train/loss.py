"""The training loss as pure tensor maths: targets, per-sample MSE, Min-SNR weights, loss_scale weighting.

batch_loss is where loss_scale.txt acts: each image's MSE is multiplied by its concept's loss_scale.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..models.objective import check_prediction_type, prediction_target

if TYPE_CHECKING:
    import torch

__all__ = ["batch_loss", "compute_snr", "min_snr_weights", "per_sample_mse", "prediction_target"]


def compute_snr(noise_scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at each timestep. float32 [B]."""
    alpha_bar = noise_scheduler.alphas_cumprod.to(timesteps.device)[timesteps.long()].float()
    return alpha_bar / (1.0 - alpha_bar)


def min_snr_weights(snr: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(snr, gamma) / snr for epsilon, min(snr, gamma) /
    (snr + 1) for v_prediction. At snr = 0 (zero-terminal-SNR schedules) epsilon's weight is its limit, 1."""
    import torch

    if (
        isinstance(gamma, bool)
        or not isinstance(gamma, int | float)
        or not math.isfinite(gamma)
        or gamma <= 0
    ):
        raise ValueError(f"min_snr_gamma is {gamma!r}; it must be a finite number > 0 (5 is the usual value)")
    check_prediction_type(prediction_type)
    snr = snr.float()
    clipped = torch.clamp(snr, max=float(gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1.0)
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))


def per_sample_mse(model_pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each sample over all its other dimensions, in float32. [B]"""
    if model_pred.shape != target.shape:
        raise ValueError(
            f"model prediction has shape {tuple(model_pred.shape)} but the target has {tuple(target.shape)}"
        )
    squared = (model_pred.float() - target.float()) ** 2
    return squared.reshape(squared.shape[0], -1).mean(dim=1)


def batch_loss(
    per_sample: torch.Tensor,
    loss_scale: torch.Tensor,
    *,
    nominal_batch_size: int,
    batch_weight: float = 1.0,
    snr_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """sum(per_sample * loss_scale [* snr_weights]) * batch_weight / nominal_batch_size.

    Dividing by the nominal (configured) batch size instead of this batch's length makes every image weigh
    the same, also in a bucket's short last batch. The loss is linear in loss_scale, so the gradient is too:
    0 removes an image's contribution, 2 doubles it. batch_weight 0 is a filler batch (trains nothing).
    """
    if nominal_batch_size < 1:
        raise ValueError(f"nominal_batch_size must be >= 1, got {nominal_batch_size}")
    if not math.isfinite(batch_weight) or batch_weight < 0:
        raise ValueError(f"batch_weight must be a finite number >= 0, got {batch_weight}")
    if per_sample.ndim != 1:
        raise ValueError(f"per_sample must be one loss per image [B], got shape {tuple(per_sample.shape)}")
    n = per_sample.shape[0]
    if n > nominal_batch_size:
        raise ValueError(f"batch holds {n} images, more than nominal_batch_size {nominal_batch_size}")
    weights = loss_scale.to(device=per_sample.device, dtype=per_sample.dtype)
    if weights.shape != (n,):
        raise ValueError(f"loss_scale must have one value per image ({n}), got shape {tuple(weights.shape)}")
    if snr_weights is not None:
        if snr_weights.shape != (n,):
            raise ValueError(
                f"snr_weights must have one value per image ({n}), got {tuple(snr_weights.shape)}"
            )
        weights = weights * snr_weights.to(device=per_sample.device, dtype=per_sample.dtype)
    return (per_sample * weights).sum() * (float(batch_weight) / nominal_batch_size)
