"""Images per second of the data path alone: ScheduleBatches + make_loader over a synthetic data root, 512 px.

The data root (temporary, removed at the end) holds photo-like JPEGs of the sizes people upload: phone photos
(4032x3024 and 3024x4032), camera and web sizes (2048x1536, 1536x1024, 1024x1024) and some 1024x1024 PNGs, a
caption file beside every other image. One epoch's schedule at resolution 512 (aspect buckets), batch 4, random
crops and flips; batches are loaded with num_workers 0 and 2 (pin_memory off: CPU only), alternating.

The need it is compared with is an assumption, not a measurement: SD1.5 at 512 px, batch 4, fp16 on a Colab T4
trains at about 1.5-2 steps/s, so the loader must deliver 6-8 images/s. With num_workers 0 the images are decoded
in the training process between steps, so their time adds to every step; with workers they are decoded alongside.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from decode import photo  # noqa: E402

from edtools.balance.schedule import build_epoch  # noqa: E402
from edtools.data import ScheduleBatches, make_loader  # noqa: E402
from edtools.dataset.scan import load_dataset  # noqa: E402
from edtools.models import tiny_tokenizer  # noqa: E402

T4_NEED = (6.0, 8.0)  # images/s: SD1.5, 512 px, batch 4 at 1.5-2 steps/s on a T4 (assumption)
KINDS = (  # (folder, width, height, format, share of the images)
    ("phone", 4032, 3024, "JPEG", 3),
    ("phone", 3024, 4032, "JPEG", 2),
    ("camera", 2048, 1536, "JPEG", 2),
    ("camera", 1536, 1024, "JPEG", 2),
    ("web", 1024, 1024, "JPEG", 2),
    ("web", 1024, 1024, "PNG", 1),
)


def build_root(root: Path, n_images: int) -> None:
    rng = np.random.default_rng(0)
    base = photo(2048, 1536)
    blobs = []
    for folder, width, height, fmt, share in KINDS:
        image = (
            base.resize((width, height), Image.Resampling.BICUBIC) if (width, height) != base.size else base
        )
        if width > 2048 or height > 2048:  # detail finer than the upscaled base, as a phone photo has
            pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 4, (height, width, 3)).astype(np.int16)
            image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        path = root / f"blob_{width}x{height}.{fmt.lower()}"
        image.save(path, fmt, quality=90) if fmt == "JPEG" else image.save(path, fmt)
        blobs.extend([(folder, path, fmt)] * share)
    for i in range(n_images):
        folder, blob, fmt = blobs[i % len(blobs)]
        out = root / folder / f"img_{i:04d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        out.parent.mkdir(exist_ok=True)
        shutil.copyfile(blob, out)
        if i % 2 == 0:
            out.with_suffix(".txt").write_text(f"a photo, {folder}, number {i}", encoding="utf-8")
    for _, path, _ in set(blobs):
        path.unlink()


def run_epoch(batches: ScheduleBatches, workers: int) -> tuple[int, float, float]:
    """(images, seconds to the first batch, seconds for the rest)."""
    start = time.perf_counter()
    first = None
    images = 0
    for batch in make_loader(batches, num_workers=workers):
        images += len(batch["pixel_values"])
        if first is None:
            first = time.perf_counter()
    return images, first - start, time.perf_counter() - first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--resolution", type=int, default=512)
    args = parser.parse_args()
    torch.set_num_threads(1)  # one image-decoding core per loader process, as in a worker

    base = Path(tempfile.mkdtemp(prefix="edtools-bench-data-"))
    try:
        root = base / "data"
        root.mkdir()
        build_root(root, args.images)
        dataset = load_dataset(root)
        tokenizer = tiny_tokenizer(base / "tokenizer")
        schedule = build_epoch(dataset, epoch=0, seed=0, batch_size=args.batch, resolution=args.resolution)
        batches = ScheduleBatches(dataset, schedule, tokenizer, center_crop=False, flip_p=0.5, seed=0)
        buckets = sorted({tuple(schedule.batch_size_of(b)) for b in range(len(batches))})
        print(
            f"{len(dataset)} images ({', '.join(f'{w}x{h} {f}' for _, w, h, f, _ in KINDS)}), "
            f"{len(batches)} batches of {args.batch}, buckets {buckets}; {os.cpu_count()} CPUs"
        )
        rates: dict[int, list[float]] = {0: [], 2: []}
        starts: dict[int, list[float]] = {0: [], 2: []}
        for r in range(args.rounds):
            for workers in (0, 2) if r % 2 == 0 else (2, 0):
                images, to_first, rest = run_epoch(batches, workers)
                rates[workers].append((images - args.batch) / rest)
                starts[workers].append(to_first)
        low, high = T4_NEED
        print(f"assumed need: {low:g}-{high:g} images/s (SD1.5, 512 px, batch 4, 1.5-2 steps/s on a T4)")
        for workers, values in rates.items():
            best, median = max(values), statistics.median(values)
            print(
                f"  num_workers={workers}: {median:6.1f} images/s median, {best:6.1f} best "
                f"(after the first batch; first batch {statistics.median(starts[workers]):.2f} s);"
                f" {1000 * args.batch / median:5.0f} ms per batch of {args.batch}"
            )
        zero = statistics.median(rates[0])
        two = statistics.median(rates[2])
        print(
            f"  keeps up with a T4 on 2 CPUs: num_workers=2 {'yes' if two >= high else 'NO'} "
            f"({two / high:.1f}x the upper need);"
            f" num_workers=0 {'yes' if zero >= high else 'NO'} ({zero / high:.1f}x), but then each batch's"
            f" {1000 * args.batch / zero:.0f} ms of decoding is added to the step"
            f" (~{100 * (args.batch / zero) / (args.batch / low):.0f}% of a {1000 * args.batch / low:.0f} ms step)"
        )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
