"""Scan a data root: images, captions, sizes, and the per-folder multiply.txt / loss_scale.txt.

This is the only module that reads or writes those two files; everything downstream sees plain numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from ..atomic import write_text
from ..errors import EdtoolsError
from .images import ImageTable
from .manifest import Manifest
from .walk import CAPTION_EXTENSIONS as CAPTION_EXTENSIONS  # re-exported: scan's names stay where they were
from .walk import IMAGE_EXTENSIONS, untrained_message, walk

__all__ = [
    "IMAGE_EXTENSIONS",
    "MULTIPLY_FILE",
    "LOSS_SCALE_FILE",
    "MAX_IMAGES_PER_EPOCH",
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

_VALUE_STEMS = ("multiply", "loss_scale")  # <stem>.txt of these is a folder value, never a caption
MULTIPLY_FILE = "multiply.txt"
LOSS_SCALE_FILE = "loss_scale.txt"
MANIFEST_NAME = ".edtools_manifest.json"
ROOT_CONCEPT = "."
# The most images one epoch may hold. The schedule keeps an epoch as a few int64 arrays of its length (the image
# numbers, a permutation, their bucket order): 10 million images is about 0.5 GB while it is built, and at the
# tens of images per second a GPU trains, more than a week per epoch: far beyond any real data root (the benchmarks
# scan 100,000 images), while a typo such as 1e9 in multiply.txt is refused before anything is allocated.
MAX_IMAGES_PER_EPOCH = 10_000_000
_KOHYA_NAME = re.compile(r"([0-9]+)_(.+)")  # kohya's folder names: repeats, underscore, a name (10_alice)


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
                _check_multiplier(value, c.path, c.n_images)
                c = dataclasses.replace(c, multiplier=value)
            if c.path in loss_scales:
                value = float(loss_scales[c.path])
                if not math.isfinite(value):
                    raise DatasetError(f"loss_scale for '{c.path}' is {value}; it must be a finite number")
                c = dataclasses.replace(c, loss_scale=value)
            concepts.append(c)
        _check_epoch(concepts)
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


def _check_multiplier(value: float, where: str, n_images: int | None = None) -> None:
    if not math.isfinite(value) or value <= 0:
        raise DatasetError(
            f"multiplier for '{where}' is {value}; it must be a finite number > 0 "
            "(e.g. 2 to repeat twice, 0.1 to use a tenth of the folder per epoch)"
        )
    if n_images is not None and n_images * value > MAX_IMAGES_PER_EPOCH:
        raise DatasetError(_too_many(f"multiplier for '{where}'", value, n_images))


def _too_many(what: str, value: float, n_images: int) -> str:
    """'<what> = 1e+09: 6 images -> 6,000,000,000 per epoch, more than the limit of 10,000,000 images ...'."""
    shown = f"{value:g}" if isinstance(value, float) else str(value)
    return (
        f"{what} = {shown}: {n_images} images -> {n_images * value:,.0f} per epoch, more than the limit of "
        f"{MAX_IMAGES_PER_EPOCH:,} images per epoch"
    )


def _epoch_too_large(concepts) -> str | None:
    """The error for concepts whose epoch together exceeds MAX_IMAGES_PER_EPOCH, else None."""
    total = sum(c.n_images * c.multiplier for c in concepts)
    if total <= MAX_IMAGES_PER_EPOCH:
        return None
    return (
        f"all folders together give {total:,.0f} images per epoch, more than the limit of "
        f"{MAX_IMAGES_PER_EPOCH:,} images per epoch; lower the largest multipliers"
    )


def _check_epoch(concepts) -> None:
    message = _epoch_too_large(concepts)
    if message is not None:
        raise DatasetError(message)


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


def _read_value(folder: str, prefix: str, name, parse, allowed: str, problems: list[Problem]) -> float | None:
    """The number in folder/name, or None with an error added to problems (file, value, what is allowed)."""
    try:
        with open(os.path.join(folder, name), encoding="utf-8-sig") as f:
            return parse(f.read())
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        problems.append(Problem("error", prefix + name, f"{exc}; {name} must hold {allowed}"))
        return None


def _describe_loss_scale(value: float) -> str:
    if value == 1:
        return "unchanged"
    if value == 0:
        return "these images contribute nothing"
    if value < 0:
        return "NEGATIVE: training pushes away from these images"
    return f"steps on these images are x{value:g} the size"


def _folder_values(folder: str, prefix: str, names, problems: list[Problem]) -> tuple:
    """multiply.txt / loss_scale.txt of one folder: (multiplier, loss_scale, from multiply file, from loss file)."""
    multiplier, loss_scale = 1.0, 1.0
    multiply_file = loss_file = False
    if MULTIPLY_FILE in names:
        value = _read_value(
            folder, prefix, MULTIPLY_FILE, parse_multiplier, "one number > 0, e.g. 0.5 or 2", problems
        )
        if value is not None:
            multiplier, multiply_file = value, True
    if LOSS_SCALE_FILE in names:
        where = prefix + LOSS_SCALE_FILE
        value = _read_value(
            folder, prefix, LOSS_SCALE_FILE, parse_loss_scale, "one number, e.g. 0.5 or 1.5", problems
        )
        if value is not None:
            loss_scale, loss_file = value, True
            if loss_scale == 0:
                problems.append(
                    Problem("warning", where, "loss_scale is 0: these images are loaded but teach nothing")
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
    return multiplier, loss_scale, multiply_file, loss_file


def scan(
    data_root: str | os.PathLike,
    *,
    cache: bool = True,
    workers: int | None = None,
    kohya_repeats: bool = False,
) -> ScanResult:
    """Walk data_root and collect images, captions, sizes, per-folder values and every problem found.

    Never raises for problems in the data: they are returned (see ScanResult.raise_for_errors).
    Image headers and captions the manifest does not already hold are read in this thread while that is fast,
    and by a pool of threads when the storage is slow per file (network drives); workers=1 reads them all in
    this thread, workers=n >= 2 always uses n threads. The result is the same either way.
    kohya_repeats: a folder named the kohya way (10_alice) without a multiply.txt of its own gets the number as
    its multiplier; otherwise the scan only says what the name would mean.
    """
    root = Path(data_root).expanduser().resolve()
    if not root.is_dir():
        raise DatasetError(
            f"data_root '{data_root}' is not a folder; create it or point to your image folders"
        )
    # The scan makes a few objects per file and no garbage cycles: pausing the cyclic collector saves its
    # repeated passes over a growing heap (about a fifth of a cold scan of 100,000 images).
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _scan(root, cache, workers, kohya_repeats)
    finally:
        if collecting:
            gc.enable()


def _kohya_multiplier(rel: str, repeats: int, n: int, apply: bool, problems: list, log: list) -> float:
    """The multiplier a kohya folder name (10_alice) gives a folder without multiply.txt: the repeats when
    apply (logged like an applied file; 0 or too many for an epoch is an error), else 1 with a word on the name."""
    if not apply:
        if repeats == 0:
            message = (
                f"folder '{rel}' is named the kohya way (0 repeats: kohya leaves it out); edtools trains its "
                "images once per epoch: to leave it out, move it out of data_root"
            )
        elif n * repeats <= MAX_IMAGES_PER_EPOCH:
            message = (
                f"folder '{rel}' is named the kohya way ({repeats} repeats); edtools reads {MULTIPLY_FILE}: "
                f"write {repeats} into {rel}/{MULTIPLY_FILE}, or train with kohya_repeats"
            )
        else:
            return 1.0  # a date or a serial number, not repeats
        problems.append(Problem("warning", rel, message))
        return 1.0
    name = f"kohya folder name '{rel}'"
    fix = f"; write a {MULTIPLY_FILE} into '{rel}' (it wins over the name) or rename the folder"
    if repeats == 0:
        problems.append(Problem("error", rel, f"{name} = 0: 0 repeats is not > 0{fix}"))
    elif n * repeats > MAX_IMAGES_PER_EPOCH:
        problems.append(Problem("error", rel, _too_many(name, repeats, n) + fix))
    else:
        log.append(f"{name} = {repeats}: {n} images -> {n * repeats} per epoch")
        return float(repeats)
    return 1.0


def _scan(root: Path, cache: bool, workers: int | None, kohya_repeats: bool) -> ScanResult:
    problems: list[Problem] = []
    log: list[str] = []
    images = ImageTable(Manifest(root / MANIFEST_NAME if cache else None), _VALUE_STEMS)

    # One pass over the tree: folder values here, each image's size and caption answered by the manifest or
    # queued to be read; everything is assembled in walk order afterwards.
    folders: list[tuple] = []
    for folder in walk(str(root)):
        prefix = folder.rel + "/" if folder.rel else ""
        folder_rel = folder.rel or ROOT_CONCEPT
        folder_problems = [Problem("warning", path, message) for path, message in folder.notes]
        if folder.untrained:
            folder_problems.append(Problem("warning", folder_rel, untrained_message(folder.untrained)))
        for name in folder.odd:
            target = _misnamed_target(name)
            if target:
                folder_problems.append(
                    Problem(
                        "warning",
                        prefix + name,
                        f"looks like a misnamed {target} and is IGNORED; rename it to '{target}'",
                    )
                )
        values = _folder_values(folder.path, prefix, folder.files, folder_problems)
        first = len(images)
        images.add_folder(folder, prefix)
        value_files = tuple(n for n in (MULTIPLY_FILE, LOSS_SCALE_FILE) if n in folder.files)
        folders.append((folder_rel, prefix, value_files, folder_problems, values, first, len(images)))
    images.drop_duplicate_links(str(root))
    images.read(workers)

    # Concepts, problems and log lines exactly as a one-image-at-a-time scan gives them.
    concepts: list[Concept] = []
    for folder_rel, prefix, value_files, folder_problems, values, first, end in folders:
        problems.extend(folder_problems)
        multiplier, loss_scale, multiply_file, loss_file = values
        said, n_skipped = images.skipped(first, end)
        problems.extend(Problem("warning", path, message) for path, message in said)
        n_ok = end - first - n_skipped
        if n_ok:
            if multiply_file and n_ok * multiplier > MAX_IMAGES_PER_EPOCH:
                where = f"{MULTIPLY_FILE} in '{folder_rel}'"
                problems.append(Problem("error", prefix + MULTIPLY_FILE, _too_many(where, multiplier, n_ok)))
                multiplier, multiply_file = 1.0, False
            elif MULTIPLY_FILE not in value_files:
                kohya = _KOHYA_NAME.fullmatch(folder_rel.rsplit("/", 1)[-1])
                if kohya:
                    repeats = int(kohya[1])
                    multiplier = _kohya_multiplier(folder_rel, repeats, n_ok, kohya_repeats, problems, log)
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
        elif value_files:
            which = " and ".join(value_files)
            problems.append(
                Problem(
                    "warning",
                    folder_rel,
                    f"{which} here applies to no image: this folder holds no images directly, and the "
                    "file does not cascade into subfolders; move it into the folder(s) with the images",
                )
            )
    too_large = _epoch_too_large(concepts)
    if too_large:
        problems.append(Problem("error", ROOT_CONCEPT, too_large))

    rels, captions, widths, heights = images.finish()
    if not rels:
        problems.append(
            Problem(
                "error",
                ROOT_CONCEPT,
                f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} in every subfolder of {root})",
            )
        )
    counts = [c.n_images for c in concepts]
    dataset = Dataset(
        root=root,
        concepts=tuple(concepts),
        paths=tuple(rels),
        captions=tuple(captions),
        widths=np.array(widths, dtype=np.int32),
        heights=np.array(heights, dtype=np.int32),
        concept_index=np.repeat(np.arange(len(counts), dtype=np.int32), counts),
    )
    return ScanResult(dataset, tuple(problems), tuple(log))


def load_dataset(data_root: str | os.PathLike, *, cache: bool = True, kohya_repeats: bool = False) -> Dataset:
    """Scan and return the dataset, raising DatasetError (with every error listed) if anything is wrong."""
    return scan(data_root, cache=cache, kohya_repeats=kohya_repeats).raise_for_errors()


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
        _check_multiplier(float(multiplier), path, int(n))
        concepts.append(Concept(path, int(n), float(multiplier), float(rest[0]) if rest else 1.0))
    _check_epoch(concepts)
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
