"""The exact multiply scheduler: counts, coverage, determinism, buckets, batches, shards, schedule files.

The seed document's examples first, then golden counts and properties over random data roots (hypothesis).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import edtools.balance.schedule as schedule_module
from edtools.balance.schedule import (
    _CycleOrders,
    assign_buckets,
    build_epoch,
    epoch_images,
    fractional_count,
    make_buckets,
    shard,
    write_schedule,
)
from edtools.dataset.scan import load_dataset, synthetic_dataset

FOUR_BUCKETS = ((512, 512), (576, 448), (448, 576), (640, 384))


def counts(dataset, items):
    return np.bincount(dataset.concept_index[items], minlength=len(dataset.concepts))


def per_image(dataset, items):
    return np.bincount(items, minlength=len(dataset))


def fractional_picks(dataset, items, whole):
    """The images an epoch holds beyond `whole` repeats of each (one concept's fractional part)."""
    extra = per_image(dataset, items) - whole
    assert extra.min() >= 0 and extra.max() <= 1
    return np.flatnonzero(extra)


@pytest.fixture(autouse=True)
def fresh_cycle_cache(monkeypatch):
    monkeypatch.setattr(schedule_module, "_CYCLES", _CycleOrders())


# --- the seed document's examples ---------------------------------------------------------------------------


def test_balancing_200_and_50_times_4():
    dataset = synthetic_dataset({"A": (200, 1), "B": (50, 4)})
    for epoch in range(5):
        items = epoch_images(dataset, seed=1, epoch=epoch)
        assert counts(dataset, items).tolist() == [200, 200]
        assert set(per_image(dataset, items)[200:]) == {4}


def test_100_images_at_2_5_every_image_twice_plus_50_distinct():
    dataset = synthetic_dataset({"A": (100, 2.5)})
    seen_extra = []
    for epoch in range(6):
        items = epoch_images(dataset, seed=3, epoch=epoch)
        assert len(items) == 250
        times = per_image(dataset, items)
        assert times.min() == 2 and times.max() == 3
        assert (times == 3).sum() == 50
        seen_extra.append(set(np.flatnonzero(times == 3)))
    # the fractional halves cover the folder before repeating: epochs 0+1, 2+3, 4+5 each cover all 100
    for a, b in zip(seen_extra[::2], seen_extra[1::2], strict=True):
        assert a.isdisjoint(b) and len(a | b) == 100


def test_preservation_1000_at_0_05_gives_50_per_epoch_and_covers_all_in_20_epochs():
    dataset = synthetic_dataset({"train": (200, 1), "preservation": (1000, 0.05)})
    seen = np.zeros(len(dataset), dtype=int)
    for epoch in range(20):
        items = epoch_images(dataset, seed=555, epoch=epoch)
        assert counts(dataset, items).tolist() == [200, 50]
        seen += per_image(dataset, items)
    assert np.all(seen[200:] == 1)  # every preservation image exactly once, none twice
    assert np.all(seen[:200] == 20)


def test_small_fraction_beside_a_large_folder_is_never_starved():
    dataset = synthetic_dataset({"big": (200, 1), "small": (10, 0.1)})
    picked = []
    for epoch in range(30):
        items = epoch_images(dataset, seed=9, epoch=epoch)
        assert counts(dataset, items).tolist() == [200, 1]
        picked.extend(fractional_picks(dataset, items, np.r_[np.ones(200, int), np.zeros(10, int)]).tolist())
    for cycle in range(3):  # each block of 10 epochs shows every image once
        assert sorted(picked[cycle * 10 : cycle * 10 + 10]) == list(range(200, 210))


def test_default_multiplier_trains_every_image_once(tree):
    dataset = load_dataset(tree({"a": 3, "a/b": 2}))
    for epoch in range(3):
        assert np.all(per_image(dataset, epoch_images(dataset, seed=0, epoch=epoch)) == 1)


# --- golden counts (derived by hand from floor(e * f * n + 1/2)) ------------------------------------------


@pytest.mark.parametrize(
    ("n", "multiplier", "expected"),
    [
        (
            7,
            0.3,
            [2, 2, 2, 2, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 3],
        ),  # 2.1 per epoch: cumulative 0,2,4,6,8,11,13,...,29,32
        (10, 0.05, [1, 0, 1, 0, 1, 0]),  # 0.5 per epoch
        (3, 1.9, [3 + 3, 3 + 2, 3 + 3, 3 + 3, 3 + 3]),  # 3 whole + 2.7: cumulative 0,3,5,8,11,14
        (1000, 0.05, [50] * 5),
        (100, 2.5, [250] * 4),
        (6, 4.0, [24] * 3),
    ],
)
def test_golden_per_epoch_counts(n, multiplier, expected):
    whole = math.floor(multiplier)
    got = [whole * n + fractional_count(n, multiplier, e) for e in range(len(expected))]
    assert got == expected
    dataset = synthetic_dataset({"c": (n, multiplier)})
    assert [len(epoch_images(dataset, seed=1, epoch=e)) for e in range(len(expected))] == expected


def test_running_total_stays_within_one_of_the_exact_share():
    for n, multiplier in [(7, 0.3), (13, 0.37), (999, 0.123), (5, 2.71), (10, 0.999)]:
        fraction = multiplier - math.floor(multiplier)
        total = 0
        for e in range(200):
            count = fractional_count(n, multiplier, e)
            assert count in (math.floor(fraction * n), math.ceil(fraction * n))
            total += count
            assert abs(total - (e + 1) * fraction * n) <= 1


# --- no duplicates inside an epoch, coverage before repeats -----------------------------------------------


def assert_covers_before_repeating(n, multiplier, seed, epochs):
    """After every epoch, no image's count of fractional picks is ahead of another's by more than one: the
    stream is a sequence of whole permutations, and no epoch holds an image twice."""
    dataset = synthetic_dataset({"c": (n, multiplier)})
    whole = math.floor(multiplier)
    seen = np.zeros(n, dtype=int)
    for epoch in range(epochs):
        seen[fractional_picks(dataset, epoch_images(dataset, seed=seed, epoch=epoch), whole)] += 1
        assert seen.max() - seen.min() <= 1, (epoch, seen)
    return seen


@pytest.mark.parametrize(
    ("n", "multiplier"), [(10, 0.3), (10, 0.7), (3, 0.9), (10, 1.9), (7, 0.45), (4, 0.99)]
)
def test_fractional_picks_distinct_within_epoch_and_cover_before_repeating(n, multiplier):
    seen = assert_covers_before_repeating(n, multiplier, seed=4, epochs=40)
    assert seen.sum() == sum(fractional_count(n, multiplier, e) for e in range(40))


# --- determinism: epoch e is a function of (dataset, seed, e) ---------------------------------------------


def test_epoch_computed_alone_equals_epoch_computed_in_sequence(monkeypatch):
    dataset = synthetic_dataset({"a": (10, 0.7), "b": (13, 1.45), "c": (50, 1)}, sizes=FOUR_BUCKETS)
    sequential = [
        build_epoch(dataset, epoch=e, seed=7, batch_size=3, buckets=FOUR_BUCKETS) for e in range(12)
    ]
    for e in (11, 3, 7, 0):
        monkeypatch.setattr(schedule_module, "_CYCLES", _CycleOrders())
        alone = build_epoch(dataset, epoch=e, seed=7, batch_size=3, buckets=FOUR_BUCKETS)
        assert np.array_equal(alone.image_index, sequential[e].image_index)
        assert np.array_equal(alone.batch_offsets, sequential[e].batch_offsets)
    other_seed = build_epoch(dataset, epoch=3, seed=8, batch_size=3, buckets=FOUR_BUCKETS)
    assert not np.array_equal(other_seed.image_index, sequential[3].image_index)


def test_adding_a_folder_does_not_change_another_folders_picks():
    before = synthetic_dataset({"pres": (100, 0.1), "a": (5, 1)})
    after = synthetic_dataset({"pres": (100, 0.1), "a": (5, 1), "new": (7, 1)})
    for epoch in range(4):
        picks_before = np.sort(
            epoch_images(before, seed=2, epoch=epoch)[
                before.concept_index[epoch_images(before, 2, epoch)] == 0
            ]
        )
        items_after = epoch_images(after, seed=2, epoch=epoch)
        picks_after = np.sort(items_after[after.concept_index[items_after] == 0])
        assert np.array_equal(picks_before, picks_after)


# --- buckets and batches -------------------------------------------------------------------------------------


def test_buckets_have_equal_area_and_64_multiples():
    buckets = make_buckets(512)
    assert (512, 512) in buckets
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0
        assert 0.8 * 512 * 512 <= w * h <= 512 * 512
        assert max(w / h, h / w) <= 2.0
    with pytest.raises(ValueError, match="multiple of 64"):
        make_buckets(500)


def test_images_go_to_the_nearest_aspect_bucket():
    buckets = make_buckets(512)
    widths = np.array([1000, 100, 300, 640])
    heights = np.array([1000, 300, 100, 384])
    got = [buckets[i] for i in assign_buckets(widths, heights, buckets)]
    assert got[0] == (512, 512)
    assert got[1][0] < got[1][1] and got[2][0] > got[2][1]
    assert got[3] == (640, 384)


def check_batches(dataset, schedule, items):
    """Batches hold exactly the epoch's multiset; one bucket per batch; only a bucket's last batch is short."""
    assert np.array_equal(np.sort(schedule.image_index), np.sort(items))
    bucket_of_image = assign_buckets(dataset.widths, dataset.heights, schedule.buckets)
    short_per_bucket = {}
    for b in range(schedule.n_batches):
        members = schedule.batch(b)
        assert 1 <= len(members) <= schedule.batch_size
        assert set(bucket_of_image[members].tolist()) == {schedule.batch_bucket[b]}
        if len(members) < schedule.batch_size:
            short_per_bucket[int(schedule.batch_bucket[b])] = (
                short_per_bucket.get(int(schedule.batch_bucket[b]), 0) + 1
            )
    assert all(v == 1 for v in short_per_bucket.values())
    per_bucket = np.bincount(bucket_of_image[items], minlength=len(schedule.buckets))
    assert schedule.n_batches == sum(math.ceil(c / schedule.batch_size) for c in per_bucket)


def test_no_image_dropped_or_duplicated_at_bucket_edges():
    dataset = synthetic_dataset(
        {"a": (23, 1.5), "b": (9, 0.3), "c": (41, 2)}, sizes=FOUR_BUCKETS[:3] + ((640, 384), (300, 900))
    )
    for epoch in range(5):
        schedule = build_epoch(dataset, epoch=epoch, seed=11, batch_size=4, buckets=FOUR_BUCKETS)
        check_batches(dataset, schedule, epoch_images(dataset, seed=11, epoch=epoch))
        assert np.array_equal(schedule.images_per_concept(dataset), counts(dataset, schedule.image_index))


def test_batch_order_is_shuffled_across_buckets():
    dataset = synthetic_dataset({"a": (400, 1)}, sizes=FOUR_BUCKETS)
    schedule = build_epoch(dataset, epoch=0, seed=1, batch_size=4, buckets=FOUR_BUCKETS)
    changes = np.count_nonzero(np.diff(schedule.batch_bucket.astype(int)))
    assert changes > schedule.n_batches // 2  # not grouped bucket after bucket


# --- shards ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("world_size", [1, 2, 3, 5])
def test_shards_are_disjoint_equal_length_and_cover_every_batch(world_size):
    dataset = synthetic_dataset({"a": (37, 1), "b": (11, 0.5)}, sizes=FOUR_BUCKETS)
    full = build_epoch(dataset, epoch=2, seed=5, batch_size=4, buckets=FOUR_BUCKETS)
    shards = [shard(full, r, world_size) for r in range(world_size)]
    assert len({s.n_batches for s in shards}) == 1
    trained = np.concatenate([s.trained_images() for s in shards])
    assert np.array_equal(np.sort(trained), np.sort(full.image_index))
    fillers = sum(int((s.batch_weight == 0).sum()) for s in shards)
    assert fillers == shards[0].n_batches * world_size - full.n_batches
    for s in shards:
        assert s.batch_weight[:-1].min(initial=1) == 1  # a filler only ever comes last


def test_shard_rejects_bad_ranks():
    dataset = synthetic_dataset({"a": (4, 1)})
    full = build_epoch(dataset, epoch=0, seed=0, batch_size=2, resolution=512)
    with pytest.raises(ValueError, match="rank"):
        shard(full, 2, 2)


# --- schedule files --------------------------------------------------------------------------------------------


def test_write_schedule_one_line_per_image_path_last(tree, tmp_path):
    root = tree({"people/a": 5, "style": 3}, sizes=((64, 64), (64, 96)))
    (root / "people" / "a" / "multiply.txt").write_text("2")
    dataset = load_dataset(root)
    schedule = build_epoch(dataset, epoch=3, seed=1, batch_size=2, resolution=512)
    file = write_schedule(schedule, dataset, tmp_path / "out")
    assert file.name == "ep3_batch_schedule.txt"
    lines = file.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 5 * 2 + 3
    fields = [line.split("\t") for line in lines]
    assert [f[-1] for f in fields] == [dataset.paths[i] for i in schedule.image_index]
    assert all((root / f[-1]).is_file() for f in fields)
    batch_numbers = [int(f[0]) for f in fields]
    assert batch_numbers == sorted(batch_numbers) and batch_numbers[-1] == schedule.n_batches - 1
    assert {f[1] for f in fields} <= {f"{w}x{h}" for w, h in schedule.buckets}


# --- properties over random data roots ---------------------------------------------------------------------------

multipliers = st.one_of(
    st.sampled_from([0.01, 0.05, 0.1, 0.3, 0.5, 0.9, 1, 1.2, 1.5, 2, 2.5, 3, 4]),
    st.floats(min_value=0.01, max_value=5, allow_nan=False)
    .map(lambda x: round(x, 3))
    .filter(lambda x: x > 0),
)
specs = st.dictionaries(
    st.text(alphabet="abcdefgh/", min_size=1, max_size=6).filter(
        lambda s: not s.startswith("/") and "//" not in s
    ),
    st.tuples(st.integers(min_value=1, max_value=40), multipliers),
    min_size=1,
    max_size=6,
)


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 2**31 - 1), epoch=st.integers(0, 30), batch_size=st.integers(1, 6))
def test_properties_exact_counts_batches_and_determinism(spec, seed, epoch, batch_size):
    dataset = synthetic_dataset(spec, sizes=((512, 512), (400, 600), (700, 350), (512, 500)))
    items = epoch_images(dataset, seed=seed, epoch=epoch)
    times = per_image(dataset, items)
    for i, c in enumerate(dataset.concepts):
        whole = math.floor(c.multiplier)
        share = (c.multiplier - whole) * c.n_images
        mine = times[dataset.concept_index == i]
        assert mine.min() >= whole and mine.max() <= whole + 1  # fractional picks are distinct
        assert mine.sum() - whole * c.n_images in (math.floor(share), math.ceil(share))
    schedule = build_epoch(dataset, epoch=epoch, seed=seed, batch_size=batch_size, buckets=FOUR_BUCKETS)
    check_batches(dataset, schedule, items)
    schedule_module._CYCLES = _CycleOrders()
    again = build_epoch(dataset, epoch=epoch, seed=seed, batch_size=batch_size, buckets=FOUR_BUCKETS)
    assert np.array_equal(again.image_index, schedule.image_index)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 30), multiplier=multipliers, seed=st.integers(0, 1000))
def test_property_coverage_before_any_repeat(n, multiplier, seed):
    assert_covers_before_repeating(n, multiplier, seed=seed, epochs=25)


def test_an_epoch_with_no_images_is_empty_not_an_error():
    dataset = synthetic_dataset({"a": (1, 0.1)})
    sizes = [build_epoch(dataset, epoch=e, seed=0, batch_size=2, resolution=512).n_batches for e in range(10)]
    assert sizes == [0, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # 0.1 of one image: once in ten epochs
    empty = build_epoch(dataset, epoch=0, seed=0, batch_size=2, resolution=512)
    assert [shard(empty, r, 2).n_batches for r in range(2)] == [0, 0]


def test_an_epoch_beyond_the_limit_is_refused_before_anything_is_allocated():
    import dataclasses
    import tracemalloc

    from edtools.dataset.scan import MAX_IMAGES_PER_EPOCH

    dataset = synthetic_dataset({"people/bob": (6, 1), "style": (3, 0.5)})
    bob = dataclasses.replace(dataset.concepts[0], multiplier=1e9)  # past the checks of scan and with_values
    huge = dataclasses.replace(dataset, concepts=(bob, dataset.concepts[1]))
    tracemalloc.start()
    try:
        with pytest.raises(ValueError) as info:
            build_epoch(huge, epoch=0, seed=0, batch_size=2, resolution=512)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(info.value) == (
        "epoch 0 would hold 6,000,000,002 images, more than the limit of 10,000,000 images per epoch (the most "
        "from 'people/bob': 6 images x multiplier 1e+09 = 6,000,000,000); lower the multipliers"
    )
    assert peak < 1 << 20  # refused from the counts alone: not one array of the epoch was made
    with pytest.raises(ValueError, match="more than the limit"):
        epoch_images(huge, seed=0, epoch=3)

    # exactly at the limit is allowed (counted exactly, fractional picks included)
    at_limit = synthetic_dataset({"a": (4, MAX_IMAGES_PER_EPOCH / 8), "b": (2, MAX_IMAGES_PER_EPOCH / 4)})
    assert sum(c.images_per_epoch for c in at_limit.concepts) == MAX_IMAGES_PER_EPOCH
    schedule_module._check_epoch_size(
        at_limit, [schedule_module._split_multiplier(c.multiplier) for c in at_limit.concepts], 0
    )
