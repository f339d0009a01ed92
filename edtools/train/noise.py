"""The training noise and the noise schedule: offset noise, pyramid (multi-resolution) noise, and the
zero-terminal-SNR rescaling of the betas, as pure tensor maths drawn from a given generator.

Offset noise lets a model learn very dark and very bright images; zero terminal SNR makes the last timestep pure
noise, which needs v-prediction (an epsilon model has nothing to predict there).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

__all__ = ["noise_scheduler_for", "training_noise"]


def training_noise(
    shape: tuple[int, ...],
    generator: torch.Generator,
    *,
    offset: float = 0.0,
    pyramid_discount: float = 0.0,
    pyramid_levels: int = 6,
) -> torch.Tensor:
    """Gaussian noise [n, c, h, w] (float32, CPU) from `generator`, plus
    - offset noise: offset x one random value per image and channel, shifting its mean;
    - pyramid noise: noise at 1/2, 1/4, ... of the size, scaled by discount^level, upsampled and added, then
      the sum rescaled to unit variance (low frequencies get noise the model otherwise rarely sees).
    With both 0 this is exactly torch.randn(shape, generator=generator)."""
    import torch
    import torch.nn.functional as F

    noise = torch.randn(shape, generator=generator, dtype=torch.float32)
    n, c, h, w = shape
    if pyramid_discount > 0:
        for level in range(1, pyramid_levels + 1):
            size = (max(1, h >> level), max(1, w >> level))
            coarse = torch.randn((n, c, *size), generator=generator, dtype=torch.float32)
            noise = noise + F.interpolate(coarse, size=(h, w), mode="bilinear") * pyramid_discount**level
            if size == (1, 1):
                break
        noise = noise / noise.std(dim=(1, 2, 3), keepdim=True)
    if offset > 0:
        noise = noise + offset * torch.randn((n, c, 1, 1), generator=generator, dtype=torch.float32)
    return noise


def noise_scheduler_for(noise_scheduler: Any, *, prediction_type: str | None, zero_terminal_snr: bool) -> Any:
    """The model's DDPM noise scheduler with the training's prediction type and, when asked, its betas rescaled
    to zero terminal SNR (diffusers' rescale_betas_zero_snr); the config records both, so saved models and
    their samplers know what was trained. Trailing timestep spacing goes with zero terminal SNR (its paper)."""
    from ..errors import require

    diffusers = require("diffusers")
    changes: dict[str, Any] = {}
    if prediction_type is not None and prediction_type != noise_scheduler.config.prediction_type:
        changes["prediction_type"] = prediction_type
    if zero_terminal_snr and not noise_scheduler.config.get("rescale_betas_zero_snr", False):
        changes.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if not changes:
        return noise_scheduler
    return diffusers.DDPMScheduler.from_config({**noise_scheduler.config, **changes})
