"""The scan's cache: data_root/.edtools_manifest.json keeps (path, size, mtime) -> image size and caption, so a
re-scan of a large tree only stats its files; written atomically, also every few seconds while a scan reads.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..atomic import write_text

__all__ = ["Manifest", "Saver", "decode_text", "encoding_note", "read_bytes", "read_caption", "read_text"]

_O_BINARY = getattr(os, "O_BINARY", 0)
_SAVE_EVERY_S = 5.0  # an interrupted first scan of a large, slow tree keeps what it read
_VERSION = 3  # 3: image entries hold the end check's verdict


def read_bytes(path: str) -> tuple[bytes, os.stat_result]:
    """A file's bytes without the text layer's cost, with its stat taken before reading."""
    fd = os.open(path, os.O_RDONLY | _O_BINARY)
    try:
        stat = os.fstat(fd)
        data = os.read(fd, stat.st_size + 1)
        if len(data) > stat.st_size:  # it grew since: read on to its end
            parts = [data]
            while part := os.read(fd, 1 << 16):
                parts.append(part)
            data = b"".join(parts)
    finally:
        os.close(fd)
    return data, stat


def read_text(path: str) -> tuple[str, os.stat_result]:
    """A UTF-8 text file (BOM dropped, newlines universal) as open(path, encoding="utf-8-sig").read() gives it,
    without the text layer's cost; with its stat, taken before reading."""
    data, stat = read_bytes(path)
    text = data.decode("utf-8-sig")
    return (text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text), stat


# A caption that is not UTF-8 is read in the first of these that decodes it (latin-1 decodes any bytes), with a
# warning naming the encoding: Windows editors save cp1252 ("ANSI") or UTF-16 with a byte order mark.
_FALLBACK_ENCODINGS = ("cp1252", "latin-1")
_ENCODING_NAMES = {"utf-16": "UTF-16", "cp1252": "cp1252 (Windows Western European)", "latin-1": "latin-1"}


def decode_text(data: bytes) -> tuple[str, str | None]:
    """(text, None) for UTF-8 (BOM dropped), else (text, the encoding it was read in); newlines universal."""
    try:
        text, encoding = data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        text = None
        encodings = _FALLBACK_ENCODINGS
        if data[:2] in (b"\xff\xfe", b"\xfe\xff"):  # a UTF-16 byte order mark
            encodings = ("utf-16", *encodings)
        for encoding in encodings:
            try:
                text = data.decode(encoding)
                break
            except UnicodeDecodeError:
                continue
    return (text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text), encoding


def encoding_note(encoding: str, caption: str) -> str:
    """The warning for a caption file read in a fallback encoding: which one, and what it gave."""
    shown = caption if len(caption) <= 60 else caption[:57] + "..."
    return (
        f"this caption file is not UTF-8; it was read as {_ENCODING_NAMES.get(encoding, encoding)}: "
        f"'{shown}'; if that looks wrong, save the file as UTF-8"
    )


def read_caption(candidates: list, manifest: Manifest) -> tuple:
    """(caption, its path, (stat, caption, encoding) to cache or None, notes) from the first candidate that is
    UTF-8; when none is, the first readable one in a fallback encoding. notes: ((path, warning), ...) for a
    caption file that is not UTF-8. Safe in a worker thread (reads the manifest, never writes it)."""
    fallback = None  # (path, caption, encoding, to cache) of the first readable candidate that is not UTF-8
    for rel, entry in candidates:
        try:
            cached = manifest.captions.get(rel)
            if cached is not None:
                stat = entry.stat()
                if cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
                    if len(cached) < 4:
                        return cached[2], rel, None, _passed_over(fallback, rel)
                    fallback = fallback or (rel, cached[2], cached[3], None)
                    continue
            data, stat = read_bytes(entry.path)
        except OSError:
            continue
        text, encoding = decode_text(data)
        caption = text.strip()
        if encoding is None:
            return caption, rel, (stat, caption, None), _passed_over(fallback, rel)
        fallback = fallback or (rel, caption, encoding, (stat, caption, encoding))
    if fallback is None:
        return None, None, None, ()
    rel, caption, encoding, to_cache = fallback
    return caption, rel, to_cache, ((rel, encoding_note(encoding, caption)),)


def _passed_over(fallback: tuple | None, used: str) -> tuple:
    if fallback is None:
        return ()
    name = used.rsplit("/", 1)[-1]
    return (
        (
            fallback[0],
            f"this caption file is not UTF-8, so the caption comes from '{name}'; save it as UTF-8 to use it",
        ),
    )


class Manifest:
    """Cache of (path, size, mtime) -> (width, height) or caption, so a re-scan of a large tree only stats.
    entries: {image path: [size, mtime_ns, width, height, whole]} (whole: 1, or 0 for a truncated file, which is
    kept so a re-scan skips it unread); captions: {caption file: [size, mtime_ns, text]}, with the encoding
    appended when it is not UTF-8. A version 2 manifest (before the end check) keeps its captions; its images are
    read once more."""

    def __init__(self, file: Path | None):
        self.file = file
        self.entries: dict[str, list] = {}
        self.captions: dict[str, list] = {}
        self.dirty = False
        if file is not None:
            try:
                with open(file, "rb") as f:
                    data = json.loads(f.read())
                version = data.get("version")
                if version in (2, _VERSION):
                    self.entries, self.captions = data["entries"], data["captions"]
                    if not (isinstance(self.entries, dict) and isinstance(self.captions, dict)):
                        raise ValueError("not a manifest")
                    if version != _VERSION:
                        self.entries, self.dirty = {}, True
            except (OSError, ValueError, KeyError, AttributeError):
                self.entries, self.captions = {}, {}

    def get_caption(self, rel: str, stat: os.stat_result) -> str | None:
        entry = self.captions.get(rel)
        if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
        return None

    def put_caption(self, rel: str, stat: os.stat_result, caption: str, encoding: str | None = None) -> None:
        """Cache a caption; one read in a fallback encoding keeps it, so a re-scan warns again unread."""
        entry = [stat.st_size, stat.st_mtime_ns, caption]
        if encoding is not None:
            entry.append(encoding)
        self.captions[rel] = entry
        self.dirty = True

    def write(self) -> None:
        """Write what is cached now, atomically (also mid-scan: nothing is dropped before the scan ends)."""
        if self.file is None or not self.dirty:
            return
        try:
            payload = {"version": _VERSION, "entries": self.entries, "captions": self.captions}
            text = json.dumps(payload, ensure_ascii=False, check_circular=False, separators=(",", ":"))
            write_text(self.file, text)
            self.dirty = False
        except OSError:
            self.file = None  # a read-only data root still scans; it just is not cached (no more tries)

    def save(self, images: list[str], captions: list[str | None]) -> None:
        """Keep only the entries of these images and caption files (the others are gone or unreadable now) and
        write if anything changed. Every one of them has an entry: when the counts match nothing is stale."""
        used = set(captions)
        used.discard(None)
        for table, keep in ((self.entries, images), (self.captions, used)):
            if len(table) != len(keep):
                keep = keep if isinstance(keep, set) else set(keep)
                stale = [rel for rel in table if rel not in keep]
                for rel in stale:
                    del table[rel]
                self.dirty = self.dirty or bool(stale)
        self.write()


class Saver:
    """Writes the manifest every _SAVE_EVERY_S seconds while headers are read (never more than ~5% of the time)."""

    def __init__(self, manifest: Manifest):
        self.manifest = manifest
        self.next = time.monotonic() + _SAVE_EVERY_S

    def tick(self) -> None:
        now = time.monotonic()
        if now >= self.next and self.manifest.dirty:
            self.manifest.write()
            took = time.monotonic() - now
            self.next = time.monotonic() + max(_SAVE_EVERY_S, 20 * took)
