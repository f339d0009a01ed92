"""Turn an epoch schedule into training batches: decoded pixels, token ids, loss_scale per image.

Item b of ScheduleBatches is the schedule's whole batch b; random crops/flips are seeded by (seed, epoch, b).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .dataset import Dataset
from .schedule import EpochSchedule

if TYPE_CHECKING:
    import torch

__all__ = [
    "CaptionSetting",
    "Crop",
    "LatentCache",
    "LatentStore",
    "ScheduleBatches",
    "decode_image",
    "image_size",
    "load_image",
    "make_loader",
    "caption_variant",
    "concept_caption_settings",
    "latent_key",
    "plan_crop",
    "token_ids",
    "vae_key",
]

_TAG_AUGMENT = 0xA0  # keeps these random streams apart from the schedule's own
_TAG_CAPTION = 0xA1

try:
    from torch.utils.data import Dataset as _TorchDataset
except ImportError:  # the scan/schedule commands work without torch; building batches does not

    class _TorchDataset:  # type: ignore[no-redef]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise ImportError("edtools training needs torch: pip install 'edtools[train]'")


# ---------------------------------------------------------------------------------------------------------
# One image


def _to_rgb(image):
    """Any PIL mode as 8-bit RGB: transparency composited on white, 16-bit grey scaled (not clipped)."""
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit grey (PNG): full range is 0..65535; PIL's convert("L") would clip it to 255 (all white).
        grey = np.asarray(image, dtype=np.float64)
        grey8 = np.clip(np.round(grey / 257.0), 0, 255).astype(np.uint8)
        return Image.fromarray(grey8, mode="L").convert("RGB")
    if mode == "F":
        raise ValueError(
            "32-bit float images (mode F) are not supported; save the image as 8-bit PNG or JPEG"
        )
    has_alpha = mode in ("RGBA", "LA", "PA", "RGBa", "La") or (mode == "P" and "transparency" in image.info)
    if mode == "P" and not has_alpha:
        return image.convert("RGB")
    if has_alpha:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV


def _cover_size(width: int, height: int, image_w: int, image_h: int) -> tuple[int, int]:
    """The smallest size with the image's aspect that covers width x height."""
    scale = max(width / image_w, height / image_h)
    return max(width, round(image_w * scale)), max(height, round(image_h * scale))


@dataclass(frozen=True)
class Crop:
    """Where an image lands in its bucket: resized to `cover` (its own aspect, just covering the bucket), cut
    at (left, top) to the bucket's size, maybe mirrored. Sizes are (width, height)."""

    original: tuple[int, int]  # the stored image, EXIF orientation applied
    cover: tuple[int, int]
    left: int
    top: int
    size: tuple[int, int]
    flip: bool = False

    def time_ids(self) -> tuple[int, int, int, int, int, int]:
        """SDXL's size and crop conditioning: (original height, original width, crop top, crop left, target
        height, target width). Mirrored, the crop's left edge is measured in the mirrored image."""
        (original_w, original_h), (cover_w, _), (width, height) = self.original, self.cover, self.size
        left = cover_w - self.left - width if self.flip else self.left
        return (original_h, original_w, self.top, left, height, width)


def plan_crop(
    image_w: int,
    image_h: int,
    width: int,
    height: int,
    *,
    center_crop: bool = True,
    flip: bool = False,
    rng: np.random.Generator | None = None,
) -> Crop:
    """The crop of an image_w x image_h image into a width x height bucket: centred, or at a place drawn
    from rng (a seeded numpy Generator)."""
    if width < 1 or height < 1:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if image_w < 1 or image_h < 1:
        raise ValueError(f"the image has no pixels ({image_w}x{image_h})")
    if not center_crop and rng is None:
        raise ValueError("a random crop (center_crop=False) needs crop_rng, a seeded numpy Generator")
    cover_w, cover_h = _cover_size(width, height, image_w, image_h)
    if center_crop:
        left, top = (cover_w - width) // 2, (cover_h - height) // 2
    else:
        left = int(rng.integers(0, cover_w - width + 1))
        top = int(rng.integers(0, cover_h - height + 1))
    return Crop((image_w, image_h), (cover_w, cover_h), left, top, (width, height), flip)


def decode_image(path: str | os.PathLike, crop: Crop) -> torch.Tensor:
    """Decode an image as float32 [3, height, width] in [-1, 1] as `crop` says: EXIF orientation applied,
    converted to RGB, resized to crop.cover, cut, optionally mirrored."""
    import torch
    from PIL import Image

    width, height = crop.size
    try:
        with Image.open(path) as image:
            orientation = image.getexif().get(0x0112, 1)  # a PNG is decoded here, to find late EXIF
            if image.format == "JPEG":
                # Let the JPEG decoder scale down by 1/2, 1/4 or 1/8 while decoding: a 6000 px photo for a
                # 512 px bucket decodes 16x fewer pixels. draft never goes below the asked size; asking for
                # _SHRINK_GAP x the cover leaves Lanczos at least that much downscaling to do.
                cover_w, cover_h = (math.ceil(side * _SHRINK_GAP) for side in crop.cover)
                image.draft("RGB", (cover_h, cover_w) if orientation in (5, 6, 7, 8) else (cover_w, cover_h))
                image.decodermaxblock = max(image.decodermaxblock, 1 << 20)  # fewer, larger reads
            image.load()
            turn = {
                2: Image.Transpose.FLIP_LEFT_RIGHT,
                3: Image.Transpose.ROTATE_180,
                4: Image.Transpose.FLIP_TOP_BOTTOM,
                5: Image.Transpose.TRANSPOSE,
                6: Image.Transpose.ROTATE_270,
                7: Image.Transpose.TRANSVERSE,
                8: Image.Transpose.ROTATE_90,
            }.get(orientation)
            if turn is not None:  # as ImageOps.exif_transpose does, without its copy when nothing turns
                image = image.transpose(turn)
            grey = image.mode == "L"  # resized as one channel, made RGB after
            if not grey:
                image = _to_rgb(image)
    except Exception as exc:  # PIL raises many types for broken files; all mean the same to a person
        raise ValueError(f"cannot load image {path}: {exc}; fix or remove the file and re-scan") from exc

    image = _resize_and_cut(image, crop)
    if grey:
        image = image.convert("RGB")
    if crop.flip:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    pixels = torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)
    return pixels.float().div_(127.5).sub_(1.0)


# Images are first shrunk by whole factors (the JPEG decoder's 1/2, 1/4, 1/8; reduce() for other formats)
# only while at least this much Lanczos downscaling remains: a 3000x2000 photo for 768x512 is halved, then
# Lanczos does the last 1.95x. The less Lanczos is left, the more the result differs from a full Lanczos
# resize: on a synthetic photo with strong fine detail ~5 levels (of 0..255, mean) with none left, ~2.3 with
# 1.5x, ~1.5 with 2x; 0.74 on bench/decode.py's photo.
_SHRINK_GAP = 1.5


def _resize_and_cut(image, crop: Crop):
    """The crop's region of the image resized to crop.cover, computed directly: resizing only the kept
    region (Lanczos, reading past its edges as a full resize does) gives resize-then-cut's pixels, but for
    PIL's rounding between its two passes (a level or two in a few pixels)."""
    from PIL import Image

    width, height = crop.size
    cover_w, cover_h = crop.cover
    if image.size == crop.cover:
        if (crop.left, crop.top, width, height) == (0, 0, cover_w, cover_h):
            return image
        return image.crop((crop.left, crop.top, crop.left + width, crop.top + height))
    sx, sy = image.width / cover_w, image.height / cover_h
    box = (crop.left * sx, crop.top * sy, (crop.left + width) * sx, (crop.top + height) * sy)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box, reducing_gap=_SHRINK_GAP)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image as displayed (EXIF orientation applied), read from its header."""
    from .imageheader import image_size as header_image_size

    try:
        return header_image_size(path)
    except Exception as exc:
        raise ValueError(f"cannot load image {path}: {exc}; fix or remove the file and re-scan") from exc


def load_image(
    path: str | os.PathLike,
    width: int,
    height: int,
    *,
    center_crop: bool = True,
    flip: bool = False,
    crop_rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """Decode an image as float32 [3, height, width] in [-1, 1]: EXIF orientation applied, converted to RGB,
    resized to cover the size, cropped (centre, or at a crop_rng-chosen place), optionally mirrored."""
    plan = plan_crop(*image_size(path), width, height, center_crop=center_crop, flip=flip, rng=crop_rng)
    return decode_image(path, plan)


# ---------------------------------------------------------------------------------------------------------
# Batches


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


@dataclass(frozen=True)
class CaptionSetting:
    """How one concept folder's captions train: the share dropped (empty caption) and whether tags shuffle."""

    dropout: float = 0.0
    shuffle: bool = False


def concept_caption_settings(
    config: Any, concepts: tuple[str, ...] | list[str]
) -> tuple[CaptionSetting, ...]:
    """Each concept's CaptionSetting, in the order given: its own entry in config.caption_dropouts /
    config.shuffle_tags_concepts, else the global caption_dropout / shuffle_tags. A folder named there that is
    not a concept is an error (a typo would otherwise silently train every caption intact)."""
    from .config import ConfigError

    known = set(concepts)
    for name, named in (
        ("caption_dropouts", [c for c, _ in config.caption_dropouts]),
        ("shuffle_tags_concepts", list(config.shuffle_tags_concepts)),
    ):
        unknown = sorted(set(named) - known)
        if unknown:
            raise ConfigError(
                f"{name} names folder(s) {', '.join(map(repr, unknown))} that are not concept folders of "
                f"data_root ({', '.join(concepts)}); use their paths relative to data_root"
            )
    dropouts, shuffled = dict(config.caption_dropouts), set(config.shuffle_tags_concepts)
    return tuple(
        CaptionSetting(
            float(dropouts.get(c, config.caption_dropout)), bool(config.shuffle_tags or c in shuffled)
        )
        for c in concepts
    )


def caption_variant(
    caption: str, rng: np.random.Generator, *, dropout: float, shuffle: bool, keep: int
) -> str:
    """The caption as one step trains it: empty with probability `dropout`; else with its comma-separated tags
    shuffled (the first `keep` in place). The draws are always made, so each slot's stream is the same."""
    dropped = rng.random() < dropout
    if not shuffle:
        return "" if dropped else caption
    tags = [t.strip() for t in caption.split(",")]
    if len(tags) > keep + 1:
        head, tail = tags[:keep], tags[keep:]
        tags = head + [tail[i] for i in rng.permutation(len(tail))]
    return "" if dropped else ", ".join(t for t in tags if t)


def token_ids(tokenizer: Any, captions: list[str]) -> torch.Tensor:
    """Captions as token ids [n, model_max_length]: padded, truncated to the tokenizer's length (77)."""
    if not captions:  # a batch whose every image was skipped
        import torch

        return torch.zeros((0, tokenizer.model_max_length), dtype=torch.int64)
    return tokenizer(
        captions,
        padding="max_length",
        truncation=True,
        max_length=tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids.long()


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


# ---------------------------------------------------------------------------------------------------------
# Latents


class LatentStore:
    """Cached VAE latents by key: in memory for this run, or as files under folder/<vae key>/ that later runs
    reuse. A key names the image file (path, size, modification time), its crop and flip; the folder names the
    VAE, so another VAE, another crop or an edited image is another entry. Writes are atomic."""

    def __init__(
        self, mode: str = "memory", folder: str | os.PathLike | None = None, vae_key: str = ""
    ) -> None:
        if mode not in ("memory", "disk"):
            raise ValueError(f"a latent store is memory or disk, not {mode!r}")
        if mode == "disk" and folder is None:
            raise ValueError("a disk latent store needs a folder")
        self.mode = mode
        self.folder = Path(folder) / "latents" / vae_key if folder is not None else None
        self._memory: dict[str, torch.Tensor] = {}

    def __len__(self) -> int:
        if self.mode == "memory":
            return len(self._memory)
        return sum(1 for _ in self.folder.glob("*/*.safetensors")) if self.folder.is_dir() else 0

    def _file(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.safetensors"

    def get(self, key: str) -> torch.Tensor | None:
        if self.mode == "memory":
            return self._memory.get(key)
        path = self._file(key)
        if not path.is_file():
            return None
        from safetensors.torch import load_file

        try:
            return load_file(path)["latents"]
        except Exception:  # a damaged entry is encoded again (and rewritten)
            return None

    def put(self, key: str, latents: torch.Tensor) -> None:
        latents = latents.detach().cpu().contiguous()
        if self.mode == "memory":
            self._memory[key] = latents
            return
        from safetensors.torch import save_file

        from .atomic import atomic_file

        with atomic_file(self._file(key)) as tmp:
            save_file({"latents": latents}, str(tmp))


def latent_key(root: Path, path: str, crop: Crop) -> str:
    """The cache key of one image under one crop: its file's identity (path, size, modification time), the
    resize, the cut and the flip."""
    import hashlib

    stat = (root / path).stat()
    identity = (
        f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{crop.cover[0]}x{crop.cover[1]}|{crop.left},{crop.top}|"
        f"{crop.size[0]}x{crop.size[1]}|{int(crop.flip)}"
    )
    return hashlib.sha1(identity.encode("utf-8")).hexdigest()


def vae_key(vae: Any) -> str:
    """A short fingerprint of a VAE's config and weights: cached latents belong to the VAE that made them."""
    import hashlib
    import json

    digest = hashlib.sha1(json.dumps(dict(vae.config), sort_keys=True, default=str).encode("utf-8"))
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode("utf-8"))
        digest.update(
            tensor.detach().reshape(-1)[:1024].float().cpu().numpy().tobytes()
        )  # the head of each tensor
        digest.update(str(tuple(tensor.shape)).encode("utf-8"))
    return digest.hexdigest()[:16]


class LatentCache:
    """VAE latents of the batch's images. Without a store, a fresh sample of the latent distribution every
    time; with one (memory or disk), each image's mean latent under each crop and flip it is trained with,
    encoded once (one image at a time: the VAE's peak memory is one image's) and reused. Batches built with
    the same store arrive with the cached rows already filled and those images never decoded."""

    def __init__(self, store: LatentStore | None = None) -> None:
        self.store = store

    @property
    def enabled(self) -> bool:
        return self.store is not None

    def __len__(self) -> int:
        return len(self.store) if self.store is not None else 0

    def latents(
        self, batch: dict, vae, scaling_factor: float, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents [n, C, H/8, W/8] on the VAE's device and dtype (no gradient)."""
        import torch

        pixels = batch["pixel_values"]
        if self.store is None:
            with torch.no_grad():
                encoded = vae.encode(pixels.to(device=vae.device, dtype=vae.dtype)).latent_dist
                return encoded.sample(generator=generator) * scaling_factor
        keys = batch["latent_keys"]
        cached = list(batch.get("cached_latents") or [None] * len(keys))
        # pixel rows exist for the images that were not cached when the batch was made
        rows = iter(range(pixels.shape[0]))
        with torch.no_grad():
            for i, key in enumerate(keys):
                if cached[i] is None:
                    row = next(rows)
                    cached[i] = self.store.get(key)
                    if cached[i] is None:
                        image = pixels[row : row + 1].to(device=vae.device, dtype=vae.dtype)
                        cached[i] = vae.encode(image).latent_dist.mode()[0].cpu()
                        self.store.put(key, cached[i])
        stacked = torch.stack(cached)
        return stacked.to(device=vae.device, dtype=vae.dtype) * scaling_factor
