"""The scan's cache: data_root/.edtools_manifest.json keeps (path, size, mtime) -> image size and caption, so a
re-scan of a large tree only stats its files; written atomically, also every few seconds while a scan reads.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .atomic import write_text

__all__ = ["Manifest", "Saver", "read_caption", "read_text"]

_O_BINARY = getattr(os, "O_BINARY", 0)
_SAVE_EVERY_S = 5.0  # an interrupted first scan of a large, slow tree keeps what it read


def read_text(path: str) -> tuple[str, os.stat_result]:
    """A UTF-8 text file (BOM dropped, newlines universal) as open(path, encoding="utf-8-sig").read() gives it,
    without the text layer's cost; with its stat, taken before reading."""
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
    text = data.decode("utf-8-sig")
    return (text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text), stat


def read_caption(candidates: list, manifest: Manifest) -> tuple[str | None, str | None, tuple | None]:
    """(caption, its path, (stat, caption) to cache or None) from the first readable candidate; safe in a worker
    thread (reads the manifest, never writes it)."""
    for rel, entry in candidates:
        try:
            if rel in manifest.captions:
                caption = manifest.get_caption(rel, entry.stat())
                if caption is not None:
                    return caption, rel, None
            text, stat = read_text(entry.path)
            caption = text.strip()
            return caption, rel, (stat, caption)
        except (OSError, UnicodeDecodeError):
            continue
    return None, None, None


class Manifest:
    """Cache of (path, size, mtime) -> (width, height) or caption, so a re-scan of a large tree only stats.
    entries: {image path: [size, mtime_ns, width, height]}, captions: {caption file: [size, mtime_ns, text]}."""

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
                    if not (isinstance(self.entries, dict) and isinstance(self.captions, dict)):
                        raise ValueError("not a manifest")
            except (OSError, ValueError, KeyError, AttributeError):
                self.entries, self.captions = {}, {}

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
