"""Scan a data root: images, captions, sizes, and the per-folder multiply.txt / loss_scale.txt.

This is the only module that reads or writes those two files; everything downstream sees plain numbers.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import operator
import os
import queue
import re
import threading
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .atomic import write_text
from .errors import EdtoolsError
from .imageheader import ImageFile, image_size, pil_module
from .manifest import Manifest, Saver, read_caption

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
_IMAGE_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)
_VALUE_STEMS = ("multiply", "loss_scale")  # <stem>.txt of these is a folder value, never a caption
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

_IO_WORKERS = 16  # header reads in parallel on slow storage (network drives: latency per file)
_SLOW_READ_S = 0.0003  # mean seconds per image above which reads go to the thread pool
_PROBE = 32  # images read in this thread between speed checks
_CHUNK = 8  # images per pool task


def _walk(root: str) -> Iterable[tuple[str, str, dict, list, set, list]]:
    """Folders under root in name order, hidden ones skipped: (path, path relative to root with '/', its plain
    files {name: DirEntry} in name order, its images, stems with a caption file, names to check for misnaming)."""
    stack = [(root, "")]
    by_name = operator.attrgetter("name")
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=by_name)
        except OSError:
            continue
        files, images, sidecars, odd, subfolders = {}, [], set(), [], []
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            if entry.is_file():
                files[name] = entry
                dot = name.rfind(".")
                if dot > 0:
                    ext = name[dot:]
                    if ext.lower() in _IMAGE_EXTENSION_SET:
                        images.append(entry)
                    elif ext in CAPTION_EXTENSIONS:
                        sidecars.add(name[:dot])
                if name[0] in "mMlL":
                    odd.append(name)
            elif entry.is_dir():
                subfolders.append((entry.path, rel + "/" + name if rel else name))
        yield folder, rel, files, images, sidecars, odd
        stack.extend(reversed(subfolders))


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


_STAT_ON_OPEN = object()  # a job's stat: not taken yet; the header reader takes it when it opens the file


def _job(job: tuple) -> tuple:
    """Read what the manifest did not have for one image: its header (unless cached), then its caption.
    Returns (image number, size or the exception, caption result or None, the image's stat)."""
    i, entry, stat, candidates, manifest = job
    size = None
    if stat is not None:
        target = ImageFile(entry) if stat is _STAT_ON_OPEN else entry
        try:
            size = image_size(target)
            if stat is _STAT_ON_OPEN:
                stat = target.stat or os.stat(target.path)
        except Exception as exc:  # any unreadable image is reported and skipped, never fatal
            return i, exc, None, None
    return i, size, read_caption(candidates, manifest) if candidates else None, stat


def _run_jobs(jobs: list, apply, tick, workers: int | None) -> None:
    """Run jobs in order in this thread while reads are fast, in a thread pool when they are slow (network
    storage) or workers >= 2 asks for it; results go to apply() in this thread as they arrive, tick() is
    called every few results."""
    if not jobs:
        return
    pil_module()  # imported once here, not inside the first timed read

    done = 0
    if workers is None or workers <= 1:
        slow_blocks = 0
        while done < len(jobs):
            block = jobs[done : done + _PROBE]
            start = time.perf_counter()
            for job in block:
                apply(_job(job))
            done += len(block)
            tick()
            if workers is None:
                # Two slow blocks in a row (not one outlier): slow storage, the rest in parallel.
                slow = (time.perf_counter() - start) / len(block) > _SLOW_READ_S
                slow_blocks = slow_blocks + 1 if slow else 0
                if slow_blocks == 2:
                    break
        workers = _IO_WORKERS
    rest = jobs[done:]
    if not rest:
        return
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def run(chunk: list) -> None:
        try:
            for job in chunk:
                if stop.is_set():
                    return
                results.put(_job(job))
        except BaseException as exc:  # handed to the scanning thread, which raises it
            results.put(_Failed(exc))

    pool = ThreadPoolExecutor(max_workers=min(workers, len(rest)), thread_name_prefix="edtools-scan")
    try:
        for k in range(0, len(rest), _CHUNK):
            pool.submit(run, rest[k : k + _CHUNK])
        for _ in range(len(rest)):
            result = results.get()
            if isinstance(result, _Failed):
                raise result.exc
            apply(result)
            tick()
    except BaseException:
        stop.set()
        pool.shutdown(wait=True, cancel_futures=True)
        while not results.empty():  # keep every header that was read before the stop
            result = results.get()
            if not isinstance(result, _Failed):
                apply(result)
        raise
    finally:
        pool.shutdown(wait=True)


@dataclass
class _Failed:
    exc: BaseException


def scan(data_root: str | os.PathLike, *, cache: bool = True, workers: int | None = None) -> ScanResult:
    """Walk data_root and collect images, captions, sizes, per-folder values and every problem found.

    Never raises for problems in the data: they are returned (see ScanResult.raise_for_errors).
    Image headers and captions the manifest does not already hold are read in this thread while that is fast,
    and by a pool of threads when the storage is slow per file (network drives); workers=1 reads them all in
    this thread, workers=n >= 2 always uses n threads. The result is the same either way.
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
        return _scan(root, cache, workers)
    finally:
        if collecting:
            gc.enable()


def _scan(root: Path, cache: bool, workers: int | None) -> ScanResult:
    problems: list[Problem] = []
    log: list[str] = []
    manifest = Manifest(root / MANIFEST_NAME if cache else None)
    entries_get, captions_get = manifest.entries.get, manifest.captions.get

    # One pass over the tree: stats, cache look-ups, folder values. Images the manifest cannot answer for become
    # jobs; everything is assembled in walk order afterwards, so the result never depends on read timing.
    folders: list[tuple] = []
    rels: list[str] = []
    widths: list[int] = []
    heights: list[int] = []
    captions: list[str | None] = []
    caption_rels: list[str | None] = []
    failed: dict[int, str] = {}
    jobs: list[tuple] = []

    for folder, folder_rel, by_name, images, sidecars, odd in _walk(str(root)):
        prefix = folder_rel + "/" if folder_rel else ""
        folder_rel = folder_rel or ROOT_CONCEPT
        folder_problems: list[Problem] = []
        for name in odd:
            target = _misnamed_target(name)
            if target:
                folder_problems.append(
                    Problem(
                        "warning",
                        prefix + name,
                        f"looks like a misnamed {target} and is IGNORED; rename it to '{target}'",
                    )
                )
        values = _folder_values(folder, prefix, by_name, folder_problems)
        first = len(rels)
        for entry in images:
            name = entry.name
            rel = prefix + name
            i = len(rels)
            rels.append(rel)
            cached = entries_get(rel)
            if cached is None:  # never seen: read it (its stat is taken when it is opened)
                need = _STAT_ON_OPEN
            else:
                try:
                    stat = entry.stat()
                    message = (
                        None
                        if stat.st_size
                        else "cannot read this image (the file is empty (0 bytes)); it is skipped"
                    )
                except OSError as exc:
                    message = f"cannot read this image ({exc}); it is skipped"
                if message is not None:
                    failed[i] = message
                    widths.append(0)
                    heights.append(0)
                    captions.append(None)
                    caption_rels.append(None)
                    continue
                need = None if cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns else stat
            if need is None:
                widths.append(cached[2])
                heights.append(cached[3])
            else:
                widths.append(0)
                heights.append(0)
            stem = name[: name.rfind(".")]
            candidates = None
            if stem not in sidecars:
                captions.append(stem.split("_", 1)[0].strip())
                caption_rels.append(None)
            else:
                txt = by_name.get(stem + ".txt")
                other = by_name.get(stem + ".caption")
                candidates = [] if txt is None or stem in _VALUE_STEMS else [(prefix + txt.name, txt)]
                if other is not None:
                    candidates.append((prefix + other.name, other))
                hit = None
                if candidates:
                    # The usual case, a cached caption whose file did not change, is answered here.
                    crel, centry = candidates[0]
                    hit = captions_get(crel)
                    if hit is not None:
                        try:
                            cstat = centry.stat()
                            if hit[0] != cstat.st_size or hit[1] != cstat.st_mtime_ns:
                                hit = None
                        except OSError:
                            hit = None
                if hit is not None:
                    captions.append(hit[2])
                    caption_rels.append(crel)
                    candidates = None
                elif candidates:
                    captions.append(None)  # read by the job
                    caption_rels.append(None)
                else:
                    captions.append(stem.split("_", 1)[0].strip())
                    caption_rels.append(None)
            if need is not None or candidates:
                jobs.append((i, entry, need, candidates, manifest))
        value_files = tuple(n for n in (MULTIPLY_FILE, LOSS_SCALE_FILE) if n in by_name)
        folders.append((folder_rel, value_files, folder_problems, values, first, len(rels)))

    saver = Saver(manifest)
    entries = manifest.entries

    def apply(result: tuple) -> None:
        i, size, caption, stat = result
        if isinstance(size, BaseException):
            failed[i] = f"cannot read this image ({size}); it is skipped"
            return
        if size is not None:
            entries[rels[i]] = [stat.st_size, stat.st_mtime_ns, size[0], size[1]]
            manifest.dirty = True
            widths[i], heights[i] = size
        if caption is not None:
            text, crel, to_cache = caption
            if text is not None:
                captions[i], caption_rels[i] = text, crel
                if to_cache is not None:
                    manifest.put_caption(crel, *to_cache)
            else:  # no readable sidecar: the file name up to the first '_'
                name = rels[i].rsplit("/", 1)[-1]
                captions[i] = name[: name.rfind(".")].split("_", 1)[0].strip()

    try:
        _run_jobs(jobs, apply, saver.tick, workers)
    except BaseException:
        manifest.write()  # interrupted: keep every header read so far for the next scan
        raise

    # Assemble in walk order: concepts, problems and log lines exactly as a one-image-at-a-time scan gives them.
    concepts: list[Concept] = []
    counts: list[int] = []
    for folder_rel, value_files, folder_problems, values, first, end in folders:
        problems.extend(folder_problems)
        multiplier, loss_scale, multiply_file, loss_file = values
        n_ok = end - first
        if failed:
            for i in range(first, end):
                if i in failed:
                    problems.append(Problem("warning", rels[i], failed[i]))
                    n_ok -= 1
        if n_ok:
            concepts.append(Concept(folder_rel, n_ok, multiplier, loss_scale, multiply_file, loss_file))
            counts.append(n_ok)
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

    if failed:
        keep = [i for i in range(len(rels)) if i not in failed]
        rels = [rels[i] for i in keep]
        captions = [captions[i] for i in keep]
        widths = [widths[i] for i in keep]
        heights = [heights[i] for i in keep]
        caption_rels = [caption_rels[i] for i in keep]
    if manifest.file is not None:
        manifest.save(rels, caption_rels)
    if not rels:
        problems.append(
            Problem(
                "error",
                ROOT_CONCEPT,
                f"no images found (looked for {', '.join(IMAGE_EXTENSIONS)} in every subfolder of {root})",
            )
        )
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
