"""The flow-matching objective that SD3 and Flux train with: noise levels drawn from a density over shifted sigmas,
the velocity noise - latents as the target, diffusers' training utilities for the density and the weighting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...errors import require
from .base import Family, FlowSettings

if TYPE_CHECKING:
    import torch

__all__ = ["FlowMatchingFamily", "flow_sigmas"]

_DEFAULT_FLOW = FlowSettings()


def flow_sigmas(config: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) of a FlowMatchEulerDiscreteScheduler config at its num_train_timesteps positions,
    computed from the config alone as the scheduler's own __init__ does: position i has t = (N - i) / N,
    sigma = shift * t / (1 + (shift - 1) * t) (no shift with use_dynamic_shifting), timestep = sigma * N
    (position 0 is pure noise)."""
    torch = require("torch")
    steps = int(config["num_train_timesteps"])
    # a scheduler that shifts by image size when sampling (Flux's use_dynamic_shifting) trains unshifted, as its
    # __init__ leaves its sigmas and diffusers' Flux training scripts draw them
    shift = 1.0 if config.get("use_dynamic_shifting", False) else float(config.get("shift", 1.0))
    t = torch.linspace(1, steps, steps, dtype=torch.float32).flip(0) / steps
    sigmas = shift * t / (1 + (shift - 1) * t)
    return sigmas, sigmas * steps


def _density(flow: FlowSettings, count: int, generator: torch.Generator) -> torch.Tensor:
    """diffusers' compute_density_for_timestep_sampling drawing from `generator`; older diffusers (0.30) take
    no generator, and then its formulas are used here as they are there."""
    import inspect

    torch = require("torch")
    training_utils = require("diffusers.training_utils")
    density = training_utils.compute_density_for_timestep_sampling
    kwargs = dict(
        weighting_scheme=flow.timestep_sampling,
        batch_size=count,
        logit_mean=flow.logit_mean,
        logit_std=flow.logit_std,
        mode_scale=flow.mode_scale,
    )
    if "generator" in inspect.signature(density).parameters:
        return density(**kwargs, generator=generator)
    if flow.timestep_sampling == "logit_normal":
        normal = torch.normal(flow.logit_mean, flow.logit_std, size=(count,), generator=generator)
        return torch.sigmoid(normal)
    u = torch.rand(size=(count,), generator=generator)
    if flow.timestep_sampling == "mode":
        u = 1 - u - flow.mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


class FlowMatchingFamily(Family):
    """A family trained by flow matching (diffusers' FlowMatchEulerDiscreteScheduler): its objective and
    sampler. Subclasses say how they are loaded, conditioned and called (Family's other methods)."""

    noise_scheduler_class = "FlowMatchEulerDiscreteScheduler"

    def training_positions(
        self, noise_scheduler: Any, count: int, generator: torch.Generator, flow: FlowSettings = _DEFAULT_FLOW
    ) -> torch.Tensor:
        """Positions from diffusers' compute_density_for_timestep_sampling (flow's density; the SD3 paper's
        logit-normal(0, 1) by default), as its SD3 training scripts turn them into indices of the shifted
        schedule."""
        torch = require("torch")
        u = _density(flow, count, generator)
        steps = noise_scheduler.config.num_train_timesteps
        return (u * steps).long().clamp(0, steps - 1).to(torch.int64)

    def _sigmas(self, noise_scheduler: Any, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        sigmas, timesteps = flow_sigmas(noise_scheduler.config)
        index = positions.cpu().long()
        return sigmas[index].to(positions.device), timesteps[index].to(positions.device)

    def noisy_input(
        self, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 - sigma) * latents + sigma * noise, and the timesteps sigma * N."""
        sigmas, timesteps = self._sigmas(noise_scheduler, positions)
        sigma = sigmas.to(latents.dtype).reshape(-1, *([1] * (latents.ndim - 1)))
        return (1 - sigma) * latents + sigma * noise, timesteps

    def prediction_target(
        self, noise_scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
    ) -> torch.Tensor:
        """The velocity noise - latents."""
        return noise - latents

    def loss_weights(
        self, noise_scheduler: Any, positions: torch.Tensor, flow: FlowSettings = _DEFAULT_FLOW
    ) -> torch.Tensor | None:
        """compute_loss_weighting_for_sd3 at the positions' sigmas (None for "none": all ones; the density
        already weights the noise levels)."""
        if flow.loss_weighting == "none":
            return None
        training_utils = require("diffusers.training_utils")
        sigmas, _ = self._sigmas(noise_scheduler, positions)
        return training_utils.compute_loss_weighting_for_sd3(flow.loss_weighting, sigmas).float()

    def denoise(self, model: Any, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: Mapping) -> Any:
        return model(hidden_states=noisy, timestep=timesteps, **conditioning).sample

    def shift_latents(self, vae: Any, latents: torch.Tensor) -> torch.Tensor:
        """(latents - shift_factor) * scaling_factor, as the pipeline and the training scripts."""
        shift = vae.config.get("shift_factor") or 0.0
        return latents - shift * vae.config.scaling_factor if shift else latents

    # ---- sampling

    def sampling_scheduler(self, noise_scheduler: Any) -> Any:
        diffusers = require("diffusers")
        return diffusers.FlowMatchEulerDiscreteScheduler.from_config(noise_scheduler.config)
