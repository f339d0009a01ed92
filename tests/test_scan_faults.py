"""A scan that survives bad trees: symlink loops and broken links, truncated images, captions that are not UTF-8,
image files edtools does not train, absurd multipliers, and kohya-style folder names.

Every tree is built in code: real symlinks, real JPEG/PNG files cut short, real cp1252 bytes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import concept, make_image, make_tree, scan_summary

import edtools.dataset.images as scanimages
import edtools.dataset.scan as ds
from edtools.dataset.scan import (
    MANIFEST_NAME,
    MAX_IMAGES_PER_EPOCH,
    DatasetError,
    load_dataset,
    scan,
    synthetic_dataset,
)


def warnings_by_path(result):
    out = {}
    for p in result.warnings:
        assert p.path not in out, f"two warnings for {p.path}"
        out[p.path] = p.message
    return out


@pytest.fixture
def symlinks(tmp_path):
    """Skip where this system cannot make symbolic links (Windows without the privilege)."""
    try:
        os.symlink(tmp_path, tmp_path / "probe")
    except (OSError, NotImplementedError):
        pytest.skip("symbolic links are not available here")
    (tmp_path / "probe").unlink()


# ---------------------------------------------------------------------------------------------------------
# Symbolic links


def test_link_loops_are_not_followed_and_a_linked_folder_scans_once(tmp_path, symlinks):
    root = make_tree(tmp_path / "root", {"people/bob": 2, "style": 2})
    outside = make_tree(tmp_path / "outside", {"ext": 3})
    os.symlink(root, root / "people" / "loop")  # back to the data root
    os.symlink(root / "people", root / "people" / "bob" / "up")  # back to a parent
    os.symlink(outside / "ext", root / "ext1")  # a folder outside the data root: scanned through the link
    os.symlink(outside / "ext", root / "ext2")  # a second link to it: not again
    os.symlink(outside / "ext", outside / "ext" / "self")  # a loop inside the linked folder
    os.symlink(
        root / "style", root / "a_style_link"
    )  # a folder inside the data root, walked under its own path

    result = scan(root)
    assert not result.errors
    assert result.dataset.paths == (
        "ext1/ext_000.png",
        "ext1/ext_001.png",
        "ext1/ext_002.png",
        "people/bob/bob_000.png",
        "people/bob/bob_001.png",
        "style/style_000.png",
        "style/style_001.png",
    )
    assert result.dataset.concept_paths == (
        "ext1",
        "people/bob",
        "style",
    )  # the link's path names the concept
    assert warnings_by_path(result) == {
        "a_style_link": "is a link to 'style', which is scanned under its own path; not followed, so its images "
        "do not train twice",
        "ext2": f"is a link to '{outside / 'ext'}', a folder already scanned as 'ext1'; not followed, so its "
        "images do not train twice",
        "ext1/self": f"is a link to '{outside / 'ext'}', a folder that holds this link (a loop); not followed",
        "people/loop": "is a link to the data root, a folder that holds this link (a loop); not followed",
        "people/bob/up": "is a link to 'people', a folder that holds this link (a loop); not followed",
    }
    assert scan_summary(scan(root)) == scan_summary(result)  # the same from the manifest


def test_a_link_to_an_ancestor_of_the_data_root_is_a_loop(tmp_path, symlinks):
    root = make_tree(tmp_path / "data" / "root", {"a": 1})
    make_tree(tmp_path / "data", {"sibling": 2})
    os.symlink(tmp_path / "data", root / "a" / "everything")
    result = scan(root)
    assert result.dataset.paths == ("a/a_000.png",)
    assert warnings_by_path(result) == {
        "a/everything": f"is a link to '{tmp_path / 'data'}', a folder that holds this link (a loop); not followed"
    }


def test_an_image_reached_twice_through_links_trains_once(tmp_path, symlinks):
    root = make_tree(tmp_path / "root", {"people/bob": 2, "style": 2})
    outside = make_tree(tmp_path / "outside", {"ext": 2})
    os.symlink(outside / "ext", root / "ext")
    # a link to an image that also trains under its own path: the image's own path wins, though the link comes first
    os.symlink(root / "style" / "style_000.png", root / "people" / "bob" / "also_style.png")
    # a link to an image that trains through the linked folder 'ext' (earlier in walk order)
    os.symlink(outside / "ext" / "ext_001.png", root / "style" / "from_ext.png")
    # two links to one image outside the tree: the first in walk order trains
    make_image(tmp_path / "elsewhere" / "pic.png")
    os.symlink(tmp_path / "elsewhere" / "pic.png", root / "people" / "bob" / "pic_link.png")
    os.symlink(tmp_path / "elsewhere" / "pic.png", root / "style" / "pic_again.png")

    for _ in range(2):  # cold, then from the manifest
        result = scan(root)
        assert result.dataset.paths == (
            "ext/ext_000.png",
            "ext/ext_001.png",
            "people/bob/bob_000.png",
            "people/bob/bob_001.png",
            "people/bob/pic_link.png",
            "style/style_000.png",
            "style/style_001.png",
        )
        elsewhere = tmp_path / "elsewhere" / "pic.png"
        assert warnings_by_path(result) == {
            "people/bob/also_style.png": "is a link to 'style/style_000.png', an image already trained as "
            "'style/style_000.png'; it trains once, not twice",
            "style/from_ext.png": f"is a link to '{outside / 'ext' / 'ext_001.png'}', an image already trained "
            "as 'ext/ext_001.png'; it trains once, not twice",
            "style/pic_again.png": f"is a link to '{elsewhere}', an image already trained as "
            "'people/bob/pic_link.png'; it trains once, not twice",
        }
        assert concept(result.dataset, "people/bob").n_images == 3
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    assert "style/pic_again.png" not in manifest["entries"]  # never read: left out before any reading


def test_broken_links_are_named_and_skipped(tmp_path, symlinks):
    root = make_tree(tmp_path / "root", {"a": 2})
    os.symlink("gone.jpg", root / "a" / "broken.jpg")
    os.symlink(tmp_path / "no_folder", root / "broken_folder")
    os.symlink("gone.txt", root / "a" / "a_000.txt")  # a broken caption link: the file-name caption
    os.symlink("x2.png", root / "a" / "x1.png")
    os.symlink("x1.png", root / "a" / "x2.png")  # two links pointing at each other
    result = scan(root)
    assert not result.errors
    assert result.dataset.paths == ("a/a_000.png", "a/a_001.png")
    assert result.dataset.captions == ("a", "a")
    loop = (
        "is a link that leads back to itself through other links (a loop); it is skipped (fix or remove it)"
    )
    assert warnings_by_path(result) == {
        "a/a_000.txt": "is a link to 'gone.txt', which does not exist; it is skipped (fix the link or remove it)",
        "a/broken.jpg": "is a link to 'gone.jpg', which does not exist; it is skipped (fix the link or remove it)",
        "a/x1.png": loop,
        "a/x2.png": loop,
        "broken_folder": f"is a link to '{tmp_path / 'no_folder'}', which does not exist; it is skipped (fix the "
        "link or remove it)",
    }


def test_a_folder_that_cannot_be_listed_is_named(tmp_path, monkeypatch):
    import edtools.dataset.walk as walk_module

    root = make_tree(tmp_path / "root", {"a": 2, "locked": 1})
    real = os.scandir

    def scandir(path):
        if Path(path).name == "locked":  # as a folder without read permission answers
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(walk_module.os, "scandir", scandir)
    result = scan(root)
    assert result.dataset.paths == ("a/a_000.png", "a/a_001.png")
    assert warnings_by_path(result) == {
        "locked": "cannot list this folder (Permission denied); it is skipped"
    }


# ---------------------------------------------------------------------------------------------------------
# Truncated images


TRUNCATED = (
    "cannot read this image (the file is truncated: its end is missing, as after an interrupted copy or "
    "download); it is skipped: copy it again from the original"
)


def noise_jpeg(path: Path, width: int, height: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path, quality=90)


def truncated_tree(root: Path) -> Path:
    noise_jpeg(root / "a" / "big.jpg", 256, 192)  # larger than the first read: the end is read apart
    make_image(root / "a" / "small.jpg", 32, 24)  # read whole by the header reader
    make_image(root / "a" / "pic.png", 96, 64)
    data = {name: (root / "a" / name).read_bytes() for name in ("big.jpg", "small.jpg", "pic.png")}
    assert len(data["big.jpg"]) > 16384 and len(data["small.jpg"]) < 16384
    (root / "a" / "big_cut.jpg").write_bytes(data["big.jpg"][: len(data["big.jpg"]) * 2 // 3])
    (root / "a" / "small_cut.jpg").write_bytes(data["small.jpg"][:-2])  # only the end marker missing
    (root / "a" / "pic_cut.png").write_bytes(data["pic.png"][: len(data["pic.png"]) // 2])
    (root / "a" / "padded.jpg").write_bytes(data["big.jpg"] + b"\0" * 5000)  # zero padding, as cameras write
    (root / "a" / "trailer.jpg").write_bytes(data["big.jpg"] + b"phone maker's data" * 50 + b"SEFT")
    (root / "a" / "no_iend.png").write_bytes(data["pic.png"][:-12])  # every pixel there, only IEND lost
    return root


def test_truncated_jpeg_and_png_are_skipped_with_a_warning(tmp_path):
    root = truncated_tree(tmp_path / "root")
    result = scan(root)
    assert not result.errors
    assert result.dataset.paths == (
        "a/big.jpg",
        "a/no_iend.png",  # PIL decodes every pixel: it trains
        "a/padded.jpg",
        "a/pic.png",
        "a/small.jpg",
        "a/trailer.jpg",  # data after the image's end marker: PIL decodes the image, it trains
    )
    assert warnings_by_path(result) == {
        "a/big_cut.jpg": TRUNCATED,
        "a/pic_cut.png": TRUNCATED,
        "a/small_cut.jpg": TRUNCATED,
    }
    for workers in (1, 4):
        assert scan_summary(scan(root, workers=workers, cache=False)) == scan_summary(result)


def test_truncated_webp_and_bmp_are_skipped_with_a_warning(tmp_path):
    """WebP (RIFF) and BMP headers state the file's size: a shorter file is cut, caught at scan like a JPEG."""
    from PIL import Image

    root = tmp_path / "root"
    noise_jpeg(root / "a" / "source.jpg", 256, 192)
    with Image.open(root / "a" / "source.jpg") as im:
        im.save(root / "a" / "pic.webp", quality=80)
        im.save(root / "a" / "pic.bmp")
    (root / "a" / "source.jpg").unlink()
    for name in ("pic.webp", "pic.bmp"):
        data = (root / "a" / name).read_bytes()
        stem, ext = name.split(".")
        (root / "a" / f"{stem}_cut.{ext}").write_bytes(data[: len(data) * 2 // 3])
        (root / "a" / f"{stem}_trailer.{ext}").write_bytes(data + b"more bytes than the header says")
    result = scan(root)
    assert result.dataset.paths == ("a/pic.bmp", "a/pic.webp", "a/pic_trailer.bmp", "a/pic_trailer.webp")
    assert warnings_by_path(result) == {"a/pic_cut.bmp": TRUNCATED, "a/pic_cut.webp": TRUNCATED}
    assert scan_summary(scan(root)) == scan_summary(result)  # the verdicts kept in the manifest


def test_a_warm_rescan_keeps_the_end_check_verdict_without_reading(tmp_path, monkeypatch):
    root = truncated_tree(tmp_path / "root")
    first = scan(root)
    entries = json.loads((root / MANIFEST_NAME).read_text())["entries"]
    assert entries["a/big_cut.jpg"][4] == 0 and entries["a/big.jpg"][4] == 1  # truncated files stay cached
    assert len(entries) == 9

    import edtools.dataset.imageheader as imageheader

    opened = []
    real_open = os.open
    monkeypatch.setattr(imageheader.os, "open", lambda path, *a: opened.append(path) or real_open(path, *a))
    checked = []
    real_complete = scanimages.image_complete
    monkeypatch.setattr(scanimages, "image_complete", lambda p: checked.append(p.name) or real_complete(p))
    assert scan_summary(scan(root)) == scan_summary(first)
    assert opened == [] and checked == []  # no image opened, no end checked: the manifest answered

    data = (root / "a" / "big.jpg").read_bytes()
    (root / "a" / "big_cut.jpg").write_bytes(data)  # copied again: a new size and time, read again
    (root / "a" / "big.jpg").write_bytes(data[:-100])  # now this one is cut
    result = scan(root)
    assert sorted(checked) == ["big.jpg", "big_cut.jpg"]
    assert warnings_by_path(result) == {
        "a/big.jpg": TRUNCATED,
        "a/pic_cut.png": TRUNCATED,
        "a/small_cut.jpg": TRUNCATED,
    }
    assert "a/big_cut.jpg" in result.dataset.paths


def test_images_of_an_older_manifest_are_read_once_for_the_end_check(tmp_path, monkeypatch):
    import edtools.dataset.manifest as manifest_module

    root = truncated_tree(tmp_path / "root")
    (root / "a" / "big.txt").write_text("a caption")
    reference = scan(root, cache=False)
    scan(root)
    manifest = json.loads((root / MANIFEST_NAME).read_text())
    manifest["version"] = 2  # as edtools wrote it before the end check: no verdicts
    manifest["entries"] = {rel: entry[:4] for rel, entry in manifest["entries"].items()}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    read, captions_read = [], []
    real_size, real_bytes = scanimages.image_size, manifest_module.read_bytes
    monkeypatch.setattr(scanimages, "image_size", lambda p: read.append(p.name) or real_size(p))
    monkeypatch.setattr(manifest_module, "read_bytes", lambda p: captions_read.append(p) or real_bytes(p))
    assert scan_summary(scan(root)) == scan_summary(reference)
    assert len(read) == 9 and captions_read == []  # every image once, its end checked too; captions kept
    read.clear()
    assert scan_summary(scan(root)) == scan_summary(reference) and read == []  # then from the manifest again
    assert json.loads((root / MANIFEST_NAME).read_text())["version"] == 3


# ---------------------------------------------------------------------------------------------------------
# Captions that are not UTF-8


def test_a_caption_that_is_not_utf8_is_read_as_cp1252_with_a_warning(tmp_path, monkeypatch):
    root = make_tree(tmp_path / "root", {"a": 3})
    (root / "a" / "a_000.txt").write_bytes("a café in Zürich – at night".encode("cp1252"))
    (root / "a" / "a_001.txt").write_bytes("naïve art\r\n".encode("utf-16"))  # Notepad's "Unicode"
    (root / "a" / "a_002.txt").write_bytes(b"caf\xe9 \x81 byte")  # not even cp1252: latin-1 reads any bytes
    expected_warnings = {
        "a/a_000.txt": "this caption file is not UTF-8; it was read as cp1252 (Windows Western European): "
        "'a café in Zürich – at night'; if that looks wrong, save the file as UTF-8",
        "a/a_001.txt": "this caption file is not UTF-8; it was read as UTF-16: 'naïve art'; if that looks "
        "wrong, save the file as UTF-8",
        "a/a_002.txt": "this caption file is not UTF-8; it was read as latin-1: 'café \x81 byte'; if that looks "
        "wrong, save the file as UTF-8",
    }
    for workers in (1, 4):
        result = scan(root, workers=workers, cache=False)
        assert result.dataset.captions == ("a café in Zürich – at night", "naïve art", "café \x81 byte")
        assert warnings_by_path(result) == expected_warnings

    first = scan(root)
    import edtools.dataset.manifest as manifest_module

    reads = []
    real = manifest_module.read_bytes
    monkeypatch.setattr(manifest_module, "read_bytes", lambda p: reads.append(p) or real(p))
    again = scan(root)  # from the manifest: the same captions and warnings, nothing read
    assert scan_summary(again) == scan_summary(first) and reads == []
    assert warnings_by_path(again) == expected_warnings
    assert json.loads((root / MANIFEST_NAME).read_text())["captions"]["a/a_000.txt"][3] == "cp1252"

    (root / "a" / "a_000.caption").write_text("a UTF-8 caption beside it", encoding="utf-8")
    result = scan(root)  # the .txt's cached fallback no longer decides: the UTF-8 .caption is used
    assert result.dataset.captions[0] == "a UTF-8 caption beside it"
    assert warnings_by_path(result)["a/a_000.txt"] == (
        "this caption file is not UTF-8, so the caption comes from 'a_000.caption'; save it as UTF-8 to use it"
    )


def test_a_long_caption_in_a_fallback_encoding_is_shortened_in_the_warning(tmp_path):
    root = make_tree(tmp_path / "root", {"a": 1})
    text = "é" + "x" * 100
    (root / "a" / "a_000.txt").write_bytes(text.encode("cp1252"))
    result = scan(root)
    assert result.dataset.captions == (text,)
    assert f"'{text[:57]}...'" in result.warnings[0].message


# ---------------------------------------------------------------------------------------------------------
# Image files edtools does not train


def test_image_files_edtools_does_not_train_are_counted_once_per_folder(tmp_path):
    from PIL import Image

    root = make_tree(tmp_path / "root", {"a": 1, "b": 1})
    Image.new("RGB", (8, 8)).save(root / "a" / "one.gif")
    Image.new("RGB", (8, 8)).save(root / "a" / "two.GIF")
    (root / "a" / "phone.heic").write_bytes(b"\0\0\0\x18ftypheic")
    (root / "b" / "scan.tiff").write_bytes(b"II*\0")
    (root / "c").mkdir()
    (root / "c" / "raw.CR2").write_bytes(b"II*\0")  # a folder of nothing but untrained files
    Image.new("RGB", (8, 8)).save(root / "b" / "kept.webp")  # webp and bmp train
    Image.new("RGB", (8, 8)).save(root / "b" / "kept.bmp")
    (root / "b" / "notes.md").write_text("not an image")
    result = scan(root)
    assert result.dataset.paths == ("a/a_000.png", "b/b_000.png", "b/kept.bmp", "b/kept.webp")
    assert warnings_by_path(result) == {
        "a": "3 image files edtools does not train here (.gif x2, .heic x1): convert them to JPEG or PNG",
        "b": "1 image file edtools does not train here (.tiff x1): convert it to JPEG or PNG",
        "c": "1 image file edtools does not train here (.cr2 x1): convert it to JPEG or PNG",
    }


# ---------------------------------------------------------------------------------------------------------
# Absurd multipliers


def test_an_absurd_multiply_txt_is_refused_with_the_limit(tmp_path):
    root = make_tree(tmp_path / "root", {"people/bob": 6, "style": 2})
    (root / "people" / "bob" / "multiply.txt").write_text("1e9")
    result = scan(root)
    assert [(p.path, p.message) for p in result.errors] == [
        (
            "people/bob/multiply.txt",
            "multiply.txt in 'people/bob' = 1e+09: 6 images -> 6,000,000,000 per epoch, more than the limit "
            "of 10,000,000 images per epoch",
        )
    ]
    assert (
        concept(result.dataset, "people/bob").multiplier == 1.0
    )  # nothing substituted trains: it is an error
    assert not any("people/bob" in line for line in result.log)
    with pytest.raises(DatasetError, match="more than the limit of 10,000,000"):
        result.raise_for_errors()


def test_folders_that_together_pass_the_limit_are_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(ds, "MAX_IMAGES_PER_EPOCH", 100)
    root = make_tree(tmp_path / "root", {"a": 5, "b": 5})
    (root / "a" / "multiply.txt").write_text("12")  # 60
    (root / "b" / "multiply.txt").write_text("20")  # 100: at the limit, allowed alone
    result = scan(root)
    assert [(p.path, p.message) for p in result.errors] == [
        (
            ".",
            "all folders together give 160 images per epoch, more than the limit of 100 images per epoch; "
            "lower the largest multipliers",
        )
    ]


def test_with_values_and_synthetic_datasets_refuse_an_absurd_multiplier():
    dataset = synthetic_dataset({"people/bob": (6, 1), "style": (2, 1)})
    with pytest.raises(DatasetError) as info:
        dataset.with_values({"people/bob": 1e9})
    assert str(info.value) == (
        "multiplier for 'people/bob' = 1e+09: 6 images -> 6,000,000,000 per epoch, more than the limit of "
        "10,000,000 images per epoch"
    )
    assert dataset.with_values({"people/bob": MAX_IMAGES_PER_EPOCH / 8}).concepts[0].multiplier == 1_250_000
    with pytest.raises(DatasetError) as info:
        dataset.with_values({"people/bob": MAX_IMAGES_PER_EPOCH / 8, "style": MAX_IMAGES_PER_EPOCH / 4})
    assert str(info.value) == (
        "all folders together give 12,500,000 images per epoch, more than the limit of 10,000,000 images per "
        "epoch; lower the largest multipliers"
    )
    with pytest.raises(DatasetError, match="more than the limit"):
        synthetic_dataset({"a": (6, 1e9)})


# ---------------------------------------------------------------------------------------------------------
# kohya folder names


def kohya_tree(root: Path) -> Path:
    make_tree(root, {"10_alice": 6, "3_bob": 4, "img/2_carol": 2, "plain": 1, "2024trip": 1})
    (root / "3_bob" / "multiply.txt").write_text("2")
    return root


def test_kohya_folder_names_are_explained_when_kohya_repeats_is_off(tmp_path):
    root = kohya_tree(tmp_path / "root")
    result = scan(root)
    assert not result.errors
    assert [c.multiplier for c in result.dataset.concepts] == [1.0, 1.0, 2.0, 1.0, 1.0]
    assert result.dataset.concept_paths == ("10_alice", "2024trip", "3_bob", "img/2_carol", "plain")
    assert warnings_by_path(result) == {
        "10_alice": "folder '10_alice' is named the kohya way (10 repeats); edtools reads multiply.txt: write 10 "
        "into 10_alice/multiply.txt, or train with kohya_repeats",
        "img/2_carol": "folder 'img/2_carol' is named the kohya way (2 repeats); edtools reads multiply.txt: "
        "write 2 into img/2_carol/multiply.txt, or train with kohya_repeats",
    }  # 3_bob has its own multiply.txt: nothing to say
    assert result.log == ("multiply.txt in '3_bob' = 2: 4 images -> 8 per epoch",)


def test_kohya_repeats_gives_the_folder_its_number_and_multiply_txt_wins(tmp_path):
    root = kohya_tree(tmp_path / "root")
    result = scan(root, kohya_repeats=True)
    assert not result.problems
    multipliers = {c.path: (c.multiplier, c.multiplier_from_file) for c in result.dataset.concepts}
    assert multipliers == {
        "10_alice": (10.0, False),
        "2024trip": (1.0, False),
        "3_bob": (2.0, True),  # its multiply.txt wins over the name
        "img/2_carol": (2.0, False),
        "plain": (1.0, False),
    }
    assert result.log == (
        "kohya folder name '10_alice' = 10: 6 images -> 60 per epoch",
        "multiply.txt in '3_bob' = 2: 4 images -> 8 per epoch",
        "kohya folder name 'img/2_carol' = 2: 2 images -> 4 per epoch",
    )
    dataset = load_dataset(root, kohya_repeats=True)
    assert concept(dataset, "10_alice").multiplier == 10.0
    assert concept(load_dataset(root), "10_alice").multiplier == 1.0


def test_kohya_names_with_zero_or_absurd_repeats(tmp_path):
    root = make_tree(tmp_path / "root", {"0_none": 2, "99999999_serial": 6, "5_ok": 1})
    on = scan(root, kohya_repeats=True)
    assert {p.path: (p.severity, p.message) for p in on.problems} == {
        "0_none": (
            "error",
            "kohya folder name '0_none' = 0: 0 repeats is not > 0; write a multiply.txt into '0_none' (it wins "
            "over the name) or rename the folder",
        ),
        "99999999_serial": (
            "error",
            "kohya folder name '99999999_serial' = 99999999: 6 images -> 599,999,994 per epoch, more than the "
            "limit of 10,000,000 images per epoch; write a multiply.txt into '99999999_serial' (it wins over "
            "the name) or rename the folder",
        ),
    }
    with pytest.raises(DatasetError, match="0_none"):
        on.raise_for_errors()
    (root / "0_none" / "multiply.txt").write_text("0.5")
    (root / "99999999_serial" / "multiply.txt").write_text("1")
    assert not scan(root, kohya_repeats=True).errors  # a multiply.txt settles it

    (root / "0_none" / "multiply.txt").unlink()
    (root / "99999999_serial" / "multiply.txt").unlink()
    off = scan(root)
    assert not off.errors
    assert warnings_by_path(off) == {  # 99999999 repeats cannot be meant: nothing said about that folder
        "0_none": "folder '0_none' is named the kohya way (0 repeats: kohya leaves it out); edtools trains its "
        "images once per epoch: to leave it out, move it out of data_root",
        "5_ok": "folder '5_ok' is named the kohya way (5 repeats); edtools reads multiply.txt: write 5 into "
        "5_ok/multiply.txt, or train with kohya_repeats",
    }


# ---------------------------------------------------------------------------------------------------------
# All of it at once


def test_a_tree_with_every_fault_scans_alike_in_threads_and_from_the_manifest(tmp_path, symlinks):
    root = truncated_tree(tmp_path / "root")
    make_tree(root, {"10_alice": 3, "people/bob": 2})
    outside = make_tree(tmp_path / "outside", {"ext": 2})
    os.symlink(outside / "ext", root / "ext")
    os.symlink(root, root / "people" / "loop")
    os.symlink("gone.png", root / "people" / "bob" / "broken.png")
    os.symlink(root / "a" / "big.jpg", root / "people" / "bob" / "big_again.jpg")
    (root / "people" / "bob" / "bob_000.txt").write_bytes("crème".encode("cp1252"))
    (root / "people" / "bob" / "anim.gif").write_bytes(b"GIF89a")
    (root / "people" / "bob" / "multiply.txt").write_text("1e9")
    reference = scan(root, workers=1, cache=False)
    assert [p.path for p in reference.errors] == ["people/bob/multiply.txt"]
    assert sorted(p.path for p in reference.warnings) == [
        "10_alice",
        "a/big_cut.jpg",
        "a/pic_cut.png",
        "a/small_cut.jpg",
        "people/bob",
        "people/bob/big_again.jpg",
        "people/bob/bob_000.txt",
        "people/bob/broken.png",
        "people/loop",
    ]
    for workers in (4, None):
        assert scan_summary(scan(root, workers=workers, cache=False)) == scan_summary(reference)
    assert scan_summary(scan(root, workers=4)) == scan_summary(reference)  # writes the manifest
    assert scan_summary(scan(root, workers=1)) == scan_summary(reference)  # answered by it
