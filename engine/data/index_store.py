"""The dataset index file: a folder's image and caption tables as an uncompressed NumPy .npz archive.

Each column is one array (a packed string column two: its bytes and offsets), so the index of a million
images named like img_0000001.png is about 60 MB that loads at memory speed with no per-image Python
object, and its columns compare against a fresh folder listing in a few vectorised operations.
Compression is left out: it would multiply the save and load times for files of mostly small integers.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import numpy as np

from .columns import Column, Packed

INDEX_VERSION = 4
PACKED = "packed"
# The tables and the type of each column. The images and captions are in the order the folder listing
# gave them, so that an unchanged folder is recognised without sorting its names; "image_order" holds the
# image rows in name order, and "caption_links", per image row, the row of its caption (-1 for none), or
# nothing when the images changed since the captions were matched.
SCHEMA: dict[str, dict[str, object]] = {
    "images": {"names": PACKED, "sizes": np.int64, "mtimes": np.int64, "widths": np.int32,
               "heights": np.int32, "errors": PACKED},
    "captions": {"names": PACKED, "sizes": np.int64, "mtimes": np.int64, "texts": PACKED, "notes": PACKED,
                 "errors": PACKED},
    "image_order": {"rows": np.int64},
    "caption_links": {"rows": np.int32},
}
Tables = dict[str, dict[str, Column]]


def empty(table: str) -> dict[str, Column]:
    return {name: Packed.empty() if kind == PACKED else np.zeros(0, dtype=kind)
            for name, kind in SCHEMA[table].items()}


def save(path: Path, tables: Tables) -> None:
    """Write the index atomically: readers see the old file or the new one, never a part."""
    arrays = {"version": np.array(INDEX_VERSION)}
    for table, columns in SCHEMA.items():
        for name, kind in columns.items():
            column = tables[table][name]
            if kind == PACKED:
                arrays[f"{table}.{name}.blob"] = np.frombuffer(column.blob, dtype=np.uint8)
                arrays[f"{table}.{name}.offsets"] = column.offsets
            else:
                arrays[f"{table}.{name}"] = np.asarray(column, dtype=kind)
    temp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(temp, "wb") as handle:
            np.savez(handle, **arrays)
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def load(path: Path) -> Optional[Tables]:
    """The tables of an index file; None for a missing file, another format or version, or a corrupt one."""
    try:
        with np.load(path, allow_pickle=False) as data:
            if data["version"].shape != () or int(data["version"]) != INDEX_VERSION:
                return None
            tables = {table: {name: _column(data, f"{table}.{name}", kind) for name, kind in columns.items()}
                      for table, columns in SCHEMA.items()}
    except Exception:  # a damaged archive raises whatever zipfile, zlib or the .npy reader meet first
        return None
    return tables if _consistent(tables) else None


def _column(data, key: str, kind) -> Column:
    if kind == PACKED:
        blob, offsets = data[f"{key}.blob"], data[f"{key}.offsets"]
        if blob.dtype != np.uint8 or offsets.dtype != np.int64 or blob.ndim != 1 or offsets.ndim != 1:
            raise ValueError(f"{key}: not a packed string column")
        return Packed(blob.tobytes(), offsets)
    column = data[key]
    if column.dtype != kind or column.ndim != 1:
        raise ValueError(f"{key}: expected a 1-D {np.dtype(kind)} column")
    return column


def _consistent(tables: Tables) -> bool:
    for table in tables.values():
        if len({len(column) for column in table.values()}) != 1:
            return False
        if not all(_valid_offsets(column) for column in table.values() if isinstance(column, Packed)):
            return False
    images, captions = len(tables["images"]["names"]), len(tables["captions"]["names"])
    order, links = tables["image_order"]["rows"], tables["caption_links"]["rows"]
    if len(order) != images or not np.array_equal(np.bincount(order.clip(0, images), minlength=images),
                                                   np.ones(images, dtype=np.int64)):
        return False  # not a permutation of the image rows
    if len(links) not in (0, images):
        return False
    return not len(links) or bool(links.min() >= -1 and links.max() < captions)


def _valid_offsets(column: Packed) -> bool:
    offsets = column.offsets
    return (len(offsets) >= 1 and offsets[0] == 0 and offsets[-1] == len(column.blob)
            and bool(np.all(np.diff(offsets) >= 0)))
