"""Scanning: images, captions, sizes, multiply.txt / loss_scale.txt values, misnamings and bad files.

Every data root is built in code from small real images.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import concept, make_image, make_tree, scan_summary
from PIL import Image

from edtools.dataset.scan import (
    MANIFEST_NAME,
    DatasetError,
    load_dataset,
    parse_multiplier,
    scan,
    write_concept_values,
)


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

    import edtools.dataset.images as ds

    calls = []
    real = ds.image_size
    monkeypatch.setattr(ds, "image_size", lambda p: calls.append(p) or real(p))
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


# ---------------------------------------------------------------------------------------------------------
# Fast scanning: header reader, thread pool, incremental manifest


def every_case_tree(root):
    """A data root with every case the scan handles: rotated JPEGs, PNG EXIF before and after the pixels, other
    formats (read by PIL), broken and empty files, captions of each kind, folder values, misnamings."""
    import zlib

    make_tree(root, {"people/a": 5, "people/b": 3, "style": 4}, sizes=((64, 48), (40, 72)))
    for orientation in (1, 3, 6, 8):
        image = Image.new("RGB", (80, 40), (orientation * 20, 10, 10))
        exif = image.getexif()
        exif[0x0112] = orientation
        exif[0x010F] = "A camera maker with a long name"
        image.save(root / "people" / "a" / f"rotated_{orientation}.jpg", exif=exif)
    exif = Image.new("RGB", (1, 1)).getexif()
    exif[0x0112] = 6
    Image.new("RGB", (30, 20)).save(root / "style" / "early_exif.png", exif=exif)
    late = (root / "style" / "early_exif.png").read_bytes()
    start = late.index(b"eXIf") - 4
    length = int.from_bytes(late[start : start + 4], "big")
    chunk, late = late[start : start + 12 + length], late[:start] + late[start + 12 + length :]
    (root / "style" / "late_exif.png").write_bytes(late[:-12] + chunk + late[-12:])
    assert zlib.crc32(chunk[4:-4]) == int.from_bytes(chunk[-4:], "big")
    Image.new("RGB", (50, 30)).save(root / "style" / "other.webp")
    Image.new("RGB", (20, 60)).save(root / "style" / "other.bmp")
    make_image(root / "style" / "big.jpg", 600, 400)
    (root / "style" / "truncated.png").write_bytes((root / "style" / "style_000.png").read_bytes()[:200])
    (root / "style" / "garbage.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (root / "style" / "empty.png").write_bytes(b"")
    (root / "people" / "a" / "a_000.txt").write_text(
        "\ufeffa caption\r\nwith two lines\r\n", encoding="utf-8"
    )
    (root / "people" / "a" / "a_001.caption").write_text("from a .caption file")
    (root / "people" / "a" / "a_002.txt").write_bytes(b"\xff\xfe not utf-8")
    (root / "people" / "a" / "a_002.caption").write_text("the .txt is unreadable, so this one")
    (root / "people" / "a" / "a_003.txt").write_bytes("café, no .caption".encode("cp1252"))
    make_image(root / "people" / "b" / "multiply.png")
    (root / "people" / "b" / "multiply.txt").write_text("2")
    (root / "style" / "loss_scale.txt").write_text("0.5")
    (root / "style" / "Multiply.TXT").write_text("3")
    (root / "people" / "loss_scale.txt").write_text("2")
    make_image(root / ".hidden" / "x.png")
    return root


def test_parallel_sequential_and_cached_scans_agree_on_every_case(tmp_path):
    from edtools.dataset.imageheader import pil_image_size as _pil_image_size

    root = every_case_tree(tmp_path / "data")
    sequential = scan(root, workers=1, cache=False)
    for workers in (4, None):
        assert scan_summary(scan(root, workers=workers, cache=False)) == scan_summary(sequential)
    assert scan_summary(scan(root, workers=4)) == scan_summary(sequential)  # writes the manifest
    assert scan_summary(scan(root, workers=1)) == scan_summary(sequential)  # answered by the manifest

    d = sequential.dataset
    sizes = dict(zip(d.paths, zip(d.widths.tolist(), d.heights.tolist(), strict=True), strict=True))
    for path, size in sizes.items():
        assert size == _pil_image_size(root / path), path  # the sizes PIL reads, EXIF orientation applied
    assert sizes["people/a/rotated_6.jpg"] == sizes["people/a/rotated_8.jpg"] == (40, 80)
    assert sizes["people/a/rotated_3.jpg"] == (80, 40)
    assert sizes["style/early_exif.png"] == sizes["style/late_exif.png"] == (20, 30)
    assert sizes["style/other.webp"] == (50, 30) and sizes["style/other.bmp"] == (20, 60)
    captions = dict(zip(d.paths, d.captions, strict=True))
    assert captions["people/a/a_000.png"] == "a caption\nwith two lines"
    assert captions["people/a/a_001.png"] == "from a .caption file"
    assert captions["people/a/a_002.png"] == "the .txt is unreadable, so this one"
    assert captions["people/a/a_003.png"] == "café, no .caption"  # not UTF-8: read as cp1252, with a warning
    assert captions["people/b/multiply.png"] == "multiply"  # multiply.txt is a value, not its caption
    problems = {p.path: p.message for p in sequential.problems}
    assert set(problems) == {
        "people/a/a_002.txt",
        "people/a/a_003.txt",
        "style/truncated.png",
        "style/garbage.jpg",
        "style/empty.png",
        "style/Multiply.TXT",
        "people",
    }
    assert (
        problems["style/empty.png"] == "cannot read this image (the file is empty (0 bytes)); it is skipped"
    )
    assert problems["people/a/a_002.txt"] == (
        "this caption file is not UTF-8, so the caption comes from 'a_002.caption'; save it as UTF-8 to use it"
    )
    assert "read as cp1252" in problems["people/a/a_003.txt"]
    assert concept(d, "people/b").multiplier == 2.0 and concept(d, "style").loss_scale == 0.5


def test_header_reader_agrees_with_pil_or_defers(tmp_path):
    """The header reader answers for common JPEGs and PNGs and, when it answers at all, says what PIL says;
    damaged copies of every file are left to PIL or agree with it."""
    import random

    from edtools.dataset.imageheader import header_size as _header_size
    from edtools.dataset.imageheader import pil_image_size as _pil_image_size

    root = every_case_tree(tmp_path / "data")
    Image.new("CMYK", (33, 17)).save(root / "cmyk.jpg")
    Image.new("L", (21, 34)).save(root / "grey.jpg", progressive=True)
    image = Image.new("RGB", (45, 25))
    image.save(root / "xmp.jpg", xmp=b'<x tiff:Orientation="6"/>')
    image.save(root / "icc.jpg", icc_profile=b"\0" * 300, dpi=(300, 300))
    for mode in ("1", "L", "LA", "P", "RGBA", "I;16"):
        image.convert(mode).save(root / f"mode_{mode.replace(';', '')}.png")
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "steps 20")
    info.add_text("comment", "zipped", zip=True)
    info.add_itxt("title", "t\u00eftle")
    image.save(root / "text.png", pnginfo=info, dpi=(72, 72))

    rng = random.Random(0)
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in (".jpg", ".png"))
    answered = 0
    for path in files:
        data = path.read_bytes()
        fast = _header_size(path)
        if fast is not None and data:
            answered += 1
            assert fast == _pil_image_size(path), path
        for k in range(6):
            damaged = bytearray(data)
            if k < 2:
                damaged = damaged[: rng.randrange(len(data) + 1)]
            elif damaged:
                for _ in range(k - 1):
                    damaged[rng.randrange(min(len(damaged), 400))] = rng.randrange(256)
            copy = tmp_path / f"damaged{path.suffix}"
            copy.write_bytes(bytes(damaged))
            fast = _header_size(copy)
            if fast is not None and damaged:
                assert fast == _pil_image_size(copy), (path, k)
    assert answered >= len(files) - 8  # PIL decides only the odd ones (damaged, zTXt, XMP in PNG, ...)


def test_header_reader_tables_match_pil():
    from PIL import PngImagePlugin, TiffImagePlugin

    import edtools.dataset.imageheader as imageheader

    assert imageheader._PNG_MODES == set(PngImagePlugin._MODES)
    handled = {
        name[len("chunk_") :].encode() for name in dir(PngImagePlugin.PngStream) if name.startswith("chunk_")
    }
    assert imageheader._PNG_PIL_CHUNKS == handled
    loaders = TiffImagePlugin.ImageFileDirectory_v2._load_dispatch
    assert imageheader._TIFF_UNIT_SIZE == {kind: unit for kind, (unit, _) in loaders.items()}


@pytest.mark.parametrize("workers", [1, 4])
def test_interrupted_scan_keeps_the_headers_it_read(tree, monkeypatch, workers):
    import threading

    import edtools.dataset.images as ds

    root = tree({"a": 12, "b": 12})
    (root / "a" / "a_000.txt").write_text("a caption")
    real = ds.image_size
    read, lock = [], threading.Lock()

    def interrupted_after_10(path):
        with lock:
            if len(read) >= 10:
                raise KeyboardInterrupt
        size = real(path)
        with lock:
            read.append(path.name)
        return size

    monkeypatch.setattr(ds, "image_size", interrupted_after_10)
    with pytest.raises(KeyboardInterrupt):
        scan(root, workers=workers)
    saved = json.loads((root / MANIFEST_NAME).read_text())["entries"]
    assert len(saved) == len(read) >= 10  # every header read before the stop is kept

    again = []
    monkeypatch.setattr(ds, "image_size", lambda p: again.append(p.name) or real(p))
    result = scan(root, workers=workers)
    assert sorted(again + read) == sorted(p.rsplit("/", 1)[1] for p in result.dataset.paths)
    assert len(result.dataset) == 24 and result.dataset.captions[0] == "a caption"


def test_manifest_is_written_during_a_scan(tree, monkeypatch):
    """A scan killed outright (no chance to save at the end) leaves the manifest of its last periodic save."""
    import edtools.dataset.images as ds

    root = tree({"a": 30})
    monkeypatch.setattr("edtools.dataset.manifest._SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(ds, "_PROBE", 4)
    real = ds.image_size
    on_disk_at_kill: list[bytes] = []

    def killed_after_10(path, calls=[]):  # noqa: B006 (a counter across calls)
        calls.append(path)
        if len(calls) > 10:
            on_disk_at_kill.append((root / MANIFEST_NAME).read_bytes())
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(ds, "image_size", killed_after_10)
    with pytest.raises(KeyboardInterrupt):
        scan(root, workers=1)
    (root / MANIFEST_NAME).write_bytes(on_disk_at_kill[0])  # as if the process had died right then
    cached = json.loads(on_disk_at_kill[0])["entries"]
    # saved after a block of 4 headers (as soon as allowed, with _SAVE_EVERY_S 0), not only at the end
    assert len(cached) in (4, 8)

    again = []
    monkeypatch.setattr(ds, "image_size", lambda p: again.append(p) or real(p))
    assert len(scan(root).dataset) == 30
    assert len(again) == 30 - len(cached)


def test_headers_read_after_a_periodic_save_are_saved_too(tree, monkeypatch):
    import edtools.dataset.images as ds

    root = tree({"a": 20, "b": 20})
    (root / "b" / "b_003.txt").write_text("a caption")
    monkeypatch.setattr("edtools.dataset.manifest._SAVE_EVERY_S", 0.0)
    monkeypatch.setattr(ds, "_PROBE", 4)
    scan(root, workers=1)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert len(manifest["entries"]) == 40 and list(manifest["captions"]) == ["b/b_003.txt"]
    calls = []
    real = ds.image_size
    monkeypatch.setattr(ds, "image_size", lambda p: calls.append(p) or real(p))
    assert scan(root).dataset.captions[23] == "a caption" and calls == []


def test_slow_storage_moves_header_reads_to_threads(tree, monkeypatch):
    import threading
    import time

    import edtools.dataset.images as ds

    root = tree({"a": 40, "b": 40}, sizes=((64, 48), (30, 50)))
    reference = scan(root, workers=1, cache=False)
    real = ds.image_size
    threads = set()

    def slow(path):
        time.sleep(0.002)  # a network drive's round trip
        threads.add(threading.current_thread().name)
        return real(path)

    monkeypatch.setattr(ds, "image_size", slow)
    assert scan_summary(scan(root, cache=False)) == scan_summary(reference)
    assert "MainThread" in threads and any(name.startswith("edtools-scan") for name in threads)


def test_fast_storage_reads_in_this_thread(tree, monkeypatch):
    import threading

    import edtools.dataset.images as ds

    root = tree({"a": 80})
    monkeypatch.setattr(
        ds, "_SLOW_READ_S", 0.005
    )  # reads take ~0.05 ms here; a busy machine is not slow storage
    real = ds.image_size
    threads = set()
    monkeypatch.setattr(ds, "image_size", lambda p: threads.add(threading.current_thread().name) or real(p))
    scan(root)
    assert threads == {"MainThread"}
