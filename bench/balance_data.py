"""Synthetic data of the fine-tuning balance bench: a base family of shapes x colours ("a red circle") that the
base model is pretrained on, and new concepts behind trigger words ("zqx star"), one ten times rarer.

Everything is written as real captioned folders (`<stem>.png` + `<stem>.txt`), so edtools scans and trains them
as it would a user's data root. Each part draws from its own generator of (seed, part), so changing one part's
size leaves the others' images alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BASE_SHAPES",
    "COLOURS",
    "NEW_CONCEPTS",
    "PRESERVATION",
    "RARE",
    "SIDE",
    "DataSizes",
    "draw",
    "write_base_root",
    "write_finetune_root",
    "write_validation_root",
]

SIDE = 64
BASE_SHAPES = ("circle", "square", "triangle", "diamond", "cross")
COLOURS = {
    "red": (210, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 60, 210),
    "yellow": (225, 200, 40),
    "purple": (140, 50, 180),
    "orange": (235, 130, 30),
}
# folder: (trigger word, shape, colour). Shapes and colours the base family never shows, so the trigger word
# is the only way the caption can name them.
NEW_CONCEPTS = {
    "zqx_star": ("zqx", "star", (30, 170, 170)),
    "vmb_ring": ("vmb", "ring", (230, 110, 170)),
    "kdr_bowtie": ("kdr", "bowtie", (120, 80, 40)),
}
RARE = "kdr_bowtie"
PRESERVATION = "preservation"  # base-family images trained alongside the new concepts at multiply.txt 0.1
PRESERVATION_MULTIPLIER = 0.1

# seeds of each part's generator, so the parts are independent draws
_BASE, _FINETUNE, _VALIDATION = 1, 2, 3


@dataclass(frozen=True)
class DataSizes:
    """How many images each part has. Defaults: 240 base images (8 per shape x colour) to pretrain on; a
    fine-tune root of 60 + 60 + 6 (rare) trigger-word images and 120 preservation images (12 per epoch); 12
    held-out images per new concept and 30 of the base family (one per shape x colour)."""

    base_per_kind: int = 8
    common: int = 60
    rare: int = 6
    preservation_per_kind: int = 4
    validation_per_concept: int = 12
    validation_per_kind: int = 1


def _kinds() -> list[tuple[str, str]]:
    """Every (colour, shape) of the base family, in a fixed order."""
    return [(colour, shape) for shape in BASE_SHAPES for colour in COLOURS]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx - r, cy + 0.7 * r), (cx + r, cy + 0.7 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        angles = np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
        return [(cx + q * np.cos(a), cy - q * np.sin(a)) for q, a in zip(radii, angles, strict=True)]
    raise ValueError(f"no polygon for shape {shape!r}")


def draw(
    shape: str,
    colour: tuple[int, int, int],
    rng: np.random.Generator,
    *,
    large: bool = True,
    dark: bool = False,
) -> Image.Image:
    """One SIDE x SIDE image: the shape in (a jittered) colour near the centre on a light (or dark) background;
    size, place (+-3 px), colour and background vary with rng. Shapes stay near the centre: spread over the
    frame they leave the tiny model nothing concept-specific to learn (see RESULTS.md, Balance effect)."""
    low, high = (20, 80) if dark else (150, 231)
    image = Image.new("RGB", (SIDE, SIDE), tuple(int(c) for c in rng.integers(low, high, 3)))
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, rng.integers(-30, 31, 3), strict=True))
    r = rng.uniform(16, 21) if large else rng.uniform(10, 14)
    cx, cy = SIDE / 2 + rng.uniform(-3, 3, 2)
    pen = ImageDraw.Draw(image)
    if shape == "circle":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "ring":
        pen.ellipse((cx - r, cy - r, cx + r, cy + r), outline=fill, width=max(3, int(r / 3)))
    elif shape == "square":
        pen.rectangle((cx - 0.85 * r, cy - 0.85 * r, cx + 0.85 * r, cy + 0.85 * r), fill=fill)
    elif shape == "cross":
        w = 0.35 * r
        pen.rectangle((cx - r, cy - w, cx + r, cy + w), fill=fill)
        pen.rectangle((cx - w, cy - r, cx + w, cy + r), fill=fill)
    elif shape == "bowtie":  # two triangles meeting at the centre
        for side in (-1, 1):
            pen.polygon([(cx, cy), (cx + side * r, cy - 0.7 * r), (cx + side * r, cy + 0.7 * r)], fill=fill)
    else:
        pen.polygon(_polygon(shape, cx, cy, r), fill=fill)
    return image


def _write(folder: Path, stem: str, image: Image.Image, caption: str) -> None:
    image.save(folder / f"{stem}.png")
    (folder / f"{stem}.txt").write_text(caption, encoding="utf-8")


def _base_images(folder: Path, per_kind: int, rng: np.random.Generator) -> None:
    """per_kind images of every colour x shape, captioned "a red circle"."""
    folder.mkdir(parents=True)
    for colour, shape in _kinds():
        for i in range(per_kind):
            _write(
                folder, f"{colour}_{shape}_{i:03d}", draw(shape, COLOURS[colour], rng), f"a {colour} {shape}"
            )


def _new_images(folder: Path, concept: str, n: int, rng: np.random.Generator) -> None:
    """n images of a trigger-word concept, captioned as tags: "kdr bowtie, large, dark background" (size and
    background vary, so the captions have tags to shuffle and drop)."""
    trigger, shape, colour = NEW_CONCEPTS[concept]
    folder.mkdir(parents=True)
    for i in range(n):
        large, dark = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        caption = (
            f"{trigger} {shape}, {'large' if large else 'small'}, {'dark' if dark else 'light'} background"
        )
        _write(folder, f"{concept}_{i:03d}", draw(shape, colour, rng, large=large, dark=dark), caption)


def write_base_root(root: Path, seed: int, sizes: DataSizes) -> Path:
    """The pretraining data root: one folder, base/, of the whole base family."""
    _base_images(root / "base", sizes.base_per_kind, np.random.default_rng([seed, _BASE]))
    return root


def write_finetune_root(root: Path, seed: int, sizes: DataSizes) -> Path:
    """The fine-tuning data root: a folder per new concept (RARE with sizes.rare images, the others
    sizes.common) and preservation/ (base-family images, fresh draws) with multiply.txt 0.1."""
    rng = np.random.default_rng([seed, _FINETUNE])
    for concept in NEW_CONCEPTS:
        _new_images(root / concept, concept, sizes.rare if concept == RARE else sizes.common, rng)
    _base_images(root / PRESERVATION, sizes.preservation_per_kind, rng)
    (root / PRESERVATION / "multiply.txt").write_text(f"{PRESERVATION_MULTIPLIER}\n", encoding="utf-8")
    return root


def write_validation_root(root: Path, seed: int, sizes: DataSizes) -> Path:
    """Held-out images named like the fine-tuning folders: as many of the rare concept as of the common ones
    (so it is judged as reliably), and the base family in preservation/ (forgetting)."""
    rng = np.random.default_rng([seed, _VALIDATION])
    for concept in NEW_CONCEPTS:
        _new_images(root / concept, concept, sizes.validation_per_concept, rng)
    _base_images(root / PRESERVATION, sizes.validation_per_kind, rng)
    return root
