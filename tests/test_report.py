"""Balance reports: table rows and totals, actual counts from real schedules, readable histograms.

The PNG is decoded back to check it is a real, non-empty picture that grows with the number of concepts.
"""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from edtools.balance.report import actual_images_per_concept, balance_rows, format_table, plot_balance
from edtools.dataset.scan import synthetic_dataset


@pytest.fixture
def dataset():
    return synthetic_dataset(
        {"A": (200, 1), "B": (50, 4), "pres": (1000, 0.05), "style": (40, 1, 0.5)},
        sizes=((512, 512), (448, 576)),
    )


def test_rows_expected_share_and_effective_weight(dataset):
    rows = {r.concept: r for r in balance_rows(dataset, batch_size=4)}
    assert rows["B"].images_per_epoch == 200
    assert rows["pres"].images_per_epoch == pytest.approx(50)
    total = 200 + 200 + 50 + 40
    assert rows["A"].share == pytest.approx(200 / total)
    assert rows["style"].effective_weight == pytest.approx(20)
    assert rows["A"].steps_per_epoch == 50
    assert sum(r.share for r in rows.values()) == pytest.approx(1)


def test_table_lists_every_folder_and_totals(dataset):
    text = format_table(dataset, batch_size=4, steps_per_epoch=125)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["concept", "images", "multiply", "loss_scale"]
    for name in ("A", "B", "pres", "style"):
        assert any(line.startswith(name + " ") for line in lines)
    total = lines[-1].split()
    assert total[0] == "total" and total[1] == "1290" and total[2] == "490" and total[-1] == "125"


def test_actual_counts_come_from_real_schedules(dataset):
    actual = actual_images_per_concept(dataset, seed=1, epochs=3, batch_size=4, resolution=512)
    assert actual.shape == (3, 4)
    assert np.all(actual == np.array([200, 200, 50, 40]))


def test_histogram_png_is_readable_with_many_concepts(tmp_path):
    small = synthetic_dataset({"a": (10, 1), "b": (5, 2)})
    many = synthetic_dataset({f"concept_{i:02d}": (10 + i, 1 + (i % 3) * 0.5) for i in range(40)})
    out_small, out_many = tmp_path / "small.png", tmp_path / "many.png"
    plot_balance(small, out=out_small)
    actual = actual_images_per_concept(many, seed=0, epochs=4, batch_size=4, resolution=512)
    fig = plot_balance(many, actual, out=out_many)
    with Image.open(out_small) as a, Image.open(out_many) as b:
        assert b.height > 2 * a.height  # grows with the number of concepts
        assert np.asarray(b.convert("L")).std() > 10  # not a blank picture
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert len(labels) == 40
    # sorted: the largest expected count is at the top (last tick)
    expected = {c.path: c.images_per_epoch for c in many.concepts}
    assert expected[labels[-1]] == max(expected.values())
