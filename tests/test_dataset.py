"""Scanning: images, captions, sizes, multiply.txt / loss_scale.txt values, misnamings and bad files.

Every data root is built in code from small real images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_image
from PIL import Image

from edtools.dataset import (
    MANIFEST_NAME,
    DatasetError,
    load_dataset,
    parse_multiplier,
    scan,
    write_concept_values,
)


def concept(dataset, path):
    return next(c for c in dataset.concepts if c.path == path)


def test_recursive_walk_finds_every_image_once_with_default_multiplier(tree):
    root = tree({"a": 3, "a/sub": 2, "b/c/d": 4})
    make_image(root / "root_level.JPG")
    make_image(root / "b" / "upper.PNG")
    make_image(root / "b" / "pic.webp")
    make_image(root / "b" / "pic2.bmp")
    (root / "b" / "notes.md").write_text("not an image")
    dataset = load_dataset(root)
    assert len(dataset) == 3 + 2 + 4 + 1 + 3
    assert sorted(dataset.concept_paths) == [".", "a", "a/sub", "b", "b/c/d"]
    assert all(c.multiplier == 1.0 and c.loss_scale == 1.0 for c in dataset.concepts)
    assert len(set(dataset.paths)) == len(dataset)
    # concept_index is grouped: each concept's images are contiguous
    assert np.all(np.diff(dataset.concept_index) >= 0)


def test_hidden_folders_and_manifest_are_skipped(tree):
    root = tree({"a": 2, ".ipynb_checkpoints": 3})
    dataset = load_dataset(root)
    assert dataset.concept_paths == ("a",)


def test_multiply_does_not_cascade_into_subfolders(tree):
    root = tree({"people": 4, "people/kids": 3})
    (root / "people" / "multiply.txt").write_text("3")
    dataset = load_dataset(root)
    assert concept(dataset, "people").multiplier == 3.0
    assert concept(dataset, "people/kids").multiplier == 1.0


def test_captions_from_sidecar_or_file_name(tree):
    root = tree({})
    make_image(root / "x" / "a photo of bob_001.png")
    make_image(root / "x" / "img2.png")
    (root / "x" / "img2.txt").write_text("  sidecar caption \n", encoding="utf-8")
    make_image(root / "x" / "img3.jpg")
    (root / "x" / "img3.caption").write_text("caption file", encoding="utf-8")
    dataset = load_dataset(root)
    captions = dict(zip(dataset.paths, dataset.captions, strict=True))
    assert captions["x/a photo of bob_001.png"] == "a photo of bob"
    assert captions["x/img2.png"] == "sidecar caption"
    assert captions["x/img3.jpg"] == "caption file"


def test_sizes_from_header_including_exif_rotation(tree):
    root = tree({})
    make_image(root / "s" / "wide.png", 96, 48)
    image = Image.new("RGB", (80, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90: the picture trains as 40 x 80
    image.save(root / "s" / "rotated.jpg", exif=exif)
    dataset = load_dataset(root)
    sizes = {
        p: (int(w), int(h)) for p, w, h in zip(dataset.paths, dataset.widths, dataset.heights, strict=True)
    }
    assert sizes["s/wide.png"] == (96, 48)
    assert sizes["s/rotated.jpg"] == (40, 80)


def test_manifest_cache_is_used_and_invalidated(tree, monkeypatch):
    root = tree({"a": 3})
    scan(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert len(manifest["entries"]) == 3

    import edtools.dataset as ds

    calls = []
    real = ds._image_size
    monkeypatch.setattr(ds, "_image_size", lambda p: calls.append(p) or real(p))
    scan(root)
    assert calls == []  # re-scan only stats
    make_image(root / "a" / "a_001.png", 32, 16)  # changed file: new size and mtime
    dataset = scan(root).dataset
    assert [p.name for p in calls] == ["a_001.png"]
    i = dataset.paths.index("a/a_001.png")
    assert (dataset.widths[i], dataset.heights[i]) == (32, 16)


def test_manifest_caches_captions_until_the_sidecar_changes(tree):
    root = tree({"a": 2})
    (root / "a" / "a_000.txt").write_text("first caption")
    assert scan(root).dataset.captions[0] == "first caption"
    assert json.loads((root / MANIFEST_NAME).read_text())["captions"]["a/a_000.txt"][2] == "first caption"
    (root / "a" / "a_000.txt").write_text("a longer second caption")
    assert scan(root).dataset.captions[0] == "a longer second caption"
    (root / "a" / "a_000.txt").unlink()
    assert scan(root).dataset.captions[0] == "a"
    assert json.loads((root / MANIFEST_NAME).read_text())["captions"] == {}


def test_log_line_per_applied_file(tree):
    root = tree({"people/person_b": 50, "style": 4})
    (root / "people" / "person_b" / "multiply.txt").write_text("4\n")
    (root / "style" / "loss_scale.txt").write_text("0.5")
    result = scan(root)
    assert "multiply.txt in 'people/person_b' = 4: 50 images -> 200 per epoch" in result.log
    assert any(line.startswith("loss_scale.txt in 'style' = 0.5: 4 images") for line in result.log)
    assert len(result.log) == 2


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("0", "not > 0"),
        ("-2", "not > 0"),
        ("nan", "not a finite number"),
        ("inf", "not a finite number"),
        ("", "empty"),
        ("   \n", "empty"),
        ("two", "not a number"),
        ("0,5", "write '0.5'"),
        ("1 2", "not a number"),
    ],
)
def test_bad_multiply_values_are_errors_naming_file_and_value(tree, text, hint):
    root = tree({"a": 2, "b": 2})
    (root / "a" / "multiply.txt").write_text(text)
    result = scan(root)
    assert len(result.errors) == 1
    error = result.errors[0]
    assert error.path == "a/multiply.txt"
    assert hint in error.message
    assert "> 0" in error.message  # says what is allowed
    with pytest.raises(DatasetError, match="a/multiply.txt"):
        result.raise_for_errors()


@pytest.mark.parametrize("text", ["2", "0.05", " 1.5 \n", "1e-1", "\ufeff3", "10.0"])
def test_good_multiply_values(text):
    assert parse_multiplier(text) == float(text.strip().lstrip("\ufeff"))


def test_loss_scale_values(tree):
    root = tree({"zero": 1, "neg": 1, "bad": 1, "ok": 1})
    (root / "zero" / "loss_scale.txt").write_text("0")
    (root / "neg" / "loss_scale.txt").write_text("-0.5")
    (root / "bad" / "loss_scale.txt").write_text("1,5")
    (root / "ok" / "loss_scale.txt").write_text("2.5")
    result = scan(root)
    by_path = {p.path: p for p in result.problems}
    assert by_path["zero/loss_scale.txt"].severity == "warning"
    assert by_path["neg/loss_scale.txt"].severity == "warning"
    assert "extreme caution" in by_path["neg/loss_scale.txt"].message
    assert by_path["bad/loss_scale.txt"].severity == "error"
    assert "1.5" in by_path["bad/loss_scale.txt"].message
    assert concept(result.dataset, "ok").loss_scale == 2.5
    assert concept(result.dataset, "neg").loss_scale == -0.5


@pytest.mark.parametrize(
    ("name", "target"),
    [
        ("multiply.txt.txt", "multiply.txt"),
        ("Multiply.TXT", "multiply.txt"),
        ("multiply.text", "multiply.txt"),
        ("multiply", "multiply.txt"),
        ("multiplier.txt", "multiply.txt"),
        ("loss-scale.txt", "loss_scale.txt"),
        ("loss_scale.txt.txt", "loss_scale.txt"),
        ("Loss_Scale.txt", "loss_scale.txt"),
        ("lossscale.txt", "loss_scale.txt"),
    ],
)
def test_misnamed_files_warn_with_the_fix_and_are_not_applied(tree, name, target):
    root = tree({"a": 2})
    (root / "a" / name).write_text("3")
    result = scan(root)
    warnings = [p for p in result.warnings if p.path == f"a/{name}"]
    assert len(warnings) == 1
    assert f"rename it to '{target}'" in warnings[0].message
    assert concept(result.dataset, "a").multiplier == 1.0
    assert not result.errors


def test_all_problems_reported_together(tree):
    root = tree({"a": 1, "b": 1, "c": 1})
    (root / "a" / "multiply.txt").write_text("0")
    (root / "b" / "multiply.txt.txt").write_text("2")
    (root / "c" / "loss_scale.txt").write_text("x")
    (root / "c" / "broken.jpg").write_bytes(b"not a jpeg at all")
    (root / "c" / "empty.png").write_bytes(b"")
    result = scan(root)
    paths = sorted(p.path for p in result.problems)
    assert paths == [
        "a/multiply.txt",
        "b/multiply.txt.txt",
        "c/broken.jpg",
        "c/empty.png",
        "c/loss_scale.txt",
    ]
    with pytest.raises(DatasetError) as info:
        result.raise_for_errors()
    assert "a/multiply.txt" in str(info.value) and "c/loss_scale.txt" in str(info.value)


def test_corrupt_images_are_skipped_not_fatal(tree):
    root = tree({"a": 2})
    (root / "a" / "zero.jpg").write_bytes(b"")
    (root / "a" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    result = scan(root)
    assert not result.errors
    assert len(result.dataset) == 2
    assert {p.path for p in result.warnings} == {"a/zero.jpg", "a/garbage.png"}


def test_multiply_in_folder_without_images_warns(tree):
    root = tree({"people/a": 2})
    (root / "people" / "multiply.txt").write_text("2")
    result = scan(root)
    assert any(p.path == "people" and "does not cascade" in p.message for p in result.warnings)


def test_empty_root_is_an_error(tmp_path):
    result = scan(tmp_path)
    assert result.errors and "no images found" in result.errors[0].message
    with pytest.raises(DatasetError, match="not a folder"):
        scan(tmp_path / "missing")


def test_with_values_validates_and_replaces(tree):
    dataset = load_dataset(tree({"a": 2, "b": 3}))
    changed = dataset.with_values({"a": 2.5}, {"b": 0.5})
    assert concept(changed, "a").multiplier == 2.5 and concept(changed, "b").loss_scale == 0.5
    assert concept(dataset, "a").multiplier == 1.0  # original untouched
    with pytest.raises(DatasetError, match="unknown concept"):
        dataset.with_values({"zzz": 2})
    with pytest.raises(DatasetError, match="> 0"):
        dataset.with_values({"a": 0})
    with pytest.raises(DatasetError, match="finite"):
        dataset.with_values(loss_scales={"a": float("nan")})


def test_write_concept_values_round_trip(tree):
    root = tree({"a": 2, "b": 2})
    written = write_concept_values(root, "a", multiplier=0.05, loss_scale=1.5)
    assert sorted(p.name for p in written) == ["loss_scale.txt", "multiply.txt"]
    assert (root / "a" / "multiply.txt").read_text() == "0.05\n"
    dataset = load_dataset(root)
    assert concept(dataset, "a").multiplier == 0.05 and concept(dataset, "a").loss_scale == 1.5
    assert not (root / "b" / "multiply.txt").exists()
    with pytest.raises(DatasetError):
        write_concept_values(root, "a", multiplier=-1)
    with pytest.raises(DatasetError, match="outside"):
        write_concept_values(root, "../elsewhere", multiplier=2)
