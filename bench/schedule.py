"""Time to build one epoch's batched schedule for 1,000,000 images in 1,000 folders.

Mixed multipliers (1, 2.5, 0.05, 1.2, 0.5, 3), 4 aspect buckets, batch 4. The last line is the seconds (median).
"""

from __future__ import annotations

import statistics
import time

import numpy as np

import edtools.balance.schedule as schedule
from edtools.dataset.scan import synthetic_dataset

MULTIPLIERS = (1, 2.5, 0.05, 1.2, 0.5, 3)
BUCKETS = ((512, 512), (576, 448), (448, 576), (640, 384))


def main(repeats: int = 5) -> float:
    spec = {f"folder_{i:04d}": (1000, MULTIPLIERS[i % len(MULTIPLIERS)]) for i in range(1000)}
    dataset = synthetic_dataset(spec, sizes=BUCKETS)
    print(f"{len(dataset):,} images in {len(dataset.concepts)} folders, buckets {BUCKETS}, batch 4")
    times = []
    for epoch in range(repeats):
        schedule._CYCLES = schedule._CycleOrders()  # cold: no cached permutations from earlier epochs
        start = time.perf_counter()
        built = schedule.build_epoch(dataset, epoch=epoch, seed=555, batch_size=4, buckets=BUCKETS)
        times.append(time.perf_counter() - start)
    expected = schedule.expected_images_per_epoch(dataset).sum()
    print(
        f"epoch {built.epoch}: {len(built.image_index):,} images (expected {expected:,.0f}), {built.n_batches:,} batches"
    )
    print(
        f"per epoch, cold cache: min {min(times):.3f} s, median {statistics.median(times):.3f} s over {repeats}"
    )
    assert np.array_equal(
        np.sort(built.image_index), np.sort(schedule.epoch_images(dataset, 555, built.epoch))
    )
    print(f"{statistics.median(times):.3f}")
    return statistics.median(times)


if __name__ == "__main__":
    main()
