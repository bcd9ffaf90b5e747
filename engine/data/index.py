"""Scanning dataset folders: image sizes from headers, captions, and the images that cannot be used.

Scanning reads only image headers, never pixels. What it learns is kept in an index file per folder,
keyed by each file's name, size and modification time, so re-opening an unchanged folder reads no image
at all and a changed folder re-reads only the files that changed. The index lives in the folder as a
hidden file when the folder is writable, else under the app's cache folder. It is JSON stored as
columns (one list per field), which loads fastest and stays small for 100,000 images.

This module imports neither torch nor numpy, so that listing a dataset stays light.
"""
from __future__ import annotations

import gc
import hashlib
import json
import os
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .. import notices, paths
from ..errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
TXT_PROMPT = "{TXT_PROMPT}"
INDEX_NAME = ".scal-sdt-index.json"
INDEX_VERSION = 2
# Content decides, not the extension (a .jpg saved by a browser is often WebP); phones' MPO opens as JPEG.
HEADER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP")
# Each table keeps, per file, its name, size and mtime (the key) and the values read from it.
_KEY_COLUMNS = ("names", "sizes", "mtimes")
_IMAGE_VALUES = ("widths", "heights", "errors")
_CAPTION_VALUES = ("texts", "utf8", "errors")
# Where PIL's getexif looks for an orientation; an image with none of these is upright.
_ORIENTATION_SOURCES = frozenset(("exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"))


class DataWarning(UserWarning):
    pass


@dataclass(slots=True)
class ImageRecord:
    path: str
    width: int
    height: int
    caption: str = ""  # the resolved prompt for this image


@dataclass
class ScanResult:
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def read_header(path: str) -> tuple[int, int]:
    """(width, height) of the upright image, from its header; EXIF orientations 5-8 swap the sides."""
    from PIL import Image

    with Image.open(path, formats=HEADER_FORMATS) as image:
        width, height = image.size
        _check_complete(image)
        orientation = 1
        if not _ORIENTATION_SOURCES.isdisjoint(image.info):
            # The base getexif parses what the header gave; PNG's override would decode the pixels.
            orientation = Image.Image.getexif(image).get(0x0112, 1)
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


_END_MARKERS = {"JPEG": b"\xff\xd9", "PNG": b"IEND"}


def _check_complete(image) -> None:
    """A cut-off download or copy still has a readable header: look for the format's end marker instead.
    It is searched in the last 4 KiB because some cameras append data after a JPEG's end."""
    marker = _END_MARKERS.get(image.format)
    if marker is None:
        return
    handle = image.fp
    handle.seek(0, os.SEEK_END)
    handle.seek(max(0, handle.tell() - 4096))
    if marker not in handle.read():
        raise ValueError(f"truncated {image.format} file: its end marker is missing")


def decode_caption(raw: bytes) -> tuple[str, bool]:
    """(text, was UTF-8); text that is not UTF-8 is read as latin-1, which never fails."""
    try:
        return raw.decode("utf-8-sig").strip(), True
    except UnicodeDecodeError:
        return raw.decode("latin-1").strip(), False


def index_locations(folder: Path) -> tuple[Path, Path]:
    """(the hidden file in the folder, the fallback under the cache folder) for a folder's index."""
    digest = hashlib.sha256(str(folder.resolve()).encode("utf-8")).hexdigest()[:24]
    return folder / INDEX_NAME, paths.cache_dir() / "dataset-index" / f"{digest}.json"


def _read_index(folder: Path) -> dict:
    """The newer of the two possible index files; a missing, stale-format or corrupt one is ignored."""
    found = []
    for location in index_locations(folder):
        try:
            data = json.loads(location.read_bytes())
            modified = location.stat().st_mtime_ns
        except (OSError, ValueError):
            continue
        if _valid(data):
            found.append((modified, data))
    return max(found, key=lambda pair: pair[0])[1] if found else {}


def _valid(data) -> bool:
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        return False
    for table, value_columns in (("images", _IMAGE_VALUES), ("captions", _CAPTION_VALUES)):
        columns = _KEY_COLUMNS + value_columns
        values = data.get(table)
        if not isinstance(values, dict) or not all(isinstance(values.get(c), list) for c in columns):
            return False
        if len({len(values[c]) for c in columns}) != 1:
            return False
    return True


def _write_index(folder: Path, data: dict) -> None:
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    for location in index_locations(folder):
        temp = location.with_name(f"{location.name}.{os.getpid()}.tmp")
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
            temp.write_bytes(text)
            os.replace(temp, location)
            return
        except OSError:
            try:
                temp.unlink(missing_ok=True)
            except OSError:
                pass
    notices.warn(f"{folder}: cannot write the dataset index here or in {paths.cache_dir()}; the next scan "
                  "reads every image header again", DataWarning)


def _empty(values: tuple[str, ...]) -> dict:
    return {column: [] for column in _KEY_COLUMNS + values}


def _list_folder(root: Path, wants_captions: bool) -> tuple[dict, dict]:
    """The (names, sizes, mtimes) columns of the folder's images and caption files, in name order.

    Only these values are kept, not the directory entries: each entry holds its whole stat result, which
    for 100,000 files would be more memory than everything else of the scan together.
    """
    images, texts = [], []
    with os.scandir(root) as listing:
        for entry in listing:
            name = entry.name
            lower = name.lower()
            if lower.endswith(IMAGE_EXTENSIONS):
                found = images
            elif wants_captions and lower.endswith(".txt"):
                found = texts
            else:
                continue
            if name.startswith("."):
                continue
            try:
                stat = entry.stat() if entry.is_file() else None
            except OSError:
                stat = None
            if stat is None:
                # A dangling link or an unreadable entry with an image's name: listed so that reading it
                # fails and it is reported as skipped, never passed over silently.
                if found is images:
                    found.append((name, -1, -1))
                continue
            found.append((name, stat.st_size, stat.st_mtime_ns))
    tables = []
    for found in (images, texts):
        found.sort()
        tables.append(dict(zip(_KEY_COLUMNS, map(list, zip(*found)))) if found else _empty(()))
    return tables[0], tables[1]


def _refresh(stored: Optional[dict], folder: str, listed: dict, values: tuple[str, ...],
             read) -> tuple[dict, bool]:
    """The table for the files now listed, re-reading only files whose size or mtime changed.

    Returns (table, whether it differs from the stored one). The unchanged case is a few list
    comparisons, which is what keeps re-opening 100,000 files fast.
    """
    names, sizes, mtimes = listed["names"], listed["sizes"], listed["mtimes"]
    if stored is not None and stored["names"] == names and stored["sizes"] == sizes and stored["mtimes"] == mtimes:
        return stored, False
    stored = stored or _empty(values)
    row = {name: i for i, name in enumerate(stored["names"])}
    table = {"names": names, "sizes": sizes, "mtimes": mtimes, **{column: [] for column in values}}
    for name, size, mtime in zip(names, sizes, mtimes):
        i = row.get(name)
        if i is not None and stored["sizes"][i] == size and stored["mtimes"][i] == mtime:
            found = [stored[column][i] for column in values]
        else:
            found = read(os.path.join(folder, name))
        for column, value in zip(values, found):
            table[column].append(value)
    return table, True


def _read_image(path: str) -> tuple[int, int, Optional[str]]:
    from PIL import Image

    try:
        return (*read_header(path), None)
    except Image.DecompressionBombError as error:  # over twice MAX_IMAGE_PIXELS: PIL refuses the header too
        return 0, 0, f"image too large to decode safely: {error}"
    except Exception as error:  # PIL raises many types for unreadable and corrupt files
        return 0, 0, f"cannot read image: {error.__class__.__name__}: {error}"


def _read_caption(path: str) -> tuple[str, bool, Optional[str]]:
    try:
        with open(path, "rb") as handle:
            return (*decode_caption(handle.read()), None)
    except OSError as error:
        return "", True, f"cannot read the caption: {error.strerror}"


@contextmanager
def _no_gc():
    # Scanning allocates hundreds of thousands of small objects and no reference cycles; the cyclic
    # collector's repeated passes over them would add about a quarter to re-opening a large folder.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def scan_folder(folder: str, prompt_template: str, label: str = "folder") -> ScanResult:
    """The usable images of a folder (not its subfolders), in name order, with their resolved prompts.

    Names starting with a dot are not dataset files (the index itself, macOS resource forks) and are
    passed over.
    """
    with _no_gc():
        return _scan(folder, prompt_template, label)


def _scan(folder: str, prompt_template: str, label: str) -> ScanResult:
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{label}: folder not found: {folder}")
    wants_captions = TXT_PROMPT in prompt_template
    listed_images, listed_texts = _list_folder(root, wants_captions)
    stored = _read_index(root)
    # Oversized images are reported as skipped by the scan, not as PIL warnings.
    warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
    images, images_changed = _refresh(stored.get("images"), folder, listed_images, _IMAGE_VALUES, _read_image)
    captions, captions_changed = stored.get("captions") or _empty(_CAPTION_VALUES), False
    if wants_captions:
        # A scan without {TXT_PROMPT} leaves the stored captions alone for the scans that need them.
        captions, captions_changed = _refresh(stored.get("captions"), folder, listed_texts, _CAPTION_VALUES,
                                              _read_caption)
    if images_changed or captions_changed or not stored:
        _write_index(root, {"version": INDEX_VERSION, "images": images, "captions": captions})

    by_stem = {}
    if wants_captions:
        by_stem = {name.rpartition(".")[0]: (name, text, utf8, error) for name, text, utf8, error in
                   zip(captions["names"], captions["texts"], captions["utf8"], captions["errors"])}
    result = ScanResult()
    prefix = os.path.join(str(root), "")
    max_pixels = Image.MAX_IMAGE_PIXELS or float("inf")
    for name, width, height, error in zip(images["names"], images["widths"], images["heights"], images["errors"]):
        path = prefix + name
        if error is None and width * height > max_pixels:
            error = (f"image too large to decode safely: {width}x{height} = {width * height} pixels, over "
                     f"PIL.Image.MAX_IMAGE_PIXELS ({max_pixels})")
        if error is not None:
            notices.warn(f"skipping {path}: {error}", DataWarning)
            result.skipped.append((path, error))
            continue
        prompt = prompt_template
        if wants_captions:
            prompt = _with_caption(prompt_template, path, prefix, by_stem.get(name.rpartition(".")[0]))
        result.records.append(ImageRecord(path, width, height, prompt))
    return result


def _with_caption(template: str, image_path: str, prefix: str, caption: Optional[tuple]) -> str:
    if caption is None:
        stem = os.path.basename(image_path).rpartition(".")[0]
        notices.warn(f"{image_path}: no caption file {stem}.txt for {TXT_PROMPT}; using the prompt without it",
                      DataWarning)
        text = ""
    else:
        name, text, utf8, error = caption
        if error is not None:
            notices.warn(f"{prefix + name}: {error}; using the prompt without it", DataWarning)
        elif not utf8:
            notices.warn(f"{prefix + name}: caption is not UTF-8; read as latin-1", DataWarning)
        elif not text:
            notices.warn(f"{prefix + name}: the caption is empty", DataWarning)
    return template.replace(TXT_PROMPT, text).strip(" ,")
