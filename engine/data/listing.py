"""Listing a dataset folder: which of its files are images and captions, with their sizes and times.

The names are sorted out by whole-column operations on the packed names, and each file is stat-ed
relative to the open folder, so that the system resolves one name, not the whole path again. Sizes
and times go straight into typed arrays: nothing per file outlives the listing as a Python object.
"""
from __future__ import annotations

import os
from array import array
from contextlib import contextmanager
from itertools import compress
from stat import S_ISREG
from typing import Callable, Iterable, Iterator, Optional

import numpy as np

from .columns import Packed

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
# An edit model's control images beside their target (name.control.png, name.control2.png, …; see controls), in
# order: the edit models edit best from one to three pictures.
CONTROL_MARKS = (".control", ".control2", ".control3")
# Names are packed this many at a time, so that the arrays made on the way stay small beside the names.
_PACK_BATCH = 65536


@contextmanager
def opened(folder: str) -> Iterator[Optional[int]]:
    """A descriptor of the folder for calls relative to it; None where the system has no such calls."""
    if not (os.stat in os.supports_dir_fd and os.listdir in os.supports_fd):
        yield None
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        yield descriptor
    finally:
        os.close(descriptor)


def file_key(found: os.stat_result) -> tuple[int, int]:
    """(size, mtime in ns) that tell whether a file changed; (-1, -1) for an entry that is not a regular
    file, so that reading it fails and says why."""
    return (found.st_size, found.st_mtime_ns) if S_ISREG(found.st_mode) else (-1, -1)


def stat_all(folder: str, descriptor: Optional[int], names: Iterable[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sizes, modification times) of the named files of the folder (see file_key); -1 for an entry
    that cannot be stat-ed: a dangling link, an unreadable entry."""
    sizes, mtimes = array("q"), array("q")
    stat = os.stat
    if descriptor is None:
        names = (os.path.join(folder, name) for name in names)
    for name in names:
        try:
            size, mtime = file_key(stat(name, dir_fd=descriptor))
        except OSError:
            size, mtime = -1, -1
        sizes.append(size)
        mtimes.append(mtime)
    return np.frombuffer(sizes, dtype=np.int64), np.frombuffer(mtimes, dtype=np.int64)


def list_folder(folder: str, kinds: dict[str, bool],
                found: Optional[Callable[[int], None]] = None) -> dict[str, dict]:
    """For each kind asked for ("images", "captions"), the table of the folder's files of that kind in
    listing order: their names and, where kinds[kind] is true, their sizes and mtimes (see stat_all).
    found(count), if given, learns how many files are listed without being stat-ed, before the others
    are stat-ed.

    An image that cannot be stat-ed is listed all the same, so that reading it fails and it is reported
    as skipped, never passed over silently.
    """
    with opened(folder) as descriptor:
        names = os.listdir(folder if descriptor is None else descriptor)
        sorted_out = _sorted_out(names, kinds)
        if found is not None:
            found(sum(len(packed) for kind, (_, packed) in sorted_out.items() if not kinds[kind]))
        tables = {}
        for kind, (mask, packed) in sorted_out.items():
            tables[kind] = {"names": packed}
            if kinds[kind]:
                tables[kind]["sizes"], tables[kind]["mtimes"] = stat_all(folder, descriptor,
                                                                         compress(names, mask.tolist()))
    return tables


def _sorted_out(names: list[str], kinds: dict[str, bool]) -> dict[str, tuple[np.ndarray, Packed]]:
    """For each kind, (which of the names are of that kind, those names packed)."""
    found = {kind: ([np.zeros(0, dtype=bool)], []) for kind in kinds}
    for begin in range(0, len(names), _PACK_BATCH):
        part = Packed.from_names(names[begin:begin + _PACK_BATCH])
        images, captions = _kinds(part)
        for kind, mask in (("images", images), ("captions", captions)):
            if kind in found:
                found[kind][0].append(mask)
                found[kind][1].append(part.take(np.flatnonzero(mask)))
    return {kind: (np.concatenate(masks), Packed.join(packed)) for kind, (masks, packed) in found.items()}


def _kinds(names: Packed) -> tuple[np.ndarray, np.ndarray]:
    """(is an image, is a caption file) for each name, by its extension in any ASCII case. Names
    starting with a dot are neither: the index itself, macOS resource forks."""
    if not len(names):
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=bool)
    blob = np.frombuffer(names.blob, dtype=np.uint8)
    lower = np.where((blob >= ord("A")) & (blob <= ord("Z")), blob + (ord("a") - ord("A")), blob)
    starts, ends = names.offsets[:-1], names.offsets[1:]
    visible = (ends > starts) & (blob[np.minimum(starts, len(blob) - 1)] != ord("."))

    def ends_with(suffixes: tuple[str, ...]) -> np.ndarray:
        found = np.zeros(len(names), dtype=bool)
        for suffix in suffixes:
            match = visible & (ends - starts >= len(suffix))
            for position, byte in enumerate(suffix.encode("ascii")):
                match &= lower[np.maximum(ends - len(suffix) + position, 0)] == byte
            found |= match
        return found

    # Loss masks (name.mask.png, see masks) and control images sit beside their images and are never training images.
    beside = tuple(mark + e for mark in (".mask", *CONTROL_MARKS) for e in IMAGE_EXTENSIONS)
    return ends_with(IMAGE_EXTENSIONS) & ~ends_with(beside), ends_with((".txt",))
