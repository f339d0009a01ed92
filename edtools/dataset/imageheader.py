"""Image headers: width, height and EXIF orientation straight from the bytes of JPEG and PNG files, several times
faster than PIL's Image.open + getexif; anything the parser is not sure of goes to PIL, which decides as before.
"""

from __future__ import annotations

import os
import re
import struct
import zlib

__all__ = [
    "ImageFile",
    "ends_whole",
    "header_size",
    "image_complete",
    "image_size",
    "pil_image_size",
    "pil_module",
]

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
_TIFF_ORDER = {b"II*\x00": "<", b"MM\x00*": ">"}
_TIFF_ENTRY = {"<": struct.Struct("<HHLL"), ">": struct.Struct(">HHLL")}  # tag, type, count, value or offset
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
    order = _TIFF_ORDER.get(data[:4])
    if order is None:
        raise _Unsure
    limit = len(data)
    (ifd,) = struct.unpack_from(order + "L", data, 4)
    if ifd + 2 > limit:
        raise _Unsure
    (count,) = struct.unpack_from(order + "H", data, ifd)
    if ifd + 2 + 12 * count > limit:
        raise _Unsure  # PIL keeps the entries before the cut; let it decide
    entry = _TIFF_ENTRY[order]
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


_PIL_IMAGE = None  # PIL.Image once imported: the module imports PIL only when images are read


def pil_module():
    global _PIL_IMAGE
    if _PIL_IMAGE is None:
        from PIL import Image

        _PIL_IMAGE = Image
    return _PIL_IMAGE


def _check_size(width: int, height: int) -> None:
    limit = (_PIL_IMAGE or pil_module()).MAX_IMAGE_PIXELS
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


class ImageFile:
    """An image to read once (os.PathLike; .name for people and tests): the header reader stores the file's
    fstat, taken right after opening and before reading, so a first scan needs no separate stat per image, and
    the verdict of its end check (`complete`: None until checked), so image_complete opens it no second time."""

    __slots__ = ("name", "path", "stat", "complete")

    def __init__(self, entry: os.DirEntry):
        self.path, self.name, self.stat, self.complete = entry.path, entry.name, None, None

    def __fspath__(self) -> str:
        return self.path

    def __repr__(self) -> str:
        return f"ImageFile({self.path!r})"


_EMPTY = (0, 0)  # _header_size's answer for a file of 0 bytes


def header_size(path: str | os.PathLike) -> tuple[int, int] | None:
    """(width, height) as displayed, from a JPEG or PNG header; _EMPTY for an empty file; None when PIL has to
    decide (other formats, anything unusual, a file that cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY | _O_BINARY)
    except OSError:
        return None
    try:
        keep = type(path) is ImageFile
        if keep:
            path.stat = os.fstat(fd)
        data = os.read(fd, _FIRST_READ)
        if data.startswith(b"\xff\xd8\xff"):
            width, height, orientation = _jpeg_header(fd, data)
        elif data.startswith(_PNG_SIGNATURE):
            width, height, orientation = _png_header(fd, data, len(data) < _FIRST_READ)
        else:
            if keep:
                path.complete = _ends_whole(fd, data, path.stat.st_size) if _has_end_check(data) else True
            return None if data else _EMPTY
        if keep:
            path.complete = _ends_whole(fd, data, path.stat.st_size)
    except Exception:  # _Unsure, short reads, anything unexpected: PIL decides
        return None
    finally:
        os.close(fd)
    if orientation in (5, 6, 7, 8):  # EXIF rotations by 90 degrees: the trained picture is transposed
        return height, width
    return width, height


# ---------------------------------------------------------------------------------------------------------
# Is the file whole? A copy or download that stopped early leaves a file whose header reads fine but whose end
# is missing. A JPEG ends with the EOI marker FF D9 (cameras may pad it with zero bytes), a PNG with its IEND
# chunk; checking the last bytes costs one small read. WebP (RIFF) and BMP headers state the file's length. A file that fails this cheap check may still be whole
# (data after the image: Samsung trailers, motion photos; a PNG that lost only IEND): PIL decodes those few, and
# only a file PIL cannot decode to its end is called truncated.

_JPEG_EOI = b"\xff\xd9"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TAIL = 4096  # bytes read from the end
_MAX_PADDING = 1 << 20  # zero padding beyond this: PIL decides


def _read_at(fd: int, offset: int, n: int) -> bytes:
    if hasattr(os, "pread"):  # one system call
        return os.pread(fd, n, offset)
    os.lseek(fd, offset, os.SEEK_SET)
    return os.read(fd, n)


def _has_end_check(data: bytes) -> bool:
    """Whether the file starting with data (12 bytes or more) is a format the end check knows."""
    return data.startswith((b"\xff\xd8\xff", _PNG_SIGNATURE, b"BM")) or (
        data.startswith(b"RIFF") and data[8:12] == b"WEBP"
    )


def _ends_whole(fd: int, data: bytes, size: int) -> bool:
    """The cheap end check of an open JPEG, PNG, WebP or BMP (data: its first bytes, 12 or more): True when
    it ends as one should. WebP and BMP headers state the file's size: a shorter file is cut."""
    if data.startswith(b"RIFF"):
        return size >= 8 + int.from_bytes(data[4:8], "little")
    if data.startswith(b"BM"):
        return size >= int.from_bytes(data[2:6], "little")
    tail = data if len(data) >= size else _read_at(fd, max(0, size - _TAIL), _TAIL)  # data: the whole file
    if data.startswith(_PNG_SIGNATURE):
        return tail.endswith(_PNG_IEND)
    if tail.endswith(_JPEG_EOI):
        return True
    tail = tail[-_TAIL:]
    end = size
    while True:
        stripped = tail.rstrip(b"\x00")
        if stripped:
            return stripped.endswith(_JPEG_EOI)
        end -= len(tail)
        if end <= 0 or size - end > _MAX_PADDING:
            return False
        tail = _read_at(fd, max(0, end - 65536), min(65536, end))
        if not tail:
            return False


def ends_whole(path: str | os.PathLike) -> bool:
    """The cheap end check alone: False when a JPEG, PNG, WebP or BMP file does not end as the format says (cut
    short, or a JPEG/PNG with data after the image); True for other formats. Raises OSError if unreadable."""
    if type(path) is ImageFile and path.complete is not None:
        return path.complete
    fd = os.open(path, os.O_RDONLY | _O_BINARY)
    try:
        data = os.read(fd, 12)
        if not _has_end_check(data):
            return True
        return _ends_whole(fd, data, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def _pil_decodes(path: str | os.PathLike) -> bool:
    """True when PIL decodes the whole image (a JPEG at 1/8 scale: every byte of the scan is still read)."""
    Image = pil_module()
    from PIL import ImageFile as PILImageFile

    if PILImageFile.LOAD_TRUNCATED_IMAGES:
        return False  # PIL would fill a cut image with grey: the end check stands
    try:
        with Image.open(os.fspath(path)) as im:
            if im.format == "JPEG":
                im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
    except Exception:
        return False
    return True


def image_complete(path: str | os.PathLike) -> bool:
    """False when a JPEG, PNG, WebP or BMP file is cut short (an interrupted copy or download): its end is not
    where the format puts it and PIL cannot decode it to the end. Other formats: True. Raises if unreadable."""
    return ends_whole(path) or _pil_decodes(path)


def pil_image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Width and height as PIL sees them (opens lazily; a PNG without early EXIF is decoded by getexif)."""
    from PIL import Image

    with Image.open(path) as im:
        width, height = im.size
        orientation = im.getexif().get(0x0112, 1) if hasattr(im, "getexif") else 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return int(width), int(height)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """Width and height as displayed (EXIF orientation applied), from the file header; raises if unreadable."""
    size = header_size(path)
    if size is None:
        return pil_image_size(path)
    if size is _EMPTY:
        raise OSError("the file is empty (0 bytes)")
    return size
