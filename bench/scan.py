"""Scanning a data root of 100,000 small images: edtools' scan against reading every image with PIL.

Builds a temporary tree (removed at the end): 100 folders, JPEG and PNG images of 16 sizes (some with EXIF
orientation 6), a caption .txt beside every third image. Each image kind is encoded once and its bytes copied.

(a) cold: no manifest (deleted before every round). edtools' scan vs an EveryDream2-style loop (os.walk, then for
    every image Image.open(p).size and the EXIF orientation check, and its caption file read) vs a bare os.walk +
    os.stat of every file. Goal: scan >= 3x faster than the PIL loop.
(b) warm: the manifest written by a scan is present. Goal: scan <= 2x the bare walk + stat.
(c) slow storage, simulated: every header read sleeps --latency-ms first (a network drive's round trip), on
    --slow-images images: reads in this thread (workers=1) vs edtools' automatic thread pool.

Arms alternate within every round; best and median of wall time and of this process's CPU time are printed (CPU
time is the steadier measure on a shared machine). The page cache stays warm throughout (dropping it needs root),
so cold means no manifest, not files fetched from disk. `--images N` scales the tree.
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

import edtools.dataset.images as scanimages
import edtools.dataset.scan as ds

SIZES = ((64, 48), (48, 64), (64, 64), (80, 48), (48, 80), (72, 56), (56, 72), (96, 64))


def encoded_images() -> list[tuple[str, bytes, tuple[int, int]]]:
    """(extension, bytes, upright size) for each kind: 8 sizes x JPEG/PNG, every fourth JPEG EXIF-rotated."""
    rng = np.random.default_rng(0)
    kinds = []
    for k, (w, h) in enumerate(SIZES):
        pixels = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        for ext in (".jpg", ".png"):
            buffer = io.BytesIO()
            size = (w, h)
            if ext == ".jpg" and k % 4 == 0:
                exif = image.getexif()
                exif[0x0112] = 6
                image.save(buffer, "JPEG", quality=85, exif=exif)
                size = (h, w)
            else:
                image.save(buffer, "JPEG" if ext == ".jpg" else "PNG", quality=85)
            kinds.append((ext, buffer.getvalue(), size))
    return kinds


def build_tree(root: Path, n_images: int, n_folders: int = 100) -> dict[str, tuple[int, int]]:
    """Write the tree; returns {relative path: upright size} of every image."""
    kinds = encoded_images()
    expected = {}
    per_folder = -(-n_images // n_folders)
    written = 0
    for f in range(n_folders):
        folder = root / f"concept_{f:03d}" / ("sub" if f % 10 == 9 else "")
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(min(per_folder, n_images - written)):
            ext, data, size = kinds[(i * 7 + f) % len(kinds)]
            name = f"img_{i:05d}{ext}"
            with open(folder / name, "wb") as out:
                out.write(data)
            if i % 3 == 0:
                with open(folder / f"img_{i:05d}.txt", "w", encoding="utf-8") as out:
                    out.write(f"a photo of concept {f}, number {i}\n")
            expected[(folder / name).relative_to(root).as_posix()] = size
            written += 1
    return expected


def everydream_loop(root: Path) -> int:
    """What an EveryDream2-style trainer does to learn sizes: open every image with PIL, read its size, check
    the EXIF orientation (ImageOps.exif_transpose's test), read its caption file."""
    n = 0
    for folder, _, files in os.walk(root):
        names = set(files)
        for name in files:
            stem, ext = os.path.splitext(name)
            if ext.lower() not in ds.IMAGE_EXTENSIONS:
                continue
            with Image.open(os.path.join(folder, name)) as image:
                width, height = image.size
                if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):
                    width, height = height, width
            if stem + ".txt" in names:
                with open(os.path.join(folder, stem + ".txt"), encoding="utf-8") as f:
                    f.read()
            n += 1
    return n


def walk_and_stat(root: Path) -> int:
    """The floor for any scan that notices changed files: list every folder and stat every file."""
    n = 0
    for folder, _, files in os.walk(root):
        for name in files:
            os.stat(os.path.join(folder, name))
            n += 1
    return n


def drop_manifest(root: Path) -> None:
    (root / ds.MANIFEST_NAME).unlink(missing_ok=True)


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads)."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def rounds(arms: dict, n_rounds: int, before=None) -> dict[str, list[tuple[float, float]]]:
    """Run the arms n_rounds times, rotating their order each round."""
    names = list(arms)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    for r in range(n_rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            if before is not None:
                before(name)
            times[name].append(timed(arms[name]))
    return times


def show(times: dict[str, list[tuple[float, float]]], cpu: bool = True) -> None:
    for name, runs in times.items():
        wall = [w for w, _ in runs]
        line = f"  {name:30s} wall best {min(wall):7.3f} s  median {statistics.median(wall):7.3f} s"
        if cpu:
            used = [c for _, c in runs]
            line += f"   CPU best {min(used):7.3f} s  median {statistics.median(used):7.3f} s"
        print(line)


def ratio(label: str, slow: list, fast: list, goal: str, cpu: bool = True) -> None:
    parts = []
    for k, kind in ((0, "wall"), (1, "CPU"))[: 2 if cpu else 1]:
        a, b = [t[k] for t in slow], [t[k] for t in fast]
        parts.append(
            f"{kind} {min(a) / min(b):.2f}x best, {statistics.median(a) / statistics.median(b):.2f}x median"
        )
    print(f"  {label}: {';  '.join(parts)}   (goal {goal})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=100_000)
    parser.add_argument("--cold-rounds", type=int, default=3)
    parser.add_argument("--warm-rounds", type=int, default=5)
    parser.add_argument("--slow-images", type=int, default=2000)
    parser.add_argument("--latency-ms", type=float, default=2.0)
    args = parser.parse_args()

    base = Path(tempfile.mkdtemp(prefix="edtools-bench-scan-"))
    try:
        root = base / "data"
        start = time.perf_counter()
        expected = build_tree(root, args.images)
        n_files = sum(len(files) for _, _, files in os.walk(root))
        print(
            f"{len(expected):,} images ({n_files:,} files with captions) in {root}, "
            f"written in {time.perf_counter() - start:.1f} s; {os.cpu_count()} CPUs"
        )

        result = ds.scan(root)  # correctness first
        sizes = zip(result.dataset.widths.tolist(), result.dataset.heights.tolist(), strict=True)
        got = dict(zip(result.dataset.paths, sizes, strict=True))
        assert got == expected and not result.problems, "scan disagrees with the sizes written"
        assert everydream_loop(root) == len(expected)

        print(f"\n(a) cold scan, no manifest, {args.cold_rounds} rounds")
        cold = rounds(
            {
                "edtools scan": lambda: ds.scan(root),
                "PIL loop (EveryDream2-style)": lambda: everydream_loop(root),
                "bare os.walk + os.stat": lambda: walk_and_stat(root),
            },
            args.cold_rounds,
            before=lambda name: drop_manifest(root),
        )
        show(cold)
        ratio("PIL loop / edtools scan", cold["PIL loop (EveryDream2-style)"], cold["edtools scan"], ">= 3x")

        print(f"\n(b) warm re-scan, manifest present, {args.warm_rounds} rounds")
        ds.scan(root)
        warm = rounds(
            {"edtools scan": lambda: ds.scan(root), "bare os.walk + os.stat": lambda: walk_and_stat(root)},
            args.warm_rounds,
        )
        show(warm)
        ratio(
            "edtools scan / bare walk + stat", warm["edtools scan"], warm["bare os.walk + os.stat"], "<= 2x"
        )
        best = min(w for w, _ in warm["edtools scan"])
        print(f"  edtools warm re-scan of {len(expected):,} images: {best:.3f} s best (goal < 1 s)")

        if args.slow_images:
            print(
                f"\n(c) slow storage, simulated: {args.latency_ms:g} ms per header read, "
                f"{args.slow_images:,} images, 3 rounds"
            )
            slow_root = base / "slow"
            build_tree(slow_root, args.slow_images, n_folders=10)
            real = scanimages.image_size

            def slow_image_size(path):
                time.sleep(args.latency_ms / 1000)
                return real(path)

            scanimages.image_size = slow_image_size
            try:
                slow = rounds(
                    {
                        "workers=1 (this thread)": lambda: ds.scan(slow_root, workers=1),
                        "automatic (thread pool)": lambda: ds.scan(slow_root),
                    },
                    3,
                    before=lambda name: drop_manifest(slow_root),
                )
            finally:
                scanimages.image_size = real
            show(slow, cpu=False)
            ratio(
                "this thread / thread pool",
                slow["workers=1 (this thread)"],
                slow["automatic (thread pool)"],
                "-",
                cpu=False,
            )
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
