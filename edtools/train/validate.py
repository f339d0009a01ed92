"""Validation loss per concept on held-out images: fixed noise and a fixed spread of timesteps per image (from
the seed and the image's path), centre crops, no dropout, no gradient, so the number depends on the weights only.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..config import TrainConfig
from ..dataset import Dataset
from ..errors import require
from ..schedule import assign_buckets
from .step import autocast

if TYPE_CHECKING:
    import torch

    from ..models import SDComponents

__all__ = ["TIMESTEPS_PER_IMAGE", "Validator", "validation_timesteps"]

TIMESTEPS_PER_IMAGE = 4  # stratified over the schedule: one in each quarter of the timesteps
_TAG_VALIDATION = 0xD0


def _image_key(path: str) -> int:
    return zlib.crc32(path.encode("utf-8"))


def validation_timesteps(
    seed: int, path: str, num_train_timesteps: int, count: int = TIMESTEPS_PER_IMAGE
) -> list[int]:
    """One timestep in each of `count` equal parts of [0, num_train_timesteps), at an offset drawn from
    (seed, path): every image is judged over the whole noise range, each at its own fixed points."""
    offset = np.random.default_rng([seed, _TAG_VALIDATION, _image_key(path)]).random()
    return [int((k + offset) * num_train_timesteps / count) for k in range(count)]


@dataclass
class _Image:
    index: int
    concept: int
    crop: Any  # data.Crop
    timesteps: list[int]
    latents: Any = None  # torch.Tensor [4, h, w], the VAE's mean; computed once (the VAE never trains)


@dataclass
class Validator:
    """The held-out images of a run and how each is judged; evaluate() gives the loss per concept."""

    dataset: Dataset
    config: TrainConfig
    buckets: tuple[tuple[int, int], ...]
    num_train_timesteps: int = 1000
    images: list[_Image] = field(default_factory=list)
    _text: dict[str, Any] = field(
        default_factory=dict
    )  # caption -> embeddings, while the encoders are frozen

    def __post_init__(self) -> None:
        from ..data import plan_crop

        if len(self.dataset) == 0:
            return
        bucket_of = assign_buckets(self.dataset.widths, self.dataset.heights, self.buckets)
        for i in range(len(self.dataset)):
            width, height = self.buckets[int(bucket_of[i])]
            crop = plan_crop(int(self.dataset.widths[i]), int(self.dataset.heights[i]), width, height)
            timesteps = validation_timesteps(
                self.config.seed, self.dataset.paths[i], self.num_train_timesteps
            )
            self.images.append(_Image(i, int(self.dataset.concept_index[i]), crop, timesteps))

    def __len__(self) -> int:
        return len(self.images)

    def evaluate(
        self, components: SDComponents, device: Any, *, text_frozen: bool, text_cache: Any = None
    ) -> dict[str, tuple[float, int]]:
        """{concept: (mean loss, images)} over the held-out images, in eval mode and under no_grad; train/eval
        modes are restored. text_frozen: caption embeddings may be kept between evaluations; text_cache: the
        run's TextEmbeddingCache holding the validation captions too (the encoders may be off the GPU)."""
        torch = require("torch")
        modules = [components.unet, components.vae, *components.text_encoders]
        modes = [m.training for m in modules]
        sums = np.zeros(len(self.dataset.concepts))
        counts = np.zeros(len(self.dataset.concepts))
        if not text_frozen:
            self._text.clear()
        try:
            for module in modules:
                module.eval()
            with torch.no_grad(), autocast(self.config, device):
                for group in self._groups():
                    losses = self._losses(components, group, device, text_cache)
                    for image, loss in zip(group, losses, strict=True):
                        sums[image.concept] += loss
                        counts[image.concept] += 1
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)
        return {
            concept.path: (float(sums[i] / counts[i]), int(counts[i]))
            for i, concept in enumerate(self.dataset.concepts)
            if counts[i]
        }

    def _groups(self) -> list[list[_Image]]:
        """Images of one bucket size, at most batch_size per group (each image runs all its timesteps)."""
        by_size: dict[tuple[int, int], list[_Image]] = {}
        for image in self.images:
            by_size.setdefault(image.crop.size, []).append(image)
        per_group = max(1, self.config.batch_size)
        return [
            images[start : start + per_group]
            for _, images in sorted(by_size.items())
            for start in range(0, len(images), per_group)
        ]

    def _generator(self, image: _Image) -> torch.Generator:
        torch = require("torch")
        words = np.random.SeedSequence(
            [self.config.seed, _TAG_VALIDATION, _image_key(self.dataset.paths[image.index])]
        ).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & (2**63 - 1))

    def _losses(
        self, components: SDComponents, group: list[_Image], device: Any, text_cache: Any
    ) -> list[float]:
        """Each image's MSE averaged over its timesteps."""
        torch = require("torch")
        from ..data import decode_image, token_ids
        from ..loss import per_sample_mse, prediction_target
        from ..models.conditioning import TextEmbeddings, encode_text, unet_conditioning

        vae, unet, scheduler = components.vae, components.unet, components.noise_scheduler
        missing = [image for image in group if image.latents is None]
        if missing:
            pixels = torch.stack(
                [decode_image(Path(self.dataset.root) / self.dataset.paths[i.index], i.crop) for i in missing]
            )
            means = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
            for image, mean in zip(missing, means, strict=True):
                image.latents = mean * vae.config.scaling_factor
        captions = [self.dataset.captions[image.index] for image in group]
        if text_cache is not None:
            cached = text_cache.get(captions)
            for row, caption in enumerate(captions):
                pooled = None if cached.pooled is None else cached.pooled[row]
                self._text[caption] = TextEmbeddings(cached.hidden[row], pooled)
        todo = sorted({c for c in captions if c not in self._text})
        if todo:
            encoded = encode_text(components, [token_ids(t, todo) for t in components.tokenizers])
            for row, caption in enumerate(todo):
                pooled = None if encoded.pooled is None else encoded.pooled[row]
                self._text[caption] = TextEmbeddings(encoded.hidden[row], pooled)
        t = TIMESTEPS_PER_IMAGE
        latents = torch.stack([image.latents for image in group]).repeat_interleave(t, 0).to(device)
        timesteps = torch.tensor([s for image in group for s in image.timesteps], device=device)
        # one fixed noise per image (from the seed and its path), shared by its timesteps
        noise = torch.stack(
            [torch.randn(image.latents.shape, generator=self._generator(image)) for image in group]
        )
        noise = noise.repeat_interleave(t, 0).to(device)
        embeddings = [self._text[c] for c in captions]
        hidden = torch.stack([e.hidden for e in embeddings]).repeat_interleave(t, 0)
        pooled = None
        if embeddings[0].pooled is not None:
            pooled = torch.stack([e.pooled for e in embeddings]).repeat_interleave(t, 0)
        time_ids = torch.tensor([image.crop.time_ids() for image in group]).repeat_interleave(t, 0)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        target = prediction_target(scheduler, latents, noise, timesteps)
        conditioning = unet_conditioning(components, TextEmbeddings(hidden, pooled), time_ids, device=device)
        prediction = unet(noisy, timesteps, **conditioning)
        per_sample = per_sample_mse(prediction.sample, target).reshape(len(group), t).mean(dim=1)
        return per_sample.cpu().tolist()
