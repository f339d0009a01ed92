"""Each image's size and caption for a scan: from the manifest where the file did not change, else read.

Reads (header, end check, sidecar caption) run in this thread while fast, in a thread pool on slow storage;
results are kept by image number, so what a scan returns never depends on read timing.
"""

from __future__ import annotations

import os

from .imageheader import ImageFile, ends_whole, image_complete, image_size, pil_module
from .manifest import Manifest, Saver, encoding_note, read_caption
from .readpool import run_jobs
from .walk import Folder, duplicate_links

__all__ = ["ImageTable"]

_IO_WORKERS = 16  # header reads in parallel on slow storage (network drives: latency per file)
_SLOW_READ_S = 0.0003  # mean seconds per image above which reads go to the thread pool
_PROBE = 32  # images read in this thread between speed checks
_CHUNK = 8  # images per pool task

_STAT_ON_OPEN = object()  # a job's stat: not taken yet; the header reader takes it when it opens the file

_TRUNCATED = (
    "cannot read this image (the file is truncated: its end is missing, as after an interrupted copy or "
    "download); it is skipped: copy it again from the original"
)


def _name_caption(stem: str) -> str:
    """The caption of an image without a readable sidecar: its file name (stem) up to the first '_'."""
    return stem.split("_", 1)[0].strip()


def _job(job: tuple) -> tuple:
    """Read what the manifest did not have for one image: its header and end (unless cached), then its caption.
    Returns (image number, size or the exception, caption result or None, the image's stat, whole)."""
    i, entry, stat, candidates, manifest = job
    size = None
    if stat is not None:
        target = ImageFile(entry) if stat is _STAT_ON_OPEN else entry
        try:
            try:
                size = image_size(target)
                whole = image_complete(target)
            except Exception:
                if ends_whole(target):
                    raise
                size, whole = (0, 0), False  # a JPEG or PNG that does not open and whose end is missing
            if stat is _STAT_ON_OPEN:
                stat = target.stat or os.stat(target.path)
            if not whole:
                return i, size, None, stat, False
        except Exception as exc:  # any unreadable image is reported and skipped, never fatal
            return i, exc, None, None, False
    return i, size, read_caption(candidates, manifest) if candidates else None, stat, True


class ImageTable:
    """The images of one scan in walk order, by image number: path, size, caption, and why any was skipped.

    add_folder() answers what the manifest can and queues the rest as jobs; read() runs the jobs; finish()
    drops the skipped images and saves the manifest. Not thread-safe: one scan, one table.
    """

    def __init__(self, manifest: Manifest, value_stems: tuple[str, ...]):
        self.manifest = manifest
        self.value_stems = value_stems  # <stem>.txt of these is a folder value, never a caption
        self.rels: list[str] = []
        self.widths: list[int] = []
        self.heights: list[int] = []
        self.captions: list[str | None] = []
        self.caption_rels: list[str | None] = []
        self.failed: dict[int, str] = {}  # image number -> why it is skipped
        self.truncated: list[
            int
        ] = []  # skipped, but their manifest entries stay: a re-scan skips them unread
        self.notes: dict[int, tuple] = {}  # image number -> ((path, warning), ...) about its caption file
        self.linked: list[tuple[int, str]] = []  # (image number, real path) of images reached through a link
        self.jobs: list[tuple] = []

    def __len__(self) -> int:
        return len(self.rels)

    def add_folder(self, folder: Folder, prefix: str) -> None:
        """The images directly in one walked folder (prefix: its path relative to the root, with '/')."""
        entries_get, captions_get = self.manifest.entries.get, self.manifest.captions.get
        rels, widths, heights = self.rels, self.widths, self.heights
        captions, caption_rels, jobs = self.captions, self.caption_rels, self.jobs
        by_name, sidecars = folder.files, folder.sidecars
        through, links = folder.through_link, folder.linked
        for entry in folder.images:
            name = entry.name
            rel = prefix + name
            i = len(rels)
            rels.append(rel)
            if through or links:
                real = links.get(name) or (folder.real + os.sep + name if through else None)
                if real:
                    self.linked.append((i, real))
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
                if message is None:
                    if cached[0] == stat.st_size and cached[1] == stat.st_mtime_ns:
                        need = None
                        if not cached[4]:  # unchanged since the end check found it truncated
                            message = _TRUNCATED
                            self.truncated.append(i)
                    else:
                        need = stat
                if message is not None:
                    self.failed[i] = message
                    widths.append(0)
                    heights.append(0)
                    captions.append(None)
                    caption_rels.append(None)
                    continue
            if need is None:
                widths.append(cached[2])
                heights.append(cached[3])
            else:
                widths.append(0)
                heights.append(0)
            stem = name[: name.rfind(".")]
            candidates = None
            if stem not in sidecars:
                captions.append(_name_caption(stem))
                caption_rels.append(None)
            else:
                txt = by_name.get(stem + ".txt")
                other = by_name.get(stem + ".caption")
                candidates = [] if txt is None or stem in self.value_stems else [(prefix + txt.name, txt)]
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
                    if hit is not None and len(hit) > 3:  # read in a fallback encoding: warn again
                        if len(candidates) > 1:
                            hit = None  # unless the other caption file is UTF-8: the job decides
                        else:
                            self.notes[i] = ((crel, encoding_note(hit[3], hit[2])),)
                if hit is not None:
                    captions.append(hit[2])
                    caption_rels.append(crel)
                    candidates = None
                elif candidates:
                    captions.append(None)  # read by the job
                    caption_rels.append(None)
                else:
                    captions.append(_name_caption(stem))
                    caption_rels.append(None)
            if need is not None or candidates:
                jobs.append((i, entry, need, candidates, self.manifest))

    def drop_duplicate_links(self, root: str) -> None:
        """A second way to an image through a link: the image trains once, the other path is named."""
        if not self.linked:
            return
        numbers = {rel: i for i, rel in enumerate(self.rels)}
        duplicates = duplicate_links(self.linked, numbers, root, self.rels)
        if duplicates:
            for i, message in duplicates.items():
                self.failed.setdefault(i, message)
                self.notes.pop(i, None)
            self.jobs = [job for job in self.jobs if job[0] not in duplicates]

    def read(self, workers: int | None) -> None:
        """Run the queued jobs: in this thread while reads are fast, in a thread pool when they are slow
        (network storage) or workers >= 2 asks for it (see readpool.run_jobs). The manifest is saved as it
        goes, and on an interrupt, so no header read is lost."""
        if not self.jobs:
            return
        pil_module()  # imported once here, not inside the first timed read
        saver = Saver(self.manifest)
        try:
            run_jobs(
                self.jobs,
                _job,
                self._applier(),
                saver.tick,
                workers,
                probe=_PROBE,
                slow_s=_SLOW_READ_S,
                pool=_IO_WORKERS,
                chunk=_CHUNK,
            )
        except BaseException:
            self.manifest.write()  # interrupted: keep every header read so far for the next scan
            raise

    def _applier(self):
        """The function that stores one job's result (names bound once: it runs for every image read)."""
        manifest, entries, rels, failed, truncated = (
            self.manifest,
            self.manifest.entries,
            self.rels,
            self.failed,
            self.truncated,
        )
        widths, heights, captions, caption_rels, notes = (
            self.widths,
            self.heights,
            self.captions,
            self.caption_rels,
            self.notes,
        )

        def apply(result: tuple) -> None:
            i, size, caption, stat, whole = result
            if isinstance(size, BaseException):
                failed[i] = f"cannot read this image ({size}); it is skipped"
                return
            if size is not None:
                entries[rels[i]] = [stat.st_size, stat.st_mtime_ns, size[0], size[1], 1 if whole else 0]
                manifest.dirty = True
                if not whole:
                    failed[i] = _TRUNCATED
                    truncated.append(i)
                    return
                widths[i], heights[i] = size
            if caption is not None:
                text, crel, to_cache, caption_notes = caption
                if caption_notes:
                    notes[i] = caption_notes
                if text is not None:
                    captions[i], caption_rels[i] = text, crel
                    if to_cache is not None:
                        manifest.put_caption(crel, *to_cache)
                else:  # no readable sidecar
                    name = rels[i].rsplit("/", 1)[-1]
                    captions[i] = _name_caption(name[: name.rfind(".")])

        return apply

    def skipped(self, first: int, end: int) -> tuple[list[tuple[str, str]], int]:
        """Images first..end-1: the (path, warning) pairs about them in order, and how many are skipped."""
        said: list[tuple[str, str]] = []
        n_skipped = 0
        if self.failed or self.notes:
            for i in range(first, end):
                if i in self.notes:
                    said.extend(self.notes[i])
                if i in self.failed:
                    said.append((self.rels[i], self.failed[i]))
                    n_skipped += 1
        return said, n_skipped

    def finish(self) -> tuple[list[str], list[str], list[int], list[int]]:
        """(paths, captions, widths, heights) of the images that train; the manifest saved with them."""
        rels, captions, widths, heights = self.rels, self.captions, self.widths, self.heights
        caption_rels = self.caption_rels
        if self.failed:
            keep = [i for i in range(len(rels)) if i not in self.failed]
            rels = [rels[i] for i in keep]
            captions = [captions[i] for i in keep]
            widths = [widths[i] for i in keep]
            heights = [heights[i] for i in keep]
            caption_rels = [caption_rels[i] for i in keep]
        if self.manifest.file is not None:
            keep_entries = [self.rels[i] for i in self.truncated]
            self.manifest.save(rels + keep_entries if keep_entries else rels, caption_rels)
        return rels, captions, widths, heights
