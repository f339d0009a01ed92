"""The folder walk of a scan: every folder under a data root once, in name order, its files sorted into images,
caption stems, names to check for misnaming and image files edtools does not train.

Symbolic links are followed at most once. A folder is known by its (st_dev, st_ino): a link (or a bind mount, or a
junction) that reaches a folder again is not followed, nor is a link to a folder inside the data root (the walk
reaches that one under its own path) or to a folder that holds the link (a loop). A link to an image file trains
that image once: a second way to the same file is left out (`duplicate_links`). Broken links and links that
cannot be followed are named, never fatal.
"""

from __future__ import annotations

import errno
import operator
import os
import stat as stat_module
from collections import Counter
from collections.abc import Iterator

__all__ = [
    "CAPTION_EXTENSIONS",
    "IMAGE_EXTENSIONS",
    "UNTRAINED_IMAGE_EXTENSIONS",
    "Folder",
    "duplicate_links",
    "untrained_message",
    "walk",
]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_IMAGE_EXTENSION_SET = frozenset(IMAGE_EXTENSIONS)
CAPTION_EXTENSIONS = (".txt", ".caption")
# Image files a person may well drop into a data root that edtools does not train: named by the scan, once per
# folder, so they are not missed without a word.
UNTRAINED_IMAGE_EXTENSIONS = frozenset(
    ".gif .tif .tiff .avif .heic .heif .jxl .jp2 .j2k .jpx .jfif .ico .psd .svg .tga .exr .hdr .dds .ppm .pgm"
    " .pbm .pcx .cr2 .cr3 .crw .nef .nrw .arw .srf .sr2 .dng .orf .rw2 .raf .pef .srw .raw .rwl .3fr .erf .kdc"
    " .mrw .x3f .iiq".split()
)


class Folder:
    """One folder of the walk. files: its plain files {name: DirEntry} in name order (links to files included);
    images: the image entries; sidecars: stems with a caption file; odd: names to check for misnaming;
    untrained: {extension: count} of image files edtools does not train; notes: [(path, message)] about its
    entries (broken links, links not followed); real: its real path; linked: {name: real path} of its image
    entries that are links; through_link: reached through a link to a folder."""

    __slots__ = (
        "path",
        "rel",
        "files",
        "images",
        "sidecars",
        "odd",
        "untrained",
        "notes",
        "real",
        "linked",
        "through_link",
    )

    def __init__(self, path: str, rel: str, real: str, through_link: bool):
        self.path, self.rel, self.real, self.through_link = path, rel, real, through_link
        self.files: dict = {}
        self.images: list = []
        self.sidecars: set = set()
        self.odd: list = []
        self.untrained: Counter | None = None
        self.notes: list = []
        self.linked: dict = {}


def _inside(path: str, folder: str) -> bool:
    """path is folder or lies under it (real paths)."""
    return path == folder or path.startswith(folder if folder.endswith(os.sep) else folder + os.sep)


def _where(real: str, root: str) -> str:
    """A real path as a person reads it: relative to the data root when inside it."""
    if real == root:
        return "the data root"
    if _inside(real, root):
        return "'" + os.path.relpath(real, root).replace(os.sep, "/") + "'"
    return f"'{real}'"


def _link_problem(entry: os.DirEntry, exc: OSError) -> str:
    """What is wrong with a link that cannot be followed (its target missing, a loop of links, ...)."""
    if isinstance(exc, FileNotFoundError):
        try:
            target = os.readlink(entry.path)
        except OSError:
            target = "?"
        return f"is a link to '{target}', which does not exist; it is skipped (fix the link or remove it)"
    if exc.errno == errno.ELOOP:
        return "is a link that leads back to itself through other links (a loop); it is skipped (fix or remove it)"
    return f"is a link that cannot be followed ({exc.strerror or exc}); it is skipped"


def walk(root: str) -> Iterator[Folder]:
    """Folders under root (a real path) in name order, depth first, hidden ones (.name) skipped."""
    by_name = operator.attrgetter("name")
    try:
        st = os.stat(root)
        seen = {(st.st_dev, st.st_ino): "."}  # every folder walked or about to be: (st_dev, st_ino) -> rel
    except OSError:
        seen = {}
    stack = [Folder(root, "", root, False)]
    while stack:
        folder = stack.pop()
        rel = folder.rel
        prefix = rel + "/" if rel else ""
        try:
            with os.scandir(folder.path) as it:
                entries = sorted(it, key=by_name)
        except OSError as exc:
            folder.notes.append(
                (rel or ".", f"cannot list this folder ({exc.strerror or exc}); it is skipped")
            )
            yield folder
            continue
        files, images, sidecars, odd = folder.files, folder.images, folder.sidecars, folder.odd
        subfolders: list[Folder] = []
        linked_files: list = []
        for entry in entries:
            name = entry.name
            if name[0] == ".":
                continue
            if not entry.is_file(follow_symlinks=False) and not _other(
                entry, folder, prefix + name, root, seen, subfolders, linked_files
            ):
                continue
            files[name] = entry
            dot = name.rfind(".")
            if dot > 0:
                ext = name[dot:]
                lower = ext.lower()
                if lower in _IMAGE_EXTENSION_SET:
                    images.append(entry)
                elif ext in CAPTION_EXTENSIONS:
                    sidecars.add(name[:dot])
                elif lower in UNTRAINED_IMAGE_EXTENSIONS:
                    if folder.untrained is None:
                        folder.untrained = Counter()
                    folder.untrained[lower] += 1
            if name[0] in "mMlL":
                odd.append(name)
        for entry in linked_files:
            if entry.name[entry.name.rfind(".") :].lower() in _IMAGE_EXTENSION_SET:
                folder.linked[entry.name] = os.path.realpath(entry.path)
        yield folder
        stack.extend(reversed(subfolders))


def _other(
    entry, folder: Folder, rel: str, root: str, seen: dict, subfolders: list, linked_files: list
) -> bool:
    """An entry that is not a plain file: a subfolder or a link to one is added to subfolders (unless reached
    again), a link that cannot be followed gets a note; True for a link to a plain file (then also in
    linked_files), which is taken as a file."""
    if entry.is_dir(follow_symlinks=False):
        linked = False
    elif entry.is_symlink():
        try:
            mode = os.stat(entry.path).st_mode
        except OSError as exc:
            folder.notes.append((rel, _link_problem(entry, exc)))
            return False
        if stat_module.S_ISREG(mode):
            linked_files.append(entry)
            return True
        if not stat_module.S_ISDIR(mode):
            return False
        linked = True
    else:
        return False  # a device, a pipe, a socket
    sub = _subfolder(entry, folder, rel, root, seen, linked)
    if sub is not None:
        subfolders.append(sub)
    return False


def _subfolder(entry: os.DirEntry, parent: Folder, rel: str, root: str, seen: dict, linked: bool):
    """The Folder to walk for a subfolder entry, or None (with a note on the parent) when it is reached again."""
    real = os.path.realpath(entry.path) if linked else parent.real + os.sep + entry.name
    if linked:
        where = _where(real, root)
        if _inside(parent.real, real):
            parent.notes.append(
                (rel, f"is a link to {where}, a folder that holds this link (a loop); not followed")
            )
            return None
        if _inside(real, root) and not any(
            part.startswith(".") for part in os.path.relpath(real, root).split(os.sep)
        ):
            parent.notes.append(
                (
                    rel,
                    f"is a link to {where}, which is scanned under its own path; not followed, so its images "
                    "do not train twice",
                )
            )
            return None
    try:
        st = os.stat(entry.path)
    except OSError as exc:
        parent.notes.append((rel, f"cannot read this folder ({exc.strerror or exc}); it is skipped"))
        return None
    key = (st.st_dev, st.st_ino)
    first = seen.get(key)
    if first is not None:
        again = "the data root" if first == "." else f"'{first}'"
        if linked:
            message = (
                f"is a link to {_where(real, root)}, a folder already scanned as {again}; not followed, "
            )
        else:
            message = f"is the folder already scanned as {again}, reached a second time; skipped, "
        parent.notes.append((rel, message + "so its images do not train twice"))
        return None
    seen[key] = rel
    return Folder(entry.path, rel, real, linked or parent.through_link)


def duplicate_links(
    images: list[tuple[int, str]], direct: dict[str, int], root: str, rels: list[str]
) -> dict:
    """{image number: message} for images reached through links that are a second way to an image already
    trained. images: (number, real path) of each image reached through a link; direct: {rel: number} of every
    image (its own path wins over any link to it); the first link in walk order wins over later ones."""
    linked = {i for i, _ in images}
    first: dict[str, int] = {}
    out = {}
    for i, real in images:
        j = None
        if _inside(real, root) and real != root:
            j = direct.get(os.path.relpath(real, root).replace(os.sep, "/"))
            if j in linked:
                j = None
        if j is None:
            j = first.setdefault(real, i)
        if j != i:
            out[i] = (
                f"is a link to {_where(real, root)}, an image already trained as '{rels[j]}'; it trains once, "
                "not twice"
            )
    return out


def untrained_message(counts: Counter) -> str:
    """'3 image files edtools does not train here (.gif x2, .heic x1): convert them to JPEG or PNG'."""
    n = sum(counts.values())
    kinds = ", ".join(
        f"{ext} x{k}" for ext, k in sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    )
    files, them = ("image file", "it") if n == 1 else ("image files", "them")
    return f"{n} {files} edtools does not train here ({kinds}): convert {them} to JPEG or PNG"
