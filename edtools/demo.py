"""The demo data root: imbalanced concept folders drawn with PIL, so `make demo` needs no downloads.

It shows every convention at once: sidecar and file-name captions, several aspect ratios, a multiply.txt that
balances a small folder, a large preservation folder at 0.1, and a loss_scale.txt.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset.scan import write_concept_values

__all__ = ["DEMO_CONCEPTS", "make_demo_dataset"]

# folder: (images, caption subject, base colour, multiplier, loss_scale)
DEMO_CONCEPTS: dict[str, tuple[int, str, tuple[int, int, int], float | None, float | None]] = {
    "people/alice": (24, "a photo of alice", (220, 170, 140), None, None),
    "people/bob": (6, "a photo of bob", (120, 80, 60), 4.0, None),
    "styles/ink_drawing": (12, "an ink drawing", (30, 30, 30), None, 0.5),
    "objects/red_cube": (8, "a red cube on a table", (200, 30, 30), 2.0, None),
    "preservation": (200, "a photograph", (90, 140, 200), 0.1, None),
}
_SIZES = ((96, 96), (96, 128), (128, 96), (128, 72))
_FORMATS = (".jpg", ".png", ".webp")


def _draw(subject: str, colour: tuple[int, int, int], size: tuple[int, int], rng: np.random.Generator):
    from PIL import Image, ImageDraw

    width, height = size
    background = tuple(int(c) for c in rng.integers(150, 255, 3))
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    jitter = rng.integers(-25, 25, 3)
    fill = tuple(int(np.clip(c + j, 0, 255)) for c, j in zip(colour, jitter, strict=True))
    cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
    r = min(width, height) * rng.uniform(0.2, 0.35)
    if "photo of" in subject:  # a face-like disc with eyes
        draw.ellipse((cx - r, cy - r * 1.2, cx + r, cy + r * 1.2), fill=fill)
        for dx in (-0.4, 0.4):
            draw.ellipse(
                (cx + dx * r - 3, cy - 0.3 * r - 3, cx + dx * r + 3, cy - 0.3 * r + 3), fill=(20, 20, 20)
            )
    elif "ink" in subject:
        for _ in range(12):
            x0, y0, x1, y1 = rng.uniform(0, 1, 4) * [width, height, width, height]
            draw.line((x0, y0, x1, y1), fill=fill, width=int(rng.integers(1, 4)))
    elif "cube" in subject:
        draw.rectangle((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=(60, 0, 0))
    else:
        for _ in range(5):
            x0, y0 = rng.uniform(0, width), rng.uniform(0, height)
            s = rng.uniform(8, 30)
            shade = tuple(int(c) for c in rng.integers(0, 255, 3))
            draw.rectangle((x0, y0, x0 + s, y0 + s), fill=shade)
    return image


def make_demo_dataset(out_dir: str | Path, *, seed: int = 0) -> Path:
    """Write the demo data root into out_dir (created; existing demo files are overwritten). Returns the path."""
    root = Path(out_dir)
    rng = np.random.default_rng(seed)
    for number, (folder, (count, subject, colour, multiplier, loss_scale)) in enumerate(
        DEMO_CONCEPTS.items()
    ):
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            size = _SIZES[(i + number) % len(_SIZES)]
            ext = _FORMATS[i % len(_FORMATS)]
            image = _draw(subject, colour, size, rng)
            if folder == "objects/red_cube":  # caption from the file name, cut at the first "_"
                image.save(root / folder / f"{subject}_{i:03d}{ext}")
            else:
                stem = f"{Path(folder).name}_{i:03d}"
                image.save(root / folder / f"{stem}{ext}")
                detail = ("smiling", "outdoors", "close-up", "in profile")[i % 4]
                (root / folder / f"{stem}.txt").write_text(f"{subject}, {detail}\n", encoding="utf-8")
        if multiplier is not None or loss_scale is not None:
            write_concept_values(root, folder, multiplier=multiplier, loss_scale=loss_scale)
    return root
