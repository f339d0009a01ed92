"""Turn an epoch schedule into training batches: decoded pixels, token ids, loss_scale per image.

Item b of ScheduleBatches is the schedule's whole batch b; random crops/flips are seeded by (seed, epoch, b).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..balance.schedule import EpochSchedule
from ..dataset.scan import Dataset
from .captions import CaptionSetting, caption_variant, token_ids
from .images import Crop, decode_image, plan_crop
from .latents import LatentStore, latent_key

if TYPE_CHECKING:
    import torch

_TAG_AUGMENT = 0xA0  # keeps these random streams apart from the schedule's own
_TAG_CAPTION = 0xA1

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # the scan/schedule commands work without torch; building batches does not

    class _TorchDataset:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("edtools training needs torch: pip install 'edtools[train]'")


class ScheduleBatches(_TorchDataset):
    """The schedule's batches as a torch map-style dataset: item b is batch b (a dict of tensors).

    Use with make_loader (batch_size=None): the schedule already decided batches and their bucket sizes.
    """

    def __init__(
        self,
        dataset: Dataset,
        schedule: EpochSchedule,
        tokenizer: Any,
        *,
        center_crop: bool = True,
        flip_p: float = 0.0,
        seed: int = 0,
        caption_dropout: float = 0.0,
        shuffle_tags: bool = False,
        keep_tags: int = 0,
        caption_settings: tuple[CaptionSetting, ...] | None = None,
        latent_keys: bool = False,
        latent_store: LatentStore | None = None,
    ) -> None:
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"flip_p is {flip_p}; it must be a probability between 0 and 1")
        if seed < 0:
            raise ValueError(f"seed is {seed}; it must be an integer >= 0")
        if schedule.n_batches and int(schedule.image_index.max()) >= len(dataset):
            raise ValueError(
                f"the schedule names image {int(schedule.image_index.max())} but the dataset has {len(dataset)}; "
                "build the schedule from this dataset"
            )
        self.dataset = dataset
        self.schedule = schedule
        # one tokenizer, or a tuple of them (SDXL: input_ids and input_ids_2)
        self.tokenizers = tuple(tokenizer) if isinstance(tokenizer, tuple | list) else (tokenizer,)
        self.center_crop = center_crop
        self.flip_p = float(flip_p)
        self.seed = int(seed)
        self.loss_scales = dataset.loss_scale_per_image()
        self.root = Path(dataset.root)
        self.keep_tags = keep_tags
        # per concept (concept_caption_settings); without them every folder gets caption_dropout / shuffle_tags
        if caption_settings is None:
            caption_settings = (CaptionSetting(float(caption_dropout), bool(shuffle_tags)),) * len(
                dataset.concepts
            )
        if len(caption_settings) != len(dataset.concepts):
            raise ValueError(
                f"caption_settings has {len(caption_settings)} entries; the dataset has "
                f"{len(dataset.concepts)} concepts (build them with concept_caption_settings)"
            )
        self.caption_settings = tuple(caption_settings)
        # with a store, images whose latents are cached are never decoded
        self.latent_keys = latent_keys or latent_store is not None
        self.latent_store = latent_store

    def __len__(self) -> int:
        return self.schedule.n_batches

    def augment_rng(self, b: int, position: int) -> np.random.Generator:
        """The random stream of one image slot: same (seed, epoch, b, position) -> same crop and flip."""
        return np.random.default_rng([self.seed, _TAG_AUGMENT, self.schedule.epoch, b, position])

    def crops(self, b: int) -> list[Crop]:
        """How each image of batch b is cut into the batch's bucket (from the scanned sizes; no decoding)."""
        width, height = self.schedule.batch_size_of(b)
        crops = []
        for position, i in enumerate(self.schedule.batch(b).tolist()):
            rng, flip = None, False
            if not self.center_crop or self.flip_p > 0:
                rng = self.augment_rng(b, position)
                flip = bool(rng.random() < self.flip_p)
            image_w, image_h = int(self.dataset.widths[i]), int(self.dataset.heights[i])
            crops.append(
                plan_crop(image_w, image_h, width, height, center_crop=self.center_crop, flip=flip, rng=rng)
            )
        return crops

    def caption(self, b: int, position: int, image: int) -> str:
        """The caption image `image` trains with in slot (b, position): dropped or tag-shuffled as configured,
        by a generator of (seed, epoch, b, position)."""
        caption = self.dataset.captions[image]
        setting = self.caption_settings[int(self.dataset.concept_index[image])]
        if not setting.dropout and not setting.shuffle:
            return caption
        rng = np.random.default_rng([self.seed, _TAG_CAPTION, self.schedule.epoch, b, position])
        return caption_variant(
            caption, rng, dropout=setting.dropout, shuffle=setting.shuffle, keep=self.keep_tags
        )

    def __getitem__(self, b: int) -> dict[str, Any]:
        import torch

        if not 0 <= b < len(self):
            raise IndexError(f"batch {b} out of range: this epoch has {len(self)} batches")
        images, crops = self.schedule.batch(b).tolist(), self.crops(b)
        pixels, positions, keys, cached, skipped = [], [], [], [], []
        for position, (i, crop) in enumerate(zip(images, crops, strict=True)):
            try:
                key = latent_key(self.root, self.dataset.paths[i], crop)  # reads the file's size and time
                latent = self.latent_store.get(key) if self.latent_store is not None else None
                if latent is None:
                    pixels.append(decode_image(self.root / self.dataset.paths[i], crop))
            except (ValueError, OSError) as exc:
                # one bad file, or one that vanished (a synced drive), never ends a long run: skipped, listed
                skipped.append((self.dataset.paths[i], _skip_reason(self.root / self.dataset.paths[i], exc)))
                continue
            positions.append(position)
            keys.append(key)
            cached.append(latent)
        if skipped:
            images, crops = [images[p] for p in positions], [crops[p] for p in positions]
        width, height = self.schedule.batch_size_of(b)
        captions = [self.caption(b, position, i) for position, i in zip(positions, images, strict=True)]
        index = np.asarray(images, dtype=np.int64)
        batch = {
            "pixel_values": torch.stack(pixels) if pixels else torch.empty(0, 3, height, width),
            "time_ids": torch.tensor([crop.time_ids() for crop in crops], dtype=torch.int64),
            "loss_scale": torch.from_numpy(self.loss_scales[index].astype(np.float32)),
            "concept": torch.from_numpy(self.dataset.concept_index[index].astype(np.int64)),
            "image_index": torch.from_numpy(index),
            "batch_weight": float(self.schedule.batch_weight[b]),
            "epoch": int(self.schedule.epoch),
            "batch": int(b),
            "captions": captions,
            "skipped_images": skipped,  # (path, why) of images that could not be read or decoded
        }
        if self.latent_keys:
            batch["latent_keys"] = keys
            batch["cached_latents"] = cached
        for n, tokenizer in enumerate(self.tokenizers):
            batch["input_ids" if n == 0 else f"input_ids_{n + 1}"] = token_ids(tokenizer, captions)
        return batch


def _skip_reason(path: Path, exc: Exception) -> str:
    """Why an image was left out of its batch, for the warning and skipped_images.txt."""
    missing = exc if isinstance(exc, OSError) else exc.__cause__  # decode_image wraps what PIL raised
    if isinstance(missing, FileNotFoundError):
        return "the file disappeared during the run (deleted, or on a synced drive that went away)"
    if isinstance(exc, OSError):
        return f"cannot read image {path}: {exc.strerror or exc}"
    return str(exc)


def make_loader(
    batches: ScheduleBatches, *, num_workers: int = 0, start_batch: int = 0, pin_memory: bool = False
) -> torch.utils.data.DataLoader:
    """A DataLoader over batches start_batch, start_batch+1, ... (earlier ones are never loaded, so a
    resumed run skips them for free). Workers decode images in parallel; order is always the schedule's."""
    from torch.utils.data import DataLoader

    if num_workers < 0:
        raise ValueError(f"num_workers is {num_workers}; use 0 (load in the training process) or more")
    if not 0 <= start_batch <= len(batches):
        raise ValueError(f"start_batch is {start_batch}; this epoch has batches 0..{len(batches) - 1}")
    return DataLoader(
        batches,
        batch_size=None,
        sampler=range(start_batch, len(batches)),
        num_workers=num_workers,
        pin_memory=pin_memory,
    )
