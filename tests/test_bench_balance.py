"""The fine-tuning balance bench (bench/balance_effect.py): its records read as written, its comparison paired
per seed, and at a tiny size every arm trained from one cached base model."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def be(monkeypatch):
    """bench/balance_effect.py as a module (bench/ on sys.path, as when the script runs)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import balance_effect

    return balance_effect


@pytest.fixture
def cmp(be):
    """bench/balance_compare.py: the arms and their comparison."""
    import balance_compare

    return balance_compare


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def fake_run(cmp, arm: str, seed: int, rare: float, common: float = 0.5, preservation: float = 0.3) -> dict:
    loss = {c: common for c in cmp.COMMON} | {cmp.RARE: rare, cmp.PRESERVATION: preservation}
    return {
        "arm": arm,
        "seed": seed,
        "loss": loss,
        "start": dict.fromkeys(cmp.CONCEPTS, 0.29),
        "gap": dict.fromkeys(cmp.CONCEPTS),
        "bleed": dict.fromkeys(cmp.CONCEPTS),
    }


def test_records_give_loss_forgetting_and_gap_and_bleed_only_where_written(be, tmp_path, cmp):
    rows = [[step, 0, c, 0.5 - step / 100, 4] for step in (0, 8) for c in cmp.CONCEPTS]
    write_csv(tmp_path / "validation.csv", ["step", "epoch", "concept", "loss", "images"], rows)
    run = be.read_run(tmp_path, 8)
    assert run["loss"] == dict.fromkeys(cmp.CONCEPTS, 0.42) and run["start"] == dict.fromkeys(
        cmp.CONCEPTS, 0.5
    )
    assert run["gap"] == dict.fromkeys(cmp.CONCEPTS) and run["bleed"] == dict.fromkeys(cmp.CONCEPTS)
    # with the metrics records: gap from validation.csv, bleed as the mean margin at bleed.csv's last step
    header = ["step", "epoch", "concept", "loss", "images", "train_loss", "gap"]
    gaps = [[*r, 0.3, "" if r[0] == 8 and r[2] == "zqx_star" else 0.1 + r[0] / 100] for r in rows]
    write_csv(tmp_path / "validation.csv", header, gaps)
    bleed = [
        [4, 0, cmp.RARE, "zqx_star", 0.9],
        [8, 1, cmp.RARE, "zqx_star", 0.2],
        [8, 1, cmp.RARE, "vmb_ring", 0.4],
    ]
    write_csv(tmp_path / "bleed.csv", ["step", "epoch", "concept", "under", "margin"], bleed)
    run = be.read_run(tmp_path, 8)
    assert run["gap"] == dict.fromkeys(cmp.CONCEPTS, 0.18) | {"zqx_star": 0.1}  # its last gap: at step 0
    assert run["bleed"][cmp.RARE] == pytest.approx(0.3) and run["bleed"]["zqx_star"] is None
    with pytest.raises(RuntimeError, match="no validation at step 9"):
        be.read_run(tmp_path, 9)


def test_table_compares_arms_per_seed_and_says_what_is_missing(cmp):
    runs = [fake_run(cmp, "none", s, 0.5) for s in (1, 2, 3)]
    runs += [fake_run(cmp, "multiply10", s, r) for s, r in ((1, 0.4), (2, 0.45), (3, 0.6))]
    text = cmp.table(runs)
    assert "| multiply10 | 0.5000 ± 0.0000 | 0.5000 ± 0.0000 | 0.4833 ± 0.1041 |" in text
    assert "| multiply10 | 0.0000 ± 0.0000 (0/3) | 0.0000 ± 0.0000 (0/3) | -0.0167 ± 0.1041 (2/3) |" in text
    assert "| none | n/a | n/a |" in text  # gap and bleed not recorded
    with pytest.raises(ValueError, match=r"arm multiply10 lacks seed\(s\) \[3\]"):
        cmp.table(runs[:-1])


def test_verdict_checks_auto_against_none_and_the_best_fixed_arm(cmp):
    seeds = range(1, 7)
    runs = [fake_run(cmp, "none", s, 0.5 + s / 100) for s in seeds]
    runs += [fake_run(cmp, "multiply3", s, 0.45 + s / 100) for s in seeds]
    runs += [fake_run(cmp, "multiply10", s, 0.55) for s in seeds]
    assert cmp.verdict(runs) == ["target: not checked (no auto arm)"]
    good = runs + [fake_run(cmp, "auto", s, 0.44 + s / 100 + (0.1 if s == 6 else 0)) for s in seeds]
    lines = cmp.verdict(good)
    assert "rare (kdr_bowtie): auto <= multiply3 in 5 of 6 seeds (need 5)" in lines
    assert lines[-1] == "target met (best fixed arm on the rare concept: multiply3)"
    worse = runs + [fake_run(cmp, "auto", s, 0.4, common=0.6) for s in seeds]  # rare better, common worse
    assert cmp.verdict(worse)[-1].startswith("target NOT met")


@pytest.fixture
def one_thread():
    """One torch thread, as the bench runs: on a busy 2-core machine more threads spin and run many times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
def test_tiny_bench_trains_every_arm_from_one_cached_base_model(be, tmp_path, one_thread, cmp):
    said = []
    runs = be.bench([3], be.QUICK, tmp_path / "cache", say=said.append)
    expected = [a.name for a in cmp.ARMS if not a.auto or be.auto_available()]
    assert [r["arm"] for r in runs] == expected
    if not be.auto_available():
        assert said[0] == "auto arm skipped: this edtools's TrainConfig has no auto_balance field"
    # paired: every arm starts from the same base model on the same held-out images and noise
    assert all(r["start"] == runs[0]["start"] for r in runs)
    # and the arms trained differently (the balance reached the training); auto10 starts as multiply10 does
    # and may not have changed anything in these few steps
    distinct = [r for r in runs if r["arm"] != "auto10"]
    assert len({r["loss"][cmp.RARE] for r in distinct}) == len(distinct)
    text = cmp.table(runs)
    assert all(f"| {name} | " in text for name in expected)
    # the base model is cached by seed and settings: asked again, it is not trained again
    started = time.monotonic()
    again = be.pretrain(3, be.QUICK, tmp_path / "cache")
    assert time.monotonic() - started < 1 and (again / "model_index.json").is_file()
    assert len(list((tmp_path / "cache").iterdir())) == 1
