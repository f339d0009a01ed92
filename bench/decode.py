"""Decoding one image for a bucket: edtools' decode_image against plain PIL.

Plain PIL is what a straightforward loader does: Image.open, convert("RGB"), resize with LANCZOS to the size that
covers the bucket, crop. decode_image does the same job and more (EXIF orientation, any mode, a [-1, 1] float
tensor) with the JPEG decoder's own downscaling (draft), a whole-factor reduce before Lanczos for other formats,
the resize computed only for the kept region, and no copies that change nothing.

Cases (images written to a temporary folder, removed at the end):
  photo JPEG: 3000x2000, quality 90, photo-like content (1/f noise and hard-edged shapes, ~2 MB) -> 768x512
  photo PNG:  the same pixels as PNG -> 768x512
  small JPEG: 640x480 -> 512x512 bucket (scaled up to 683x512, centre cut)

Goal: the photo JPEG >= 2.5x faster than plain PIL. Quality: mean absolute difference from the plain-PIL result,
in 0..255 levels (goal < 2). Arms alternate; wall and CPU time (torch on 1 thread, as in loader workers).
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from edtools.data import decode_image, plan_crop


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Photo-like pixels: 1/f ("pink") noise in correlated colours, plus flat shapes with hard edges."""
    rng = np.random.default_rng(seed)
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    f = np.sqrt(fx**2 + fy**2)
    f[0, 0] = 1.0
    channels = []
    for _ in range(3):
        spectrum = (rng.normal(size=f.shape) + 1j * rng.normal(size=f.shape)) / f
        spectrum[0, 0] = 0
        plane = np.fft.irfft2(spectrum, s=(height, width))
        channels.append(plane / plane.std())
    mix = np.array([[1, 0.8, 0.6], [0.1, 1, 0.2], [0.1, 0.3, 1]]) / 1.6
    pixels = np.stack(channels, 2) @ mix * 45 + 120 + rng.normal(0, 2, (height, width, 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(60):
        x, y = int(rng.integers(0, width)), int(rng.integers(0, height))
        w, h = (int(v) for v in rng.integers(20, 400, 2))
        draw.rectangle([x, y, x + w, y + h], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return image


def plain_pil(path: Path, crop) -> Image.Image:
    with Image.open(path) as image:
        image = image.convert("RGB")
    image = image.resize(crop.cover, Image.Resampling.LANCZOS)
    return image.crop((crop.left, crop.top, crop.left + crop.size[0], crop.top + crop.size[1]))


def timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(1)

    base = Path(tempfile.mkdtemp(prefix="edtools-bench-decode-"))
    try:
        big = photo(3000, 2000)
        cases = []
        path = base / "photo.jpg"
        big.save(path, quality=90)
        cases.append(("photo JPEG 3000x2000 -> 768x512", path, (768, 512)))
        path = base / "photo.png"
        big.save(path)
        cases.append(("photo PNG 3000x2000 -> 768x512", path, (768, 512)))
        path = base / "small.jpg"
        photo(640, 480, seed=1).save(path, quality=90)
        cases.append(("small JPEG 640x480 -> 512x512", path, (512, 512)))

        for label, path, (width, height) in cases:
            with Image.open(path) as image:
                size = image.size
                crop = plan_crop(*size, width, height)
                decoded = image.size
                if image.format == "JPEG":
                    image.draft("RGB", crop.cover)
                    decoded = image.size
            reference = np.asarray(plain_pil(path, crop), dtype=np.float64)
            ours = (
                (decode_image(path, crop).permute(1, 2, 0).numpy().astype(np.float64) + 1) * 127.5
            ).round()
            difference = np.abs(ours - reference)

            arms = {
                "plain PIL": lambda path=path, crop=crop: plain_pil(path, crop),
                "decode_image": lambda path=path, crop=crop: decode_image(path, crop),
            }
            times: dict[str, list[tuple[float, float]]] = {name: [] for name in arms}
            names = list(arms)
            for r in range(args.rounds):
                for name in names[r % 2 :] + names[: r % 2]:
                    times[name].append(timed(arms[name]))

            print(f"\n{label}  ({path.stat().st_size / 1e6:.2f} MB; decoded at {decoded[0]}x{decoded[1]})")
            for name, runs in times.items():
                wall = [w * 1e3 for w, _ in runs]
                cpu = [c * 1e3 for _, c in runs]
                print(
                    f"  {name:13s} wall best {min(wall):7.1f} ms  median {statistics.median(wall):7.1f} ms"
                    f"   CPU best {min(cpu):7.1f} ms  median {statistics.median(cpu):7.1f} ms"
                )
            parts = []
            for k, kind in ((0, "wall"), (1, "CPU")):
                a = [t[k] for t in times["plain PIL"]]
                b = [t[k] for t in times["decode_image"]]
                parts.append(
                    f"{kind} {min(a) / min(b):.2f}x best, {statistics.median(a) / statistics.median(b):.2f}x median"
                )
            print(f"  plain / decode_image: {';  '.join(parts)}")
            print(
                f"  difference from plain PIL: mean {difference.mean():.3f}, "
                f"99th percentile {np.percentile(difference, 99):.0f}, max {difference.max():.0f} (0..255 levels)"
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
