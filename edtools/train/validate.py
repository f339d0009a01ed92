"""Validation loss per concept on held-out images: fixed noise and a fixed spread of timesteps per image (from
the seed and the image's path), centre crops, no dropout, no gradient, so the number depends on the weights only.

measure() adds the same loss on a fixed sample of training images (the memorisation gap) and the held-out images
under the other concepts' prompts (concept bleed, see bleed.py).
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..balance.schedule import assign_buckets
from ..config import TrainConfig
from ..dataset.scan import Dataset
from ..errors import require
from .bleed import bleed_margins, concept_prompts
from .step import autocast

if TYPE_CHECKING:
    import torch

    from ..models import SDComponents

_log = logging.getLogger("edtools")

__all__ = ["TIMESTEPS_PER_IMAGE", "Measures", "Validator", "training_sample", "validation_timesteps"]

TIMESTEPS_PER_IMAGE = 4  # stratified over the schedule: one in each quarter of the timesteps
_TAG_VALIDATION = 0xD0
_TAG_TRAIN_SAMPLE = 0xD1  # keeps the training sample's stream apart from the hold-out's


def _image_key(path: str) -> int:
    return zlib.crc32(path.encode("utf-8"))


def validation_timesteps(
    seed: int, path: str, num_train_timesteps: int, count: int = TIMESTEPS_PER_IMAGE
) -> list[int]:
    """One timestep in each of `count` equal parts of [0, num_train_timesteps), at an offset drawn from
    (seed, path): every image is judged over the whole noise range, each at its own fixed points."""
    offset = np.random.default_rng([seed, _TAG_VALIDATION, _image_key(path)]).random()
    return [int((k + offset) * num_train_timesteps / count) for k in range(count)]


def training_sample(training: Dataset, held_out: Dataset, seed: int) -> np.ndarray:
    """Image numbers of `training` judged like the held-out ones: per concept as many as it holds out (at most
    all it trains), picked by a generator seeded by (seed, the folder's path), in ascending order."""
    picks = []
    held_counts = np.bincount(held_out.concept_index, minlength=len(training.concepts))
    for index, concept in enumerate(training.concepts):
        images = training.images_of(index)
        k = min(int(held_counts[index]) if index < len(held_counts) else 0, len(images))
        if k:
            key = zlib.crc32(concept.path.encode("utf-8"))
            rng = np.random.default_rng([seed, _TAG_TRAIN_SAMPLE, key])
            picks.append(np.sort(images[rng.permutation(len(images))[:k]]))
    return np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Measures:
    """One validation's numbers, per concept (folder path): held-out loss and images, the same loss on the
    training sample, gap = loss - train_loss, and bleed {(concept, under): margin} (see bleed.bleed_margins)."""

    loss: dict[str, float]
    images: dict[str, int]
    train_loss: dict[str, float] = field(default_factory=dict)
    gap: dict[str, float] = field(default_factory=dict)
    bleed: dict[tuple[str, str], float] = field(default_factory=dict)

    def results(self) -> dict[str, tuple[float, int]]:
        """{concept: (loss, images)}, as evaluate() gives."""
        return {c: (loss, self.images[c]) for c, loss in self.loss.items()}


@dataclass
class _Image:
    index: int
    concept: int
    crop: Any  # data.Crop
    timesteps: list[int]
    latents: Any = None  # torch.Tensor [4, h, w], the VAE's mean; computed once (the VAE never trains)
    path: str = ""  # relative to root; with the seed it fixes the image's noise and timesteps
    caption: str = ""
    root: str = ""


@dataclass
class Validator:
    """The held-out images of a run and how each is judged; evaluate() gives the loss per concept, measure()
    also the gap to the training sample (with `training`, the run's training images) and the concept bleed."""

    dataset: Dataset
    config: TrainConfig
    buckets: tuple[tuple[int, int], ...]
    num_train_timesteps: int = 1000
    training: Dataset | None = None
    images: list[_Image] = field(default_factory=list)
    train_images: list[_Image] = field(default_factory=list)
    prompts: tuple[str | None, ...] = ()  # per concept, what its bleed is measured under
    _text: dict[str, Any] = field(
        default_factory=dict
    )  # caption -> embeddings, while the encoders are frozen

    def __post_init__(self) -> None:
        if len(self.dataset) == 0:
            return
        self.images = self._judged(self.dataset, range(len(self.dataset)))
        if self.training is not None:
            picks = training_sample(self.training, self.dataset, self.config.seed)
            self.train_images = self._judged(self.training, picks)
            self.prompts = concept_prompts(self.training, self.dataset, self.config.prompt_overrides)

    def _judged(self, dataset: Dataset, indices: Any) -> list[_Image]:
        """How each of these images is judged: its bucket's centre crop, its own timesteps and noise."""
        from ..data import plan_crop

        bucket_of = assign_buckets(dataset.widths, dataset.heights, self.buckets)
        judged = []
        for i in (int(i) for i in indices):
            width, height = self.buckets[int(bucket_of[i])]
            crop = plan_crop(int(dataset.widths[i]), int(dataset.heights[i]), width, height)
            timesteps = validation_timesteps(self.config.seed, dataset.paths[i], self.num_train_timesteps)
            judged.append(
                _Image(
                    i,
                    int(dataset.concept_index[i]),
                    crop,
                    timesteps,
                    path=dataset.paths[i],
                    caption=dataset.captions[i],
                    root=str(dataset.root),
                )
            )
        return judged

    def bleed_images(self) -> list[_Image]:
        """The held-out images also scored under the other concepts' prompts: each concept's first
        bleed_images (in held-out order); none when bleed is off or there is no other concept to compare."""
        limit = self.config.bleed_images
        if not limit or sum(p is not None for p in self.prompts) < 2:
            return []
        taken: dict[int, int] = {}
        chosen = []
        for image in self.images:
            if taken.get(image.concept, 0) < limit:
                taken[image.concept] = taken.get(image.concept, 0) + 1
                chosen.append(image)
        return chosen

    def __len__(self) -> int:
        return len(self.images)

    def evaluate(
        self, components: SDComponents, device: Any, *, text_frozen: bool, text_cache: Any = None
    ) -> dict[str, tuple[float, int]]:
        """{concept: (mean loss, images)} over the held-out images, in eval mode and under no_grad; train/eval
        modes are restored. text_frozen: caption embeddings may be kept between evaluations; text_cache: the
        run's TextEmbeddingCache holding the validation captions too (the encoders may be off the GPU)."""
        self._leave_out_vanished()
        with self._judging(components, device, text_frozen):
            own = self._score(components, [(i, i.caption) for i in self.images], device, text_cache)
        return _per_concept(self.dataset.concepts, self.images, own, self.config.batch_size)

    def measure(
        self, components: SDComponents, device: Any, *, text_frozen: bool, text_cache: Any = None
    ) -> Measures:
        """evaluate()'s loss per concept (the same values), the same loss on the training sample, the gap
        between them and the bleed margins. An image is judged with the same noise and timesteps under every
        prompt; a prompt equal to the image's own caption reuses its own loss, so its margin is exactly 0."""
        self._leave_out_vanished()
        with self._judging(components, device, text_frozen):
            own = self._score(components, [(i, i.caption) for i in self.images], device, text_cache)
            trained = self._score(components, [(i, i.caption) for i in self.train_images], device, text_cache)
            scored = self.bleed_images()
            asked = sorted(
                {
                    (n, self.prompts[c])
                    for n, image in enumerate(scored)
                    for c in range(len(self.prompts))
                    if c != image.concept and self.prompts[c] is not None and self.prompts[c] != image.caption
                }
            )
            other = self._score(components, [(scored[n], p) for n, p in asked], device, text_cache)
        by_pair = dict(zip(asked, other, strict=True))
        own_loss = {id(image): loss for image, loss in zip(self.images, own, strict=True)}
        under = []
        for n, image in enumerate(scored):
            losses = {}
            for c, prompt in enumerate(self.prompts):
                if c == image.concept or prompt is None:
                    continue
                losses[c] = own_loss[id(image)] if prompt == image.caption else by_pair[(n, prompt)]
            under.append(losses)
        concepts = self.dataset.concepts
        held = _per_concept(concepts, self.images, own, self.config.batch_size)
        train = _per_concept(concepts, self.train_images, trained, self.config.batch_size)
        return Measures(
            loss={c: loss for c, (loss, _) in held.items()},
            images={c: n for c, (_, n) in held.items()},
            train_loss={c: loss for c, (loss, _) in train.items()},
            gap={c: held[c][0] - train[c][0] for c in held if c in train},
            bleed=bleed_margins(
                [c.path for c in concepts],
                [image.concept for image in scored],
                [own_loss[id(image)] for image in scored],
                under,
            ),
        )

    def _leave_out_vanished(self) -> None:
        """Images not encoded yet whose file is gone (deleted, a synced drive that went away) are left out of
        this and every later validation, with a warning: like a training image that vanished, never the end of
        a long run. Encoded ones keep their latents, so they are judged as before."""
        for name in ("images", "train_images"):
            kept, gone = [], []
            for image in getattr(self, name):
                readable = image.latents is not None or (Path(image.root) / image.path).is_file()
                (kept if readable else gone).append(image)
            if gone:
                setattr(self, name, kept)
                which = "held-out" if name == "images" else "training-sample"
                _log.warning(
                    "validation: %d %s image(s) disappeared during the run and are left out from now on "
                    "(deleted, or on a synced drive that went away): %s",
                    len(gone),
                    which,
                    ", ".join(image.path for image in gone[:5]) + (" ..." if len(gone) > 5 else ""),
                )

    @contextmanager
    def _judging(self, components: SDComponents, device: Any, text_frozen: bool) -> Iterator[None]:
        """Eval mode, no gradients, the run's autocast; train/eval modes are put back afterwards."""
        torch = require("torch")
        modules = [components.unet, components.vae, *components.text_encoders]
        modes = [m.training for m in modules]
        if not text_frozen:
            self._text.clear()
        try:
            for module in modules:
                module.eval()
            with torch.no_grad(), autocast(self.config, device):
                yield
        finally:
            for module, mode in zip(modules, modes, strict=True):
                module.train(mode)

    def _score(
        self, components: SDComponents, asked: list[tuple[_Image, str]], device: Any, text_cache: Any
    ) -> list[float]:
        """Each (image, prompt)'s loss, in the order asked, computed in groups of one bucket size."""
        losses: dict[int, float] = {}
        for group in _groups(list(range(len(asked))), [a[0] for a in asked], self.config.batch_size):
            values = self._losses(
                components, [asked[k][0] for k in group], device, text_cache, [asked[k][1] for k in group]
            )
            losses.update(zip(group, values, strict=True))
        return [losses[k] for k in range(len(asked))]

    def _generator(self, image: _Image) -> torch.Generator:
        torch = require("torch")
        words = np.random.SeedSequence(
            [self.config.seed, _TAG_VALIDATION, _image_key(image.path)]
        ).generate_state(2, dtype=np.uint32)
        return torch.Generator().manual_seed(((int(words[0]) << 32) | int(words[1])) & (2**63 - 1))

    def _losses(
        self,
        components: SDComponents,
        group: list[_Image],
        device: Any,
        text_cache: Any,
        captions: list[str],
    ) -> list[float]:
        """Each image's MSE averaged over its timesteps, under the given captions."""
        torch = require("torch")
        from ..data import decode_image, token_ids
        from ..models.conditioning import TextEmbeddings, encode_text, unet_conditioning
        from ..models.families import family_of
        from .loss import per_sample_mse

        vae, unet, scheduler = components.vae, components.unet, components.noise_scheduler
        missing = [image for image in group if image.latents is None]
        if missing:
            pixels = torch.stack([decode_image(Path(i.root) / i.path, i.crop) for i in missing])
            means = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mode().float().cpu()
            for image, mean in zip(missing, means, strict=True):
                image.latents = family_of(components).shift_latents(vae, mean * vae.config.scaling_factor)
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
        # timesteps are schedule positions (DDPM timesteps, or indices of a flow-matching model's sigmas)
        family = family_of(components)
        noisy, model_timesteps = family.noisy_input(scheduler, latents, noise, timesteps)
        target = family.prediction_target(scheduler, latents, noise, timesteps)
        conditioning = unet_conditioning(components, TextEmbeddings(hidden, pooled), time_ids, device=device)
        prediction = family.denoise(unet, noisy, model_timesteps, conditioning)
        per_sample = per_sample_mse(prediction, target).reshape(len(group), t).mean(dim=1)
        return per_sample.cpu().tolist()


def _groups(keys: list[int], images: list[_Image], batch_size: int) -> list[list[int]]:
    """Keys of images of one bucket size, at most batch_size per group (each image runs all its timesteps),
    bucket sizes in order and the images of a size in the order given."""
    by_size: dict[tuple[int, int], list[int]] = {}
    for key, image in zip(keys, images, strict=True):
        by_size.setdefault(image.crop.size, []).append(key)
    per_group = max(1, batch_size)
    return [
        group[start : start + per_group]
        for _, group in sorted(by_size.items())
        for start in range(0, len(group), per_group)
    ]


def _per_concept(
    concepts: Any, images: list[_Image], losses: list[float], batch_size: int
) -> dict[str, tuple[float, int]]:
    """{concept: (mean loss, images)} in the concepts' order, for concepts with images. Summed in the order
    the images are judged in, so the floating-point sums do not depend on how the images were listed."""
    sums = np.zeros(len(concepts))
    counts = np.zeros(len(concepts))
    for group in _groups(list(range(len(images))), images, batch_size):
        for k in group:
            sums[images[k].concept] += losses[k]
            counts[images[k].concept] += 1
    return {
        concept.path: (float(sums[i] / counts[i]), int(counts[i]))
        for i, concept in enumerate(concepts)
        if counts[i]
    }
