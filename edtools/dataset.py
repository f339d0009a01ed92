"""Scan a data root: images, captions, sizes, and the per-folder multiply.txt / loss_scale.txt.

This is the only module that reads or writes those two files; everything downstream sees plain numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .atomic import write_text
from .errors import EdtoolsError

__all__ = [
    "IMAGE_EXTENSIONS",
    "MULTIPLY_FILE",
    "LOSS_SCALE_FILE",
    "Concept",
    "Dataset",
    "DatasetError",
    "Problem",
    "ScanResult",
    "load_dataset",
    "parse_loss_scale",
    "parse_multiplier",
    "scan",
    "synthetic_dataset",
    "write_concept_values",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MULTIPLY_FILE = "multiply.txt"
LOSS_SCALE_FILE = "loss_scale.txt"
CAPTION_EXTENSIONS = (".txt", ".caption")
MANIFEST_NAME = ".edtools_manifest.json"
ROOT_CONCEPT = "."


class DatasetError(EdtoolsError, ValueError):
    """A data root with problems that must be fixed before anything trains."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong in a data root, said to a person: where, what, and what to do."""

    severity: Literal["error", "warning"]
    path: str  # relative to data_root
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper()}: {self.path}: {self.message}"


@dataclass(frozen=True)
class Concept:
    """A folder that directly holds images; its files apply to those images only (no cascade)."""

    path: str  # relative to data_root, posix separators; "." for data_root itself
    n_images: int
    multiplier: float = 1.0
    loss_scale: float = 1.0
    multiplier_from_file: bool = False
    loss_scale_from_file: bool = False

    @property
    def images_per_epoch(self) -> float:
        """Expected images per epoch: n_images x multiplier (exact on average, floor/ceil per epoch)."""
        return self.n_images * self.multiplier


@dataclass(frozen=True, eq=False)
class Dataset:
    """Every image under a data root, grouped by concept. Arrays are indexed by image number."""

    root: Path
    concepts: tuple[Concept, ...]
    paths: tuple[str, ...]  # relative to root, posix separators, grouped by concept
    captions: tuple[str, ...]
    widths: np.ndarray  # int32
    heights: np.ndarray  # int32
    concept_index: np.ndarray  # int32, index into `concepts`

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def concept_paths(self) -> tuple[str, ...]:
        return tuple(c.path for c in self.concepts)

    def images_of(self, concept: int) -> np.ndarray:
        """Image numbers of one concept (contiguous, ascending)."""
        return np.flatnonzero(self.concept_index == concept)

    def loss_scale_per_image(self) -> np.ndarray:
        scales = np.array([c.loss_scale for c in self.concepts], dtype=np.float32)
        return scales[self.concept_index]

    def with_values(
        self,
        multipliers: Mapping[str, float] | None = None,
        loss_scales: Mapping[str, float] | None = None,
    ) -> Dataset:
        """A copy with some concepts' multiplier / loss_scale replaced (validated like the files are)."""
        multipliers = dict(multipliers or {})
        loss_scales = dict(loss_scales or {})
        known = set(self.concept_paths)
        unknown = sorted((set(multipliers) | set(loss_scales)) - known)
        if unknown:
            raise DatasetError(f"unknown concept folder(s) {unknown}; known: {sorted(known)}")
        concepts = []
        for c in self.concepts:
            if c.path in multipliers:
                value = float(multipliers[c.path])
                _check_multiplier(value, c.path)
                c = dataclasses.replace(c, multiplier=value)
            if c.path in loss_scales:
                value = float(loss_scales[c.path])
                if not math.isfinite(value):
                    raise DatasetError(f"loss_scale for '{c.path}' is {value}; it must be a finite number")
                c = dataclasses.replace(c, loss_scale=value)
            concepts.append(c)
        return dataclasses.replace(self, concepts=tuple(concepts))


@dataclass(frozen=True)
class ScanResult:
    """What a scan found: the dataset, every problem at once, and one log line per applied file."""

    dataset: Dataset
    problems: tuple[Problem, ...]
    log: tuple[str, ...]

    @property
    def errors(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "error")

    @property
    def warnings(self) -> tuple[Problem, ...]:
        return tuple(p for p in self.problems if p.severity == "warning")

    def raise_for_errors(self) -> Dataset:
        """The dataset, or a DatasetError listing every error (nothing trains on substituted values)."""
        if self.errors:
            lines = "\n".join(f"  - {p}" for p in self.errors)
            raise DatasetError(f"{len(self.errors)} problem(s) in {self.dataset.root}:\n{lines}")
        return self.dataset


# ---------------------------------------------------------------------------------------------------------
# Values


def _check_multiplier(value: float, where: str) -> None:
    if not math.isfinite(value) or value <= 0:
        raise DatasetError(
            f"multiplier for '{where}' is {value}; it must be a finite number > 0 "
            "(e.g. 2 to repeat twice, 0.1 to use a tenth of the folder per epoch)"
        )


def _parse_number(text: str) -> float:
    stripped = text.strip().lstrip("\ufeff").strip()
    if not stripped:
        raise ValueError("the file is empty")
    if re.fullmatch(r"[+-]?\d+,\d+", stripped):
        raise ValueError(f"'{stripped}' uses a decimal comma; write '{stripped.replace(',', '.')}'")
    try:
        value = float(stripped)
    except ValueError:
        raise ValueError(f"'{stripped}' is not a number") from None
    if not math.isfinite(value):
        raise ValueError(f"'{stripped}' is not a finite number")
    return value


def parse_multiplier(text: str) -> float:
    """The value of a multiply.txt: any finite real > 0. Raises ValueError with the reason otherwise."""
    value = _parse_number(text)
    if value <= 0:
        raise ValueError(f"{value:g} is not > 0 (to leave a folder out, move it out of data_root)")
    return value


def parse_loss_scale(text: str) -> float:
    """The value of a loss_scale.txt: any finite real (0 and negatives are warned about by the scan)."""
    return _parse_number(text)


_MISNAMED = re.compile(r"^(multiply|multiplier|loss[ _-]?scale)(\.(txt|text))*$", re.IGNORECASE)


def _misnamed_target(name: str) -> str | None:
    """The file a mistyped name probably meant (multiply.txt.txt -> multiply.txt), else None."""
    if name in (MULTIPLY_FILE, LOSS_SCALE_FILE):
        return None
    m = _MISNAMED.match(name)
    if not m:
        return None
    return MULTIPLY_FILE if m.group(1).lower().startswith("multipl") else LOSS_SCALE_FILE


# ---------------------------------------------------------------------------------------------------------
# Scanning


def _caption_for(
    stem: str, files: dict[str, os.DirEntry], prefix: str, manifest: _Manifest
) -> tuple[str, str | None]:
    """The sidecar caption (<stem>.txt or <stem>.caption) and its path, else the file name up to the first '_'."""
    for ext in CAPTION_EXTENSIONS:
        entry = files.get(stem + ext)
        if entry is None or entry.name in (MULTIPLY_FILE, LOSS_SCALE_FILE):
            continue
        rel = prefix + entry.name
        try:
            stat = entry.stat()
            caption = manifest.get_caption(rel, stat)
            if caption is None:
                with open(entry.path, encoding="utf-8-sig") as f:
                    caption = f.read().strip()
                manifest.put_caption(rel, stat, caption)
            return caption, rel
        except (OSError, UnicodeDecodeError):
            continue
    return stem.split("_", 1)[0].strip(), None


def _image_size(path: Path) -> tuple[int, int]:
    """Width and height from the file header (PIL opens lazily; no pixel decode)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees: the trained picture is transposed
        width, height = height, width
    return int(width), int(height)


class _Manifest:
    """Cache of (path, size, mtime) -> (width, height) or caption, so a re-scan of a large tree only stats."""

    def __init__(self, file: Path | None):
        self.file = file
        self.entries: dict[str, list] = {}
        self.captions: dict[str, list] = {}
        self.dirty = False
        if file is not None and file.is_file():
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
                if data.get("version") == 2:
                    self.entries, self.captions = data["entries"], data["captions"]
            except (OSError, ValueError, KeyError):
                self.entries, self.captions = {}, {}

    def get(self, rel: str, stat: os.stat_result) -> tuple[int, int] | None:
        entry = self.entries.get(rel)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2], entry[3]
        return None

    def put(self, rel: str, stat: os.stat_result, size: tuple[int, int]) -> None:
        self.entries[rel] = [stat.st_size, stat.st_mtime_ns, size[0], size[1]]
        self.dirty = True

    def get_caption(self, rel: str, stat: os.stat_result) -> str | None:
        entry = self.captions.get(rel)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        return None

    def put_caption(self, rel: str, stat: os.stat_result, caption: str) -> None:
        self.captions[rel] = [stat.st_size, stat.st_mtime_ns, caption]
        self.dirty = True

    def save(self, seen: set[str]) -> None:
        stale = [rel for rel in self.entries if rel not in seen]
        stale_captions = [rel for rel in self.captions if rel not in seen]
        for rel in stale:
            del self.entries[rel]
        for rel in stale_captions:
            del self.captions[rel]
        if self.file is None or not (self.dirty or stale or stale_captions):
            return
        try:
            payload = {"version": 2, "entries": self.entries, "captions": self.captions}
            write_text(self.file, json.dumps(payload, ensure_ascii=False))
        except OSError:
            pass  # a read-only data root still scans; it just is not cached


def _walk(root: Path) -> Iterable[tuple[Path, list[os.DirEntry]]]:
    """Folders under root (sorted, hidden ones skipped) with their plain-file entries."""
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError:
            continue
        files, subfolders = [], []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=True):
                subfolders.append(Path(entry.path))
            elif entry.is_file(follow_symlinks=True):
                files.append(entry)
        yield folder, files
        stack.extend(reversed(subfolders))


def _read_value(folder, root, name, parse, allowed: str, problems: list[Problem]) -> float | None:
    """The number in folder/name, or None with an error added to problems (file, value, what is allowed)."""
    try:
        return parse((folder / name).read_text(encoding="utf-8-sig"))
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        problems.append(Problem("error", _rel(folder / name, root), f"{exc}; {name} must hold {allowed}"))
        return None


def _rel(path: Path, root: Path) -> str:
    rel = path.relative_to(root).as_posix()
    return rel if rel else ROOT_CONCEPT


def _describe_loss_scale(value: float) -> str:
    if value == 1:
        return "unchanged"
    if value == 0:
        return "these images contribute nothing"
    if value < 0:
        return "NEGATIVE: training pushes away from these images"
    return f"steps on these images are x{value:g} the size"


def scan(data_root: str | os.PathLike, *, cache: bool = True) -> ScanResult:
    """Walk data_root and collect images, captions, sizes, per-folder values and every problem found.

    Never raises for problems in the data: they are returned (see ScanResult.raise_for_errors).
    """
    root = Path(data_root).expanduser().resolve()
    problems: list[Problem] = []
    log: list[str] = []
    if not root.is_dir():
        raise DatasetError(
            f"data_root '{data_root}' is not a folder; create it or point to your image folders"
        )
    manifest = _Manifest(root / MANIFEST_NAME if cache else None)
    seen: set[str] = set()

    concepts: list[Concept] = []
    paths: list[str] = []
    captions: list[str] = []
    sizes: list[tuple[int, int]] = []
    concept_index: list[int] = []

    for folder, files in _walk(root):
        folder_rel = _rel(folder, root)
        by_name = {e.name: e for e in files}
        names = set(by_name)
        multiplier, loss_scale = 1.0, 1.0
        multiply_file = loss_file = False

        for entry in files:
            target = _misnamed_target(entry.name)
            if target:
                problems.append(
                    Problem(
                        "warning",
                        _rel(Path(entry.path), root),
                        f"looks like a misnamed {target} and is IGNORED; rename it to '{target}'",
                    )
                )

        if MULTIPLY_FILE in names:
            value = _read_value(
                folder, root, MULTIPLY_FILE, parse_multiplier, "one number > 0, e.g. 0.5 or 2", problems
            )
            if value is not None:
                multiplier, multiply_file = value, True
        if LOSS_SCALE_FILE in names:
            where = _rel(folder / LOSS_SCALE_FILE, root)
            value = _read_value(
                folder, root, LOSS_SCALE_FILE, parse_loss_scale, "one number, e.g. 0.5 or 1.5", problems
            )
            if value is not None:
                loss_scale, loss_file = value, True
                if loss_scale == 0:
                    problems.append(
                        Problem(
                            "warning", where, "loss_scale is 0: these images are loaded but teach nothing"
                        )
                    )
                elif loss_scale < 0:
                    problems.append(
                        Problem(
                            "warning",
                            where,
                            f"loss_scale is NEGATIVE ({loss_scale:g}): training pushes the model AWAY from "
                            "these images; use extreme caution, it can quickly damage the model",
                        )
                    )

        image_entries = [e for e in files if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS]
        concept_number = len(concepts)
        prefix = "" if folder_rel == ROOT_CONCEPT else folder_rel + "/"
        n_ok = 0
        for entry in image_entries:
            rel = prefix + entry.name
            try:
                stat = entry.stat()
                if stat.st_size == 0:
                    raise OSError("the file is empty (0 bytes)")
                size = manifest.get(rel, stat)
                if size is None:
                    size = _image_size(Path(entry.path))
                    manifest.put(rel, stat, size)
            except Exception as exc:  # any unreadable image is reported and skipped, never fatal
                problems.append(Problem("warning", rel, f"cannot read this image ({exc}); it is skipped"))
                continue
            caption, caption_rel = _caption_for(os.path.splitext(entry.name)[0], by_name, prefix, manifest)
            seen.add(rel)
            if caption_rel is not None:
                seen.add(caption_rel)
            paths.append(rel)
            captions.append(caption)
            sizes.append(size)
            concept_index.append(concept_number)
            n_ok += 1

        if n_ok:
            concepts.append(Concept(folder_rel, n_ok, multiplier, loss_scale, multiply_file, loss_file))
            if multiply_file:
                log.append(
                    f"{MULTIPLY_FILE} in '{folder_rel}' = {multiplier:g}: "
                    f"{n_ok} images -> {n_ok * multiplier:g} per epoch"
                )
            if loss_file:
                log.append(
                    f"{LOSS_SCALE_FILE} in '{folder_rel}' = {loss_scale:g}: "
                    f"{n_ok} images, {_describe_loss_scale(loss_scale)}"
                )
        elif multiply_file or loss_file or any(n in names for n in (MULTIPLY_FILE, LOSS_SCALE_FILE)):
            which = " and ".join(n for n in (MULTIPLY_FILE, LOSS_SCALE_FILE) if n in names)
            problems.append(
                Problem(
                    "warning",
                    folder_rel,
                    f"{which} here applies to no image: this folder holds no images directly, and the "
                    "file does not cascade into subfolders; move it into the folder(s) with the images",
                )
            )

    manifest.save(seen)
    if not paths:
        problems.append(
            Problem(
                "error",
                ROOT_CONCEPT,
                f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} in every subfolder of {root})",
            )
        )
    widths = np.array([s[0] for s in sizes], dtype=np.int32)
    heights = np.array([s[1] for s in sizes], dtype=np.int32)
    dataset = Dataset(
        root=root,
        concepts=tuple(concepts),
        paths=tuple(paths),
        captions=tuple(captions),
        widths=widths,
        heights=heights,
        concept_index=np.array(concept_index, dtype=np.int32),
    )
    return ScanResult(dataset, tuple(problems), tuple(log))


def load_dataset(data_root: str | os.PathLike, *, cache: bool = True) -> Dataset:
    """Scan and return the dataset, raising DatasetError (with every error listed) if anything is wrong."""
    return scan(data_root, cache=cache).raise_for_errors()


def synthetic_dataset(
    spec: Mapping[str, tuple[int, float] | tuple[int, float, float]],
    *,
    sizes: tuple[tuple[int, int], ...] = ((512, 512),),
    root: str | os.PathLike = "synthetic",
) -> Dataset:
    """A Dataset with no files behind it, for tests and benchmarks of the schedule.

    spec: {folder: (n_images, multiplier[, loss_scale])}; image i of a folder has size sizes[i % len(sizes)].
    """
    concepts = []
    for path, values in spec.items():
        n, multiplier, *rest = values
        _check_multiplier(float(multiplier), path)
        concepts.append(Concept(path, int(n), float(multiplier), float(rest[0]) if rest else 1.0))
    counts = np.array([c.n_images for c in concepts], dtype=np.int64)
    concept_index = np.repeat(np.arange(len(concepts), dtype=np.int32), counts)
    within = np.arange(len(concept_index)) - np.repeat(np.cumsum(counts) - counts, counts)
    size_table = np.array(sizes, dtype=np.int32)[within % len(sizes)]
    paths = tuple(f"{c.path}/{i:06d}.jpg" for c in concepts for i in range(c.n_images))
    return Dataset(
        root=Path(root),
        concepts=tuple(concepts),
        paths=paths,
        captions=tuple(Path(p).parent.name for p in paths),
        widths=size_table[:, 0].copy(),
        heights=size_table[:, 1].copy(),
        concept_index=concept_index,
    )


def write_concept_values(
    data_root: str | os.PathLike,
    concept: str,
    *,
    multiplier: float | None = None,
    loss_scale: float | None = None,
) -> list[Path]:
    """Write multiply.txt and/or loss_scale.txt into one concept folder, atomically. Returns files written.

    A multiplier of exactly 1 or loss_scale of exactly 1 still writes the file: the caller decides what
    changed; nothing here removes files.
    """
    root = Path(data_root).expanduser().resolve()
    folder = (root / concept).resolve()
    if folder != root and root not in folder.parents:
        raise DatasetError(f"concept '{concept}' is outside data_root {root}")
    if not folder.is_dir():
        raise DatasetError(f"concept folder '{concept}' does not exist under {root}")
    written = []
    if multiplier is not None:
        _check_multiplier(float(multiplier), concept)
        write_text(
            folder / MULTIPLY_FILE,
            f"{float(multiplier):g}\n" if _exact_g(multiplier) else f"{multiplier!r}\n",
        )
        written.append(folder / MULTIPLY_FILE)
    if loss_scale is not None:
        if not math.isfinite(float(loss_scale)):
            raise DatasetError(f"loss_scale for '{concept}' is {loss_scale}; it must be a finite number")
        write_text(
            folder / LOSS_SCALE_FILE,
            f"{float(loss_scale):g}\n" if _exact_g(loss_scale) else f"{loss_scale!r}\n",
        )
        written.append(folder / LOSS_SCALE_FILE)
    return written


def _exact_g(value: float) -> bool:
    """True when the short %g form reads back as the same float."""
    return float(f"{float(value):g}") == float(value)
