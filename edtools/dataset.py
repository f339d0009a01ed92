"""Scan a data root: images, captions, sizes, and the per-folder multiply.txt / loss_scale.txt.

This is the only module that reads or writes those two files; everything downstream sees plain numbers.
"""

from __future__ import annotations

import dataclasses
import json
import math
import operator
import os
import queue
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
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
# Image headers
#
# Width, height and EXIF orientation straight from the bytes of JPEG and PNG files, several times faster than
# PIL's Image.open + getexif (which, for a PNG without an early eXIf chunk, decodes every pixel). The parser only
# answers when it is sure PIL would give the same answer: every segment or chunk it meets must be one it knows
# and well formed; anything else (other formats, MPO, Photoshop blocks, XMP-only orientation in PNG, odd EXIF,
# truncated files, decompression-bomb sizes) returns None and PIL decides, exactly as before.

_O_BINARY = getattr(os, "O_BINARY", 0)
_FIRST_READ = 16384
_SURE_TEXT_BYTES = 1 << 20  # PNG text beyond this: let PIL apply its own text-memory limit

# TIFF field types PIL's IFD reader loads, with their unit sizes (tests check this against PIL).
_TIFF_UNIT_SIZE = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')  # the pattern PIL's getexif uses
_JPEG_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xDE))
_JPEG_MARKER = struct.Struct(">BBH")
_JPEG_SIZE = struct.Struct(">HH")  # height, width in a SOF segment
_JPEG_SKIP = frozenset((0xC4, 0xCC, 0xDC, 0xDD, 0xDF, 0xFE))  # DHT, DAC, DNL, DRI, EXP, COM: length only
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHUNK_HEAD = struct.Struct(">I4s")
_U32 = struct.Struct(">I")
_PNG_CHUNK_ID = re.compile(rb"[A-Za-z0-9_]{4}")
# (bit depth, colour type) pairs PIL opens, and the chunk types PIL has a handler for (tests check both).
_PNG_MODES = frozenset(
    ((1, 0), (2, 0), (4, 0), (8, 0), (16, 0), (8, 2), (16, 2), (1, 3), (2, 3), (4, 3), (8, 3))
    + ((8, 4), (16, 4), (8, 6), (16, 6))
)
_PNG_PIL_CHUNKS = frozenset(
    b"IHDR IDAT IEND PLTE tRNS gAMA cHRM sRGB pHYs tEXt zTXt iTXt eXIf iCCP acTL fcTL fdAT".split()
)
_PNG_MIN_LENGTH = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"pHYs": 9}
_PNG_TEXT = frozenset((b"tEXt", b"zTXt", b"iTXt"))
_PNG_SPECIAL_TEXT = frozenset((b"exif", b"Raw profile type exif", b"XML:com.adobe.xmp"))


class _Unsure(Exception):
    """The header parser cannot promise PIL's answer for this file."""


def _more(fd: int, data: bytes, need: int) -> bytes:
    """The file's first `need` bytes (fewer at its end), reading on from what `data` already holds."""
    while len(data) < need:
        part = os.read(fd, max(need - len(data), len(data)))
        if not part:
            break
        data += part
    return data


def _tiff_orientation(data: bytes) -> int | None:
    """EXIF orientation from TIFF-structured data as PIL's Exif reads it; None when absent."""
    while data.startswith(b"Exif\x00\x00"):
        data = data[6:]
    if not data:
        return None
    if len(data) < 8:
        raise _Unsure
    order = {b"II*\x00": "<", b"MM\x00*": ">"}.get(data[:4])
    if order is None:
        raise _Unsure
    limit = len(data)
    (ifd,) = struct.unpack_from(order + "L", data, 4)
    if ifd + 2 > limit:
        raise _Unsure
    (count,) = struct.unpack_from(order + "H", data, ifd)
    if ifd + 2 + 12 * count > limit:
        raise _Unsure  # PIL keeps the entries before the cut; let it decide
    entry = struct.Struct(order + "HHLL")
    stored: set[int] = set()
    total = 0
    orientation = None
    for offset in range(ifd + 2, ifd + 2 + 12 * count, 12):
        tag, kind, n, value = entry.unpack_from(data, offset)
        if tag in stored:
            continue  # PIL keeps the first
        unit = _TIFF_UNIT_SIZE.get(kind)
        if unit is None:
            continue  # PIL skips types it does not know
        size = n * unit
        if size == 0:
            continue
        if size > 4:
            total += size
            if total > limit:
                continue  # PIL skips it with a warning
            if value + size > limit:
                raise _Unsure  # PIL stops reading the directory here
        stored.add(tag)
        if tag == 0x0112:
            if kind != 3 or n != 1:
                raise _Unsure
            (orientation,) = struct.unpack_from(order + "H", data, offset + 8)
        elif (tag == 0x011A and (kind, n) != (5, 1)) or (tag == 0x0128 and (kind, n) != (3, 1)):
            raise _Unsure  # PIL reads these two for the dpi while opening a JPEG
    return orientation


def _check_size(width: int, height: int) -> None:
    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if width < 1 or height < 1 or (limit is not None and width * height > limit):
        raise _Unsure  # PIL's errors and decompression-bomb warnings are PIL's to give


def _photoshop_resources(s: bytes) -> None:
    """Walk an APP13 Photoshop block as PIL does; raise _Unsure where PIL's walk fails (a cut resource name)."""
    offset = 14
    while s[offset : offset + 4] == b"8BIM":
        offset += 4
        if offset + 2 > len(s):
            return  # PIL stops quietly at a short read (struct.error)
        code = int.from_bytes(s[offset : offset + 2], "big")
        offset += 2
        if offset >= len(s):
            raise _Unsure  # IndexError in PIL: the file does not open
        offset += 1 + s[offset]
        offset += offset & 1
        if offset + 4 > len(s):
            return
        size = int.from_bytes(s[offset : offset + 4], "big")
        offset += 4
        if code == 0x03ED and len(s[offset : offset + size]) < 14:
            return
        offset += size
        offset += offset & 1


def _jpeg_header(fd: int, data: bytes) -> tuple[int, int, int]:
    """(width, height, orientation) of a JPEG, segment by segment up to the scan as PIL's JpegImageFile reads."""
    pos, size, exif, n_exif, xmp = 2, None, None, 0, None
    marker = _JPEG_MARKER.unpack_from
    while True:
        if pos + 4 > len(data):
            data = _more(fd, data, pos + 4)
            if pos + 4 > len(data):
                raise _Unsure  # a segment runs past the end (PIL reads each whole) or no scan follows
        ff, m, length = marker(data, pos)
        if ff != 0xFF:
            raise _Unsure
        if m == 0xFF:  # fill byte
            pos += 1
            continue
        start = pos + 4
        pos += 2 + length
        if length < 2:
            raise _Unsure
        if m in _JPEG_SKIP:
            continue
        if 0xE0 <= m <= 0xEF:
            n = length - 2
            if start + 32 > len(data):
                data = _more(fd, data, min(pos, start + 32))
            if m == 0xE1:
                if data.startswith(b"Exif\x00\x00", start, pos):
                    n_exif += 1
                    exif = (start, pos)
                elif data.startswith(b"http://ns.adobe.com/xap/1.0/\x00", start, pos):
                    xmp = (start, pos)
            elif m == 0xE0:
                if n < 7 and data.startswith(b"JFIF", start, pos):
                    raise _Unsure
            elif m == 0xE2:
                if data.startswith(b"MPF\x00", start, pos) or (
                    n < 14 and data.startswith(b"ICC_PROFILE\x00", start, pos)
                ):
                    raise _Unsure
            elif m == 0xED:
                if data.startswith(b"Photoshop 3.0\x00", start, pos):
                    data = _more(fd, data, pos)
                    _photoshop_resources(data[start:pos])
            elif m == 0xEE and n < 7 and data.startswith(b"Adobe", start, pos):
                raise _Unsure
            continue
        if pos > len(data):
            data = _more(fd, data, pos)
            if pos > len(data):
                raise _Unsure
        if m in _JPEG_SOF:
            if length < 8 or data[start] != 8 or data[start + 5] not in (1, 3, 4):
                raise _Unsure
            size = _JPEG_SIZE.unpack_from(data, start + 1)
        elif m == 0xDB:
            i = start
            while i < pos:
                i += 65 if data[i] < 16 else 129
            if i > pos:
                raise _Unsure  # PIL: bad quantization table marker
        elif m == 0xDA:
            if size is None:
                raise _Unsure
            break
        else:
            raise _Unsure
    if n_exif > 1:
        raise _Unsure
    height, width = size
    _check_size(width, height)
    orientation = None
    if exif is not None:
        data = _more(fd, data, exif[1])
        orientation = _tiff_orientation(data[exif[0] : exif[1]])
    if orientation is None and xmp is not None:
        data = _more(fd, data, xmp[1])
        found = _XMP_ORIENTATION.search(data[xmp[0] : xmp[1]].split(b"\x00", 1)[1])
        orientation = int(found[2]) if found else None
    return width, height, 1 if orientation is None else orientation


def _png_text(cid: bytes, data: bytes) -> int:
    """Bytes of text a tEXt/zTXt/iTXt chunk adds, as PIL reads it; _Unsure for keys that carry orientation and
    for what PIL could refuse (unknown or oversized compression)."""
    key, _, rest = data.partition(b"\x00")
    if key in _PNG_SPECIAL_TEXT:
        raise _Unsure
    if cid == b"zTXt":
        if rest and rest[0] != 0:
            raise _Unsure
        inflate = zlib.decompressobj()
        try:
            text = inflate.decompress(rest[1:], 1 << 20)  # PIL's MAX_TEXT_CHUNK
        except zlib.error:
            return 0  # PIL keeps an empty text
        if inflate.unconsumed_tail:
            raise _Unsure
        return len(text)
    if cid == b"iTXt" and len(rest) >= 2 and rest[0] != 0:
        raise _Unsure
    return len(rest)


def _png_header(fd: int, data: bytes, whole: bool) -> tuple[int, int, int]:
    """(width, height, orientation) of a PNG: the chunks PIL reads when opening it, CRCs checked, and, where
    PIL's getexif would decode the image, every IDAT's CRC and the chunks after the pixels. whole: data is
    the whole file."""
    pos, size, colour, exif, text = 8, None, 0, None, 0
    u32 = _U32.unpack_from
    while True:  # up to the first IDAT
        if pos + 8 > len(data):
            data = _more(fd, data, pos + 8)
            if pos + 8 > len(data):
                raise _Unsure
        length, cid = _PNG_CHUNK_HEAD.unpack_from(data, pos)
        if cid not in _PNG_PIL_CHUNKS and not _PNG_CHUNK_ID.fullmatch(cid):
            raise _Unsure
        if cid == b"IDAT" and size is not None:
            break
        end = pos + 12 + length
        if end > len(data):
            data = _more(fd, data, end)
            if end > len(data):
                raise _Unsure
        if zlib.crc32(memoryview(data)[pos + 4 : end - 4]) != u32(data, end - 4)[0]:
            raise _Unsure
        if cid == b"IHDR":
            if size is not None or length < 13 or (data[pos + 16], data[pos + 17]) not in _PNG_MODES:
                raise _Unsure
            if data[pos + 19]:
                raise _Unsure  # PIL: unknown filter category
            size = u32(data, pos + 8)[0], u32(data, pos + 12)[0]
            colour = data[pos + 17]
        elif size is None:
            raise _Unsure
        elif cid in _PNG_TEXT:
            text += _png_text(cid, data[pos + 8 : end - 4])
        elif cid == b"tRNS":
            if length < {0: 2, 2: 6}.get(colour, 0):
                raise _Unsure
        elif cid in _PNG_MIN_LENGTH:
            if length < _PNG_MIN_LENGTH[cid]:
                raise _Unsure
        elif cid == b"eXIf":
            exif = data[pos + 8 : end - 4]
        elif cid == b"iCCP":
            profile = data[pos + 8 : end - 4]
            i = profile.find(b"\x00")
            if i < 0 or i + 1 >= length or profile[i + 1] != 0:
                raise _Unsure
            inflate = zlib.decompressobj()
            try:
                inflate.decompress(profile[i + 2 :], 1 << 20)  # PIL's MAX_TEXT_CHUNK
                too_large = bool(inflate.unconsumed_tail)
            except zlib.error:
                too_large = False  # PIL drops a broken profile silently
            if too_large:
                raise _Unsure
        elif cid in _PNG_PIL_CHUNKS and cid != b"PLTE":
            raise _Unsure  # APNG chunks, IEND before the pixels
        pos = end
    width, height = size
    _check_size(width, height)
    if exif is None:
        # PIL's getexif decodes the image here, then reads the chunks after the pixels (eXIf, text). Instead,
        # check the CRC of every IDAT chunk and walk to IEND: a truncated or damaged file is left to PIL, which
        # rejects it as before.
        after_pixels = False
        if not whole:
            data = _more(fd, data, os.fstat(fd).st_size)  # the whole file, in one read
        while True:
            end = pos + 12 + length
            if end + 8 > len(data):
                data = _more(fd, data, end + 8)
                if end + 8 > len(data):
                    raise _Unsure
            if cid == b"IDAT":
                if after_pixels or zlib.crc32(memoryview(data)[pos + 4 : end - 4]) != u32(data, end - 4)[0]:
                    raise _Unsure
            else:
                after_pixels = True
                if cid == b"eXIf":
                    exif = data[pos + 8 : end - 4]
                elif cid in _PNG_TEXT:
                    text += _png_text(cid, data[pos + 8 : end - 4])
                elif cid in _PNG_PIL_CHUNKS:
                    raise _Unsure
            pos = end
            length, cid = _PNG_CHUNK_HEAD.unpack_from(data, pos)
            if cid not in _PNG_PIL_CHUNKS and not _PNG_CHUNK_ID.fullmatch(cid):
                raise _Unsure
            if cid == b"IEND":
                break
    if text > _SURE_TEXT_BYTES:
        raise _Unsure
    orientation = _tiff_orientation(exif) if exif is not None else None
    return width, height, 1 if orientation is None else orientation


def _header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as displayed, from a JPEG or PNG header; None when PIL has to decide."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY)
    except OSError:
        return None
    try:
        data = os.read(fd, _FIRST_READ)
        if data.startswith(b"\xff\xd8\xff"):
            width, height, orientation = _jpeg_header(fd, data)
        elif data.startswith(_PNG_SIGNATURE):
            width, height, orientation = _png_header(fd, data, len(data) < _FIRST_READ)
        else:
            return None
    except Exception:  # _Unsure, short reads, anything unexpected: PIL decides
        return None
    finally:
        os.close(fd)
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees: the trained picture is transposed
        return height, width
    return width, height


def _pil_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Width and height as PIL sees them (opens lazily; a PNG without early EXIF is decoded by getexif)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return int(width), int(height)


def _image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Width and height as displayed (EXIF orientation applied), from the file header; raises if unreadable."""
    return _header_size(path) or _pil_image_size(path)


# ---------------------------------------------------------------------------------------------------------
# Scanning

_SAVE_EVERY_S = 5.0  # an interrupted first scan of a large, slow tree keeps what it read
_IO_WORKERS = 16  # header reads in parallel on slow storage (network drives: latency per file)
_SLOW_READ_S = 0.0003  # mean seconds per image above which reads go to the thread pool
_PROBE = 32  # images read in this process between speed checks
_CHUNK = 8  # images per pool task


def _read_text(path: str, size: int) -> str:
    """A UTF-8 text file (BOM dropped, newlines universal) as open(path, encoding="utf-8-sig").read() gives it,
    without the text layer's cost."""
    fd = os.open(path, os.O_RDONLY | _O_BINARY)
    try:
        data = os.read(fd, size + 1)
        if len(data) > size:  # it grew since it was listed: read on to its end
            parts = [data]
            while part := os.read(fd, 1 << 16):
                parts.append(part)
            data = b"".join(parts)
    finally:
        os.close(fd)
    text = data.decode("utf-8-sig")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def _read_caption(candidates: list, manifest: _Manifest) -> tuple[str | None, str | None, tuple | None]:
    """(caption, its path, (stat, caption) to cache or None) from the first readable candidate; safe in a worker
    thread (reads the manifest, never writes it)."""
    for rel, entry in candidates:
        try:
            stat = entry.stat()
            caption = manifest.get_caption(rel, stat)
            if caption is not None:
                return caption, rel, None
            caption = _read_text(entry.path, stat.st_size).strip()
            return caption, rel, (stat, caption)
        except (OSError, UnicodeDecodeError):
            continue
    return None, None, None


class _Manifest:
    """Cache of (path, size, mtime) -> (width, height) or caption, so a re-scan of a large tree only stats."""

    def __init__(self, file: Path | None):
        self.file = file
        self.entries: dict[str, list] = {}
        self.captions: dict[str, list] = {}
        self.dirty = False
        if file is not None:
            try:
                with open(file, "rb") as f:
                    data = json.loads(f.read())
                if data.get("version") == 2:
                    self.entries, self.captions = data["entries"], data["captions"]
            except (OSError, ValueError, KeyError, AttributeError):
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

    def write(self) -> None:
        """Write what is cached now, atomically (also mid-scan: nothing is dropped before the scan ends)."""
        if self.file is None or not self.dirty:
            return
        try:
            payload = {"version": 2, "entries": self.entries, "captions": self.captions}
            write_text(self.file, json.dumps(payload, ensure_ascii=False))
            self.dirty = False
        except OSError:
            pass  # a read-only data root still scans; it just is not cached

    def save(self, seen: set[str]) -> None:
        """Drop entries of files that are gone (or unreadable now) and write if anything changed."""
        for table in (self.entries, self.captions):
            stale = [rel for rel in table if rel not in seen]
            for rel in stale:
                del table[rel]
            self.dirty = self.dirty or bool(stale)
        self.write()


class _Saver:
    """Writes the manifest every _SAVE_EVERY_S seconds while headers are read (never more than ~5% of the time)."""

    def __init__(self, manifest: _Manifest):
        self.manifest = manifest
        self.next = time.monotonic() + _SAVE_EVERY_S

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next and self.manifest.dirty:
            self.manifest.write()
            took = time.monotonic() - now
            self.next = time.monotonic() + max(_SAVE_EVERY_S, 20 * took)


def _walk(root: str) -> Iterable[tuple[str, str, list[os.DirEntry]]]:
    """Folders under root (sorted, hidden ones skipped): (path, path relative to root with '/', plain files)."""
    stack = [(root, "")]
    by_name = operator.attrgetter("name")
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=by_name)
        except OSError:
            continue
        files, subfolders = [], []
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            if entry.is_dir(follow_symlinks=True):
                subfolders.append((entry.path, rel + name if not rel else rel + "/" + name))
            elif entry.is_file(follow_symlinks=True):
                files.append(entry)
        yield folder, rel, files
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


def _job(job: tuple) -> tuple:
    """Read what the manifest did not have for one image: its header (unless cached), then its caption."""
    i, entry, stat, candidates, manifest = job
    size = None
    if stat is not None:
        try:
            size = _image_size(entry)
        except Exception as exc:  # any unreadable image is reported and skipped, never fatal
            return i, exc, None
    return i, size, _read_caption(candidates, manifest) if candidates else None


def _run_jobs(jobs: list, apply, workers: int | None) -> None:
    """Run jobs in order in this thread while reads are fast, in a thread pool when they are slow (network
    storage) or workers >= 2 asks for it; results go to apply() in this thread as they arrive."""
    if not jobs:
        return
    from PIL import Image  # noqa: F401  (imported once here, not inside the first timed read)

    done = 0
    if workers is None or workers <= 1:
        clock = time.perf_counter
        while done < len(jobs):
            block = jobs[done : done + _PROBE]
            took = []
            for job in block:
                start = clock()
                result = _job(job)
                took.append(clock() - start)
                apply(result)
            done += len(block)
            if workers is None and sorted(took)[len(took) // 2] > _SLOW_READ_S:
                break  # slow storage (the median read, not one slow outlier): the rest in parallel
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
    problems: list[Problem] = []
    log: list[str] = []
    if not root.is_dir():
        raise DatasetError(
            f"data_root '{data_root}' is not a folder; create it or point to your image folders"
        )
    manifest = _Manifest(root / MANIFEST_NAME if cache else None)
    entries_get, captions_get = manifest.entries.get, manifest.captions.get

    # One pass over the tree: stats, cache look-ups, folder values. Images the manifest cannot answer for become
    # jobs; everything is assembled in walk order afterwards, so the result never depends on read timing.
    folders: list[tuple] = []
    rels: list[str] = []
    widths: list[int] = []
    heights: list[int] = []
    captions: list[str | None] = []
    caption_rels: list[str | None] = []
    stats: dict[int, os.stat_result] = {}
    failed: dict[int, str] = {}
    jobs: list[tuple] = []

    for folder, folder_rel, files in _walk(str(root)):
        prefix = folder_rel + "/" if folder_rel else ""
        folder_rel = folder_rel or ROOT_CONCEPT
        by_name = {}
        images = []
        folder_problems: list[Problem] = []
        for entry in files:
            name = entry.name
            by_name[name] = entry
            dot = name.rfind(".")
            if dot > 0 and name[dot:].lower() in _IMAGE_EXTENSION_SET:
                images.append(entry)
            if name[0] in "mMlL":
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
            cached = entries_get(rel)
            if cached is not None and cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
                widths.append(cached[2])
                heights.append(cached[3])
                need = None
            else:
                widths.append(0)
                heights.append(0)
                need = stats[i] = stat
            stem = name[: name.rfind(".")]
            txt = by_name.get(stem + ".txt")
            other = by_name.get(stem + ".caption")
            candidates = None
            if txt is None and other is None:
                captions.append(stem.split("_", 1)[0].strip())
                caption_rels.append(None)
            else:
                candidates = [] if txt is None or stem in _VALUE_STEMS else [(prefix + txt.name, txt)]
                if other is not None:
                    candidates.append((prefix + other.name, other))
                hit = None
                if candidates:
                    # The usual case, a cached caption whose file did not change, is answered here.
                    crel, centry = candidates[0]
                    try:
                        cstat = centry.stat()
                        hit = captions_get(crel)
                        if hit is not None and (hit[0] != cstat.st_size or hit[1] != cstat.st_mtime_ns):
                            hit = None
                    except OSError:
                        pass
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
        folders.append((folder_rel, by_name, folder_problems, values, first, len(rels)))

    saver = _Saver(manifest)

    def apply(result: tuple) -> None:
        i, size, caption = result
        if isinstance(size, BaseException):
            failed[i] = f"cannot read this image ({size}); it is skipped"
            return
        if size is not None:
            manifest.put(rels[i], stats[i], size)
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
        saver.tick()

    try:
        _run_jobs(jobs, apply, workers)
    except BaseException:
        manifest.write()  # interrupted: keep every header read so far for the next scan
        raise

    # Assemble in walk order: concepts, problems and log lines exactly as a one-image-at-a-time scan gives them.
    concepts: list[Concept] = []
    counts: list[int] = []
    for folder_rel, names, folder_problems, values, first, end in folders:
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

    if failed:
        keep = [i for i in range(len(rels)) if i not in failed]
        rels = [rels[i] for i in keep]
        captions = [captions[i] for i in keep]
        widths = [widths[i] for i in keep]
        heights = [heights[i] for i in keep]
        caption_rels = [caption_rels[i] for i in keep]
    if manifest.file is not None:
        seen = set(rels)
        seen.update(caption_rels)
        manifest.save(seen)
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
