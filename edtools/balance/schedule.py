"""Each epoch's exact training order: multiplier counts, aspect buckets, batches and shards.

The schedule of epoch e is a pure function of (dataset, seed, e, batch_size, buckets): nothing carries over in memory.
"""

from __future__ import annotations

import math
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

from ..dataset.scan import MAX_IMAGES_PER_EPOCH, Dataset

__all__ = [
    "EpochSchedule",
    "assign_buckets",
    "build_epoch",
    "epoch_images",
    "expected_images_per_epoch",
    "fractional_count",
    "make_buckets",
    "shard",
    "write_schedule",
]

# Tags keep the random streams for different purposes independent of each other.
_TAG_CYCLE, _TAG_SHUFFLE, _TAG_BATCH_ORDER = 1, 2, 3


# ---------------------------------------------------------------------------------------------------------
# How many images of a concept an epoch holds


def _split_multiplier(multiplier: float) -> tuple[int, Fraction]:
    """Whole repeats and the exact fractional part, read from the decimal the user typed (0.05, not 0.0500..03)."""
    exact = Fraction(repr(float(multiplier)))
    whole = math.floor(exact)
    return whole, exact - whole


def _cumulative_picks(n_images: int, fraction: Fraction, epoch: int) -> int:
    """Fractional picks made before `epoch`: floor(epoch * fraction * n + 1/2), in exact integers.

    Consecutive differences are floor or ceil of fraction*n, and the running total never drifts more than 1/2
    from the exact share (error diffusion without state: any epoch is computed on its own).
    """
    x = fraction * n_images
    return (2 * epoch * x.numerator + x.denominator) // (2 * x.denominator)


def fractional_count(n_images: int, multiplier: float, epoch: int) -> int:
    """Images added in `epoch` by the fractional part of the multiplier (each image adds whole repeats too)."""
    _, fraction = _split_multiplier(multiplier)
    return _cumulative_picks(n_images, fraction, epoch + 1) - _cumulative_picks(n_images, fraction, epoch)


def expected_images_per_epoch(dataset: Dataset) -> np.ndarray:
    """n_images x multiplier per concept: the long-run average each epoch reaches exactly up to rounding."""
    return np.array([c.n_images * c.multiplier for c in dataset.concepts], dtype=np.float64)


# ---------------------------------------------------------------------------------------------------------
# Which images the fractional part picks: a stream of per-cycle permutations


def _concept_key(path: str) -> int:
    """A stable number per concept folder, so adding a folder does not reshuffle the others."""
    return zlib.crc32(path.encode("utf-8"))


class _CycleOrders:
    """Order of the folder in each cycle of the fractional stream, computed forward and cached.

    Cycle c is a fresh permutation of the folder; when an epoch straddles the end of cycle c-1, the head of
    cycle c is filled with images not in that epoch's tail, so no epoch holds an image twice from this stream.
    Sequential epochs cost one permutation per cycle; jumping back recomputes from cycle 0.
    """

    def __init__(self, max_entries: int = 4096):
        self.cache: OrderedDict[tuple, tuple[int, np.ndarray, np.ndarray | None]] = OrderedDict()
        self.max_entries = max_entries

    def orders(self, seed: int, key: int, n: int, fraction: Fraction, cycles: range) -> dict[int, np.ndarray]:
        cache_key = (seed, key, n, fraction)
        cached = self.cache.pop(cache_key, None)
        if cached is not None and cached[0] <= cycles.start:
            cycle, current, previous = cached
        elif cached is not None and cached[0] - 1 == cycles.start and cached[2] is not None:
            cycle, current, previous = cached[0] - 1, cached[2], None
        else:
            cycle, current, previous = 0, self._permutation(seed, key, n, 0), None
        out = {}
        while True:
            if cycle in cycles:
                out[cycle] = current
            if cycle >= cycles.stop - 1:
                break
            previous, current = current, self._next(seed, key, n, fraction, cycle + 1, current)
            cycle += 1
        self.cache[cache_key] = (cycle, current, previous)
        if len(self.cache) > self.max_entries:
            self.cache.popitem(last=False)
        return out

    @staticmethod
    def _permutation(seed: int, key: int, n: int, cycle: int) -> np.ndarray:
        return np.random.default_rng([seed, _TAG_CYCLE, key, cycle]).permutation(n)

    def _next(
        self, seed: int, key: int, n: int, fraction: Fraction, cycle: int, prev: np.ndarray
    ) -> np.ndarray:
        order = self._permutation(seed, key, n, cycle)
        boundary = cycle * n
        x = fraction * n
        # The epoch holding position `boundary`: C(e) <= boundary < C(e+1).
        e = max(0, math.floor(boundary / x) - 2)
        while _cumulative_picks(n, fraction, e + 1) <= boundary:
            e += 1
        tail = boundary - _cumulative_picks(n, fraction, e)
        head = _cumulative_picks(n, fraction, e + 1) - boundary
        if tail == 0 or head == 0:
            return order
        taken = np.zeros(n, dtype=bool)
        taken[prev[n - tail :]] = True
        free = order[~taken[order]][:head]  # head <= n - tail, so there are always enough
        in_head = np.zeros(n, dtype=bool)
        in_head[free] = True
        return np.concatenate([free, order[~in_head[order]]])


_CYCLES = _CycleOrders()


def _check_epoch_size(dataset: Dataset, multipliers: list[tuple[int, Fraction]], epoch: int) -> None:
    """Raise ValueError before anything is allocated when the epoch holds more than MAX_IMAGES_PER_EPOCH images
    (exact integer count): the schedule never allocates more than the epoch it describes, so an absurd
    multiplier that got this far (a Dataset built by hand) must not become gigabytes of image numbers."""
    sizes = [
        whole * c.n_images
        + _cumulative_picks(c.n_images, fraction, epoch + 1)
        - _cumulative_picks(c.n_images, fraction, epoch)
        for c, (whole, fraction) in zip(dataset.concepts, multipliers, strict=True)
    ]
    total = sum(sizes)
    if total > MAX_IMAGES_PER_EPOCH:
        big = max(range(len(sizes)), key=sizes.__getitem__)
        c = dataset.concepts[big]
        raise ValueError(
            f"epoch {epoch} would hold {total:,} images, more than the limit of {MAX_IMAGES_PER_EPOCH:,} images "
            f"per epoch (the most from '{c.path}': {c.n_images} images x multiplier {c.multiplier:g} = "
            f"{sizes[big]:,}); lower the multipliers"
        )


def epoch_images(dataset: Dataset, seed: int, epoch: int) -> np.ndarray:
    """The epoch's multiset of image numbers (unshuffled): k whole repeats of every image of a concept with
    multiplier k+f, plus its fractional picks for this epoch. int64."""
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    multipliers = [_split_multiplier(c.multiplier) for c in dataset.concepts]
    _check_epoch_size(dataset, multipliers, epoch)
    whole = np.array([w for w, _ in multipliers], dtype=np.int64)
    parts = [np.repeat(np.arange(len(dataset), dtype=np.int64), whole[dataset.concept_index])]
    starts = np.searchsorted(dataset.concept_index, np.arange(len(dataset.concepts)))
    for i, (concept, (_, fraction)) in enumerate(zip(dataset.concepts, multipliers, strict=True)):
        if fraction == 0:
            continue
        n = concept.n_images
        lo = _cumulative_picks(n, fraction, epoch)
        hi = _cumulative_picks(n, fraction, epoch + 1)
        if hi == lo:
            continue
        cycles = range(lo // n, (hi - 1) // n + 1)
        orders = _CYCLES.orders(seed, _concept_key(concept.path), n, fraction, cycles)
        stream = np.concatenate([orders[c] for c in cycles])
        offset = cycles.start * n
        parts.append(stream[lo - offset : hi - offset] + starts[i])
    return np.concatenate(parts)


# ---------------------------------------------------------------------------------------------------------
# Aspect-ratio buckets


def make_buckets(resolution: int, max_aspect: float = 2.0, step: int = 64) -> tuple[tuple[int, int], ...]:
    """(width, height) buckets of about resolution^2 pixels, sides multiples of `step`, sorted by aspect."""
    if resolution <= 0 or resolution % step:
        raise ValueError(f"resolution must be a positive multiple of {step}, got {resolution}")
    if max_aspect < 1:
        raise ValueError(f"max_aspect must be >= 1, got {max_aspect}")
    area = resolution * resolution
    found = {(resolution, resolution)}
    for width in range(resolution + step, int(resolution * max_aspect) + step, step):
        height = (area // width) // step * step
        if height >= step and width / height <= max_aspect:
            found.add((width, height))
            found.add((height, width))
    return tuple(sorted(found, key=lambda wh: wh[0] / wh[1]))


def assign_buckets(
    widths: np.ndarray, heights: np.ndarray, buckets: tuple[tuple[int, int], ...]
) -> np.ndarray:
    """Index of the bucket whose aspect ratio is nearest (in log space) to each image's. int16."""
    bucket_log = np.log(np.array([w / h for w, h in buckets], dtype=np.float64))
    image_log = np.log(np.asarray(widths, dtype=np.float64) / np.asarray(heights, dtype=np.float64))
    right = np.clip(np.searchsorted(bucket_log, image_log), 1, len(buckets) - 1) if len(buckets) > 1 else None
    if right is None:
        return np.zeros(len(image_log), dtype=np.int16)
    left = right - 1
    nearer_left = (image_log - bucket_log[left]) <= (bucket_log[right] - image_log)
    return np.where(nearer_left, left, right).astype(np.int16)


# ---------------------------------------------------------------------------------------------------------
# The epoch schedule


@dataclass(frozen=True, eq=False)
class EpochSchedule:
    """One epoch in training order: batch b holds image_index[batch_offsets[b]:batch_offsets[b+1]].

    batch_weight is 1 for real batches and 0 for the filler batch a short rank gets in `shard`.
    """

    epoch: int
    seed: int
    batch_size: int
    buckets: tuple[tuple[int, int], ...]
    image_index: np.ndarray  # int64, training order
    batch_offsets: np.ndarray  # int64, n_batches + 1
    batch_bucket: np.ndarray  # int16, bucket per batch
    batch_weight: np.ndarray  # float32, per batch

    @property
    def n_batches(self) -> int:
        return len(self.batch_offsets) - 1

    def __len__(self) -> int:
        return self.n_batches

    def batch(self, b: int) -> np.ndarray:
        return self.image_index[self.batch_offsets[b] : self.batch_offsets[b + 1]]

    def batch_size_of(self, b: int) -> tuple[int, int]:
        """(width, height) of batch b's bucket."""
        return self.buckets[int(self.batch_bucket[b])]

    def trained_images(self) -> np.ndarray:
        """Image numbers that really train (filler batches left out), in order."""
        lengths = np.diff(self.batch_offsets)
        real = np.repeat(self.batch_weight > 0, lengths)
        return self.image_index[real]

    def images_per_concept(self, dataset: Dataset) -> np.ndarray:
        """How many images of each concept this epoch trains. int64."""
        return np.bincount(dataset.concept_index[self.trained_images()], minlength=len(dataset.concepts))


def build_epoch(
    dataset: Dataset,
    *,
    epoch: int,
    seed: int,
    batch_size: int,
    resolution: int | None = None,
    buckets: tuple[tuple[int, int], ...] | None = None,
) -> EpochSchedule:
    """Shuffle the epoch's images, group them by bucket, cut batches (a bucket's last may be short: nothing
    is dropped or duplicated) and shuffle the batch order."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if buckets is None:
        if resolution is None:
            raise ValueError("give resolution (e.g. 512) or an explicit bucket list")
        buckets = make_buckets(resolution)
    items = epoch_images(dataset, seed, epoch)
    items = items[np.random.default_rng([seed, _TAG_SHUFFLE, epoch]).permutation(len(items))]
    bucket_of_image = assign_buckets(dataset.widths, dataset.heights, buckets)
    item_bucket = bucket_of_image[items]
    by_bucket = np.argsort(item_bucket, kind="stable")
    items, item_bucket = items[by_bucket], item_bucket[by_bucket]

    per_bucket = np.bincount(item_bucket, minlength=len(buckets)).astype(np.int64)
    batches_per_bucket = -(-per_bucket // batch_size)
    bucket_start = np.concatenate([[0], np.cumsum(per_bucket)[:-1]])
    first_batch = np.concatenate([[0], np.cumsum(batches_per_bucket)[:-1]])
    n_batches = int(batches_per_bucket.sum())
    batch_bucket = np.repeat(np.arange(len(buckets)), batches_per_bucket)
    within = np.arange(n_batches) - first_batch[batch_bucket]
    starts = bucket_start[batch_bucket] + within * batch_size
    ends = np.minimum(starts + batch_size, (bucket_start + per_bucket)[batch_bucket])

    order = np.random.default_rng([seed, _TAG_BATCH_ORDER, epoch]).permutation(n_batches)
    lengths = (ends - starts)[order]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(starts[order] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return EpochSchedule(
        epoch=epoch,
        seed=seed,
        batch_size=batch_size,
        buckets=tuple(buckets),
        image_index=items[gather],
        batch_offsets=offsets,
        batch_bucket=batch_bucket[order].astype(np.int16),
        batch_weight=np.ones(n_batches, dtype=np.float32),
    )


def shard(schedule: EpochSchedule, rank: int, world_size: int) -> EpochSchedule:
    """Rank `rank`'s batches: every world_size-th one, so ranks are disjoint and together cover the epoch.

    Every rank gets the same number of batches (ranks step in lockstep); a rank left short gets a filler
    batch with weight 0 instead of training an image twice.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    n = schedule.n_batches
    mine = np.arange(rank, n, world_size)
    per_rank = -(-n // world_size)
    weights = np.ones(len(mine), dtype=np.float32)
    if len(mine) < per_rank:  # n > 0 here, so batch 0 exists to lend its shape
        mine = np.append(mine, 0)
        weights = np.append(weights, np.float32(0))
    lengths = np.diff(schedule.batch_offsets)[mine]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    gather = np.repeat(schedule.batch_offsets[mine] - offsets[:-1], lengths) + np.arange(offsets[-1])
    return EpochSchedule(
        epoch=schedule.epoch,
        seed=schedule.seed,
        batch_size=schedule.batch_size,
        buckets=schedule.buckets,
        image_index=schedule.image_index[gather],
        batch_offsets=offsets,
        batch_bucket=schedule.batch_bucket[mine],
        batch_weight=weights,
    )


def write_schedule(schedule: EpochSchedule, dataset: Dataset, out_dir: str | Path) -> Path:
    """Write ep{N}_batch_schedule.txt: one line per image in training order, tab-separated:
    batch index, bucket WxH, concept folder, image path relative to data_root (always the last field)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    file = out / f"ep{schedule.epoch}_batch_schedule.txt"
    lengths = np.diff(schedule.batch_offsets)
    batch_of_item = np.repeat(np.arange(schedule.n_batches), lengths)
    bucket_names = [f"{w}x{h}" for w, h in schedule.buckets]
    concept_paths = dataset.concept_paths
    lines = []
    for b, i in zip(batch_of_item.tolist(), schedule.image_index.tolist(), strict=True):
        bucket = bucket_names[schedule.batch_bucket[b]]
        lines.append(f"{b}\t{bucket}\t{concept_paths[dataset.concept_index[i]]}\t{dataset.paths[i]}\n")
    file.write_text("".join(lines), encoding="utf-8")
    return file
