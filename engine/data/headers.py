"""Reading what a scan keeps from each file: an image's upright size from its header, a caption's text.

Many files are read by worker processes, one per core, in chunks: header parsing is Python code, so
threads would share one core. A few files are read in this process, where starting the workers would
cost more than it saves.
"""
from __future__ import annotations

import codecs
import os
import stat
import warnings
from typing import Callable, Optional

import numpy as np

from .columns import Packed, concat
from .listing import file_key
from .worker_pool import WorkerPool

# Content decides, not the extension (a .jpg saved by a browser is often WebP); phones' MPO opens as JPEG.
HEADER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Where PIL's getexif looks for an orientation; an image with none of these is upright.
_ORIENTATION_SOURCES = frozenset(("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"))
_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}
# Below this many files the workers' start-up (a fresh interpreter importing NumPy and PIL each, a few
# tenths of a second) is not repaid.
POOL_MIN_FILES = 20000
_CHUNK = 1000


def read_header(source, size: Optional[int] = None) -> tuple[int, int]:
    """(width, height) of the upright image, from its header; EXIF orientations 5-8 swap the sides.
    source is a path or an open binary file; size, the file's size when it is known."""
    from PIL import Image

    with Image.open(source, formats=HEADER_FORMATS) as image:
        width, height = image.size
        _check_complete(image, size)
        orientation = 1
        if not _ORIENTATION_SOURCES.isdisjoint(image.info):
            # The base getexif parses what the header gave; PNG's override would decode the pixels.
            orientation = Image.Image.getexif(image).get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def _check_complete(image, size: Optional[int]) -> None:
    """A cut-off download or copy still has a readable header: look for the format's end marker instead.
    It is searched in the last 4 KiB because some cameras append data after a JPEG's end."""
    marker = _END_MARKERS.get(image.format)
    if marker is None:
        return
    handle = image.fp
    end = handle.seek(0, os.SEEK_END) if size is None else size
    # A small file is still in the read buffer: seeking within it costs no system call.
    handle.seek(max(0, end - 4096))
    if marker not in handle.read(4096):
        raise ValueError(f"truncated {image.format} file: its end marker is missing")


# Captions are read up to this many bytes: a caption linked to a device or a huge text file must not
# fill the memory. Longer captions are cut there, with a warning.
MAX_CAPTION_BYTES = 64 * 2**10
# A byte-order mark decides the encoding (Notepad's "Unicode" is UTF-16 LE with one); UTF-32's marks
# come first because UTF-32 LE's begins with UTF-16 LE's.
_BOMS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
NOT_UTF8 = "caption is not UTF-8; read as latin-1"


def decode_caption(raw: bytes, cut: bool = False) -> tuple[str, str]:
    """(text, what is worth a warning about it or ""): decoded in the encoding its byte-order mark names,
    else UTF-8, else latin-1, which never fails. cut: raw is the first MAX_CAPTION_BYTES of a longer
    caption, whose last character may be split; up to three bytes of it are dropped."""
    encoding = next((name for mark, name in _BOMS if raw.startswith(mark)), "utf-8")
    for dropped in range(min(4, len(raw) + 1) if cut else 1):
        try:
            text = raw[:len(raw) - dropped].decode(encoding)
        except UnicodeDecodeError:
            continue
        return text.strip(), f"caption longer than {MAX_CAPTION_BYTES} bytes; cut there" if cut else ""
    return raw.decode("latin-1").strip(), NOT_UTF8


def read_caption_bytes(handle) -> tuple[bytes, bool]:
    """(the first MAX_CAPTION_BYTES of an open caption, whether there is more)."""
    raw = handle.read(MAX_CAPTION_BYTES + 1)
    return raw[:MAX_CAPTION_BYTES], len(raw) > MAX_CAPTION_BYTES


# Each file's size and mtime (see listing.file_key) are taken from it once open and before it is read:
# a change made meanwhile shows as a newer mtime at the next scan.

def _read_image(path: str) -> tuple[int, int, int, int, str]:
    """(size, mtime, width, height, why it cannot be used or "") of an image file."""
    from PIL import Image

    try:
        handle = open_regular(path)
    except OSError as error:  # a dangling link, a folder, a named pipe, a file that may not be read
        return -1, -1, 0, 0, f"cannot read image: {error.__class__.__name__}: {error}"
    with handle:
        size, mtime = file_key(os.fstat(handle.fileno()))
        try:
            return size, mtime, *read_header(handle, size), ""
        except Image.DecompressionBombError as error:  # over twice MAX_IMAGE_PIXELS: PIL refuses the header
            return size, mtime, 0, 0, f"image too large to decode safely: {error}"
        except Image.UnidentifiedImageError:  # PIL would name the open file, not its path
            return size, mtime, 0, 0, f"cannot read image: UnidentifiedImageError: cannot identify image file {path!r}"
        except Exception as error:  # PIL raises many types for unreadable and corrupt files
            return size, mtime, 0, 0, f"cannot read image: {error.__class__.__name__}: {error}"


def _read_caption(path: str) -> tuple[int, int, str, str, str]:
    """(size, mtime, text, what is worth a warning about it or "", why it cannot be read or "") of a
    caption file."""
    try:
        with open_regular(path) as handle:
            size, mtime = file_key(os.fstat(handle.fileno()))
            return (size, mtime, *decode_caption(*read_caption_bytes(handle)), "")
    except OSError as error:
        return -1, -1, "", "", f"cannot read the caption: {error.strerror or error}"


_KINDS = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def open_regular(path: str):
    """The file opened for reading in binary, or OSError when it is not a regular file. It is opened
    without blocking, since opening a named pipe would wait for a writer forever; that flag changes
    nothing for a regular file."""
    handle = open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0)))
    mode = os.fstat(handle.fileno()).st_mode
    if not stat.S_ISREG(mode):
        handle.close()
        kind = next((name for test, name in _KINDS if test(mode)), "a special file")
        raise OSError(f"not a regular file but {kind}")
    return handle


def _ignore_bomb_warnings() -> None:
    # Oversized images are reported as skipped by the scan, not as PIL warnings.
    from PIL import Image

    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


def _paths(folder: str, names: Packed) -> list[str]:
    return [os.path.join(folder, os.fsdecode(name)) for name in names]


def _image_chunk(folder: str, names: Packed, max_pixels: Optional[int]) -> dict:
    from PIL import Image

    # A worker process reads with the limit of the process that asked.
    Image.MAX_IMAGE_PIXELS = max_pixels
    _ignore_bomb_warnings()
    found = [_read_image(path) for path in _paths(folder, names)]
    return {"sizes": np.array([f[0] for f in found], dtype=np.int64),
            "mtimes": np.array([f[1] for f in found], dtype=np.int64),
            "widths": np.array([f[2] for f in found], dtype=np.int32),
            "heights": np.array([f[3] for f in found], dtype=np.int32),
            "errors": Packed.from_bytes([f[4].encode("utf-8") for f in found])}


def _caption_chunk(folder: str, names: Packed) -> dict:
    found = [_read_caption(path) for path in _paths(folder, names)]
    return {"sizes": np.array([f[0] for f in found], dtype=np.int64),
            "mtimes": np.array([f[1] for f in found], dtype=np.int64),
            "texts": Packed.from_bytes([f[2].encode("utf-8") for f in found]),
            "notes": Packed.from_bytes([f[3].encode("utf-8") for f in found]),
            "errors": Packed.from_bytes([f[4].encode("utf-8") for f in found])}


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Readers:
    """Reads the images and captions of a scan: in this process, or in worker processes when there are
    many files or `processes` says so. Used as a context manager, which ends the workers."""

    def __init__(self, processes: Optional[int] = None):
        self._processes = processes
        self._pool: Optional[WorkerPool] = None

    def expect(self, count: int) -> None:
        """About `count` files are to be read: start the workers now when they will be used, so that
        they start up while the caller does other work."""
        processes = self._processes_for(count)
        if processes > 1 and self._pool is None:
            self._pool = WorkerPool(processes)

    def images(self, folder: str, names: Packed) -> dict:
        """The image table of these files: sizes, mtimes (see listing.file_key), widths, heights and
        errors (why each cannot be used, or empty)."""
        from PIL import Image

        return self._read(_image_chunk, folder, names, Image.MAX_IMAGE_PIXELS)

    def captions(self, folder: str, names: Packed) -> dict:
        """The caption table of these files: sizes, mtimes, texts (as UTF-8), notes (what is worth a
        warning about each: read as latin-1, cut short) and errors."""
        return self._read(_caption_chunk, folder, names)

    def _processes_for(self, count: int) -> int:
        return self._processes or (_cores() if count >= POOL_MIN_FILES else 1)

    def _read(self, read: Callable, folder: str, names: Packed, *arguments) -> dict:
        self.expect(len(names))
        processes = self._pool.processes if self._pool is not None else 1
        # Several chunks per process even for a few files, so that each process gets a share of the work.
        size = max(1, min(_CHUNK, -(-len(names) // (processes * 8))))
        chunks = [names.take(np.arange(begin, min(begin + size, len(names))))
                  for begin in range(0, len(names), size)]
        if processes == 1 or len(chunks) <= 1:
            return concat([read(folder, chunk, *arguments) for chunk in chunks or [names]])
        # The chunks stay packed: neither this process nor the pipes hold a Python string per file.
        return concat(self._pool.map(read, [(folder, chunk, *arguments) for chunk in chunks]))

    def __enter__(self) -> "Readers":
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.close()
