"""One training image: decoded, shrunk and Lanczos-resized to cover its bucket, cut to the crop the schedule's
seeded draw planned (flip included); sizes read from headers, EXIF orientation applied.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import torch


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
    from ..dataset.imageheader import image_size as header_image_size

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
