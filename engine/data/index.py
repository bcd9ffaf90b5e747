"""Scanning dataset folders: image sizes from headers, captions, and the images that cannot be used.

Scanning reads only image headers, never pixels. What it learns is kept in an index file per folder
(see index_store), keyed by each file's name, size and modification time, so re-opening an unchanged
folder reads no image at all and a changed folder re-reads only the files that changed. The index lives
in the folder as a hidden file when the folder is writable, else under the app's cache folder.

Everything per file stays in NumPy columns, from the folder listing to the records handed out, so that
a folder of a million images is scanned without a million Python objects being kept.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from .. import notices, paths
from ..errors import UserError
from . import index_store
from .columns import Packed, concat, take
from .headers import Readers
# IMAGE_EXTENSIONS, ImageRecord and TXT_PROMPT are part of this module's interface: callers import them
# from here.
from .listing import IMAGE_EXTENSIONS, list_folder  # noqa: F401
from .records import TXT_PROMPT, ImageRecord, ImageRecords

INDEX_NAME = ".scal-sdt-index.npz"
# The JSON index of earlier versions, removed once the new one is written beside it.
LEGACY_SUFFIX = ".json"


class DataWarning(UserWarning):
    pass


@dataclass
class ScanResult:
    records: Sequence[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def index_locations(folder: Path) -> tuple[Path, Path]:
    """(the hidden file in the folder, the fallback under the cache folder) for a folder's index."""
    digest = hashlib.sha256(os.fsencode(folder.resolve())).hexdigest()[:24]
    return folder / INDEX_NAME, paths.cache_dir() / "dataset-index" / f"{digest}.npz"


def _read_index(folder: Path) -> index_store.Tables:
    """The newer of the two possible index files; a missing, stale-format or corrupt one is ignored."""
    found = []
    for location in index_locations(folder):
        try:
            modified = location.stat().st_mtime_ns
        except OSError:
            continue
        tables = index_store.load(location)
        if tables is not None:
            found.append((modified, tables))
    return max(found, key=lambda pair: pair[0])[1] if found else {}


def _write_index(folder: Path, tables: index_store.Tables) -> None:
    for location in index_locations(folder):
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
            index_store.save(location, tables)
        except OSError:
            continue
        try:
            location.with_suffix(LEGACY_SUFFIX).unlink(missing_ok=True)
        except OSError:
            pass  # a stale file that is never read again
        return
    notices.warn(f"{folder}: cannot write the dataset index here or in {paths.cache_dir()}; the next scan "
                  "reads every image header again", DataWarning)


def _refresh(stored: Optional[dict], folder: str, listed: dict, read: Callable[[str, Packed], dict],
             empty: dict) -> tuple[dict, bool, Optional[np.ndarray]]:
    """The table for the files now listed, reading only the files that are new or whose size or mtime
    changed. Returns (table, whether it differs from the stored one, and if it does, the stored row of
    each file's name or -1 for a new name). An unchanged folder lists in the same order again, so that
    case is three comparisons of whole columns."""
    names = listed["names"]
    stored = stored or empty
    if "sizes" not in listed:  # nothing stored to compare with: every file is read, and stat-ed there
        named = np.full(len(names), -1, dtype=np.int64)
        source = named.copy()
    elif (stored["names"].equals(names) and np.array_equal(stored["sizes"], listed["sizes"])
          and np.array_equal(stored["mtimes"], listed["mtimes"])):
        return stored, False, None
    else:
        named = np.arange(len(names)) if stored["names"].equals(names) else stored["names"].find(names)
        known = named >= 0
        known[known] = ((stored["sizes"][named[known]] == listed["sizes"][known])
                        & (stored["mtimes"][named[known]] == listed["mtimes"][known]))
        source = np.where(known, named, -1)
    fresh = np.flatnonzero(source < 0)
    read_values = read(folder, names.take(fresh))
    # Each row's columns come from its stored row, or from the files just read (after the stored rows).
    source[fresh] = len(stored["names"]) + np.arange(len(fresh))
    columns = [column for column in stored if column != "names"]
    merged = take(concat([{column: stored[column] for column in columns}, read_values]), source)
    return {"names": names, **merged}, True, named


def _name_order(names: Packed, stored_rows: np.ndarray, stored_order: np.ndarray) -> np.ndarray:
    """The rows of `names` in name order (what names.sorted_rows() gives), from the row each name had in
    the stored table (-1 for a new one) and that table's name order: the names kept are in order
    already, so only the new ones are sorted, then put in their places among them."""
    new_row = np.full(len(stored_order), -1, dtype=np.int64)
    known = np.flatnonzero(stored_rows >= 0)
    new_row[stored_rows[known]] = known
    kept = new_row[stored_order]
    kept = kept[kept >= 0]
    added = np.flatnonzero(stored_rows < 0)
    added_names = names.take(added)
    places = names.searchsorted(kept, added_names)
    by_name = added_names.sorted_rows()
    # np.insert puts the values for one place in the order given: the added names' sorted order.
    return np.insert(kept, places[by_name], added[by_name])


def _has_rows(table: Optional[dict]) -> bool:
    return table is not None and len(table["names"]) > 0


def _caption_rows(images: Packed, captions: Packed) -> np.ndarray:
    """For each image, the row of the caption file with its name's stem (a.png: a.txt), or -1; of two
    captions for one stem (a.TXT, a.txt), the later in name order."""
    # A caption's name is its stem and ".txt" in some case, so of the captions of one stem the later in
    # name order has the greater extension bytes. Ordered by them (stably, so that captions all named
    # .txt keep their rows and the reordering is one copy), it is the last of its stem, which find takes.
    blob = np.frombuffer(captions.blob, dtype=np.uint8)
    ends = captions.offsets[1:]
    extensions = np.zeros(len(captions), dtype=np.uint32)
    for back in range(4, 0, -1):
        extensions = extensions << np.uint32(8) | blob[ends - back]
    by_extension = np.argsort(extensions, kind="stable")
    found = captions.take(by_extension).stems().find(images.stems())
    # Only the found rows are looked up: with no caption in the folder there is nothing to look them up in.
    rows = np.full(len(found), -1, dtype=np.int32)
    hit = found >= 0
    rows[hit] = by_extension[found[hit]]
    return rows


def scan_folder(folder: str, prompt_template: str, label: str = "folder",
                processes: Optional[int] = None) -> ScanResult:
    """The usable images of a folder (not its subfolders), in name order, with their resolved prompts.

    Names starting with a dot are not dataset files (the index itself, macOS resource forks) and are
    passed over. Files are read by worker processes, one per core, when there are many; `processes`
    sets the number instead.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{label}: folder not found: {folder}")
    wants_captions = TXT_PROMPT in prompt_template
    stored = _read_index(root)
    # Files are stat-ed while listing only where there are stored ones to compare them with.
    kinds = {"images": _has_rows(stored.get("images"))}
    if wants_captions:
        kinds["captions"] = _has_rows(stored.get("captions"))
    with Readers(processes) as readers:
        # The workers start up while the folder is stat-ed, when the files that are not are many.
        listed = list_folder(str(root), kinds, readers.expect)
        images, images_changed, image_rows = _refresh(stored.get("images"), folder, listed["images"],
                                                      readers.images, index_store.empty("images"))
        captions, captions_changed = stored.get("captions") or index_store.empty("captions"), False
        if wants_captions:
            # A scan without {TXT_PROMPT} leaves the stored captions alone for the scans that need them.
            captions, captions_changed, _ = _refresh(stored.get("captions"), folder, listed["captions"],
                                                     readers.captions, index_store.empty("captions"))
    order = stored.get("image_order") or index_store.empty("image_order")
    if images_changed:
        order = {"rows": _name_order(images["names"], image_rows, order["rows"])}
    links = stored.get("caption_links") or index_store.empty("caption_links")
    if wants_captions and (images_changed or captions_changed or len(links["rows"]) != len(images["names"])):
        links = {"rows": _caption_rows(images["names"], captions["names"])}
    elif images_changed:
        links = index_store.empty("caption_links")
    if images_changed or captions_changed or not stored:
        _write_index(root, {"images": images, "captions": captions, "image_order": order,
                            "caption_links": links})
    return _result(os.path.join(str(root), ""), prompt_template, images, order["rows"],
                   captions if wants_captions else None, links["rows"])


def _result(prefix: str, template: str, images: dict, order: np.ndarray, captions: Optional[dict],
            caption_rows: np.ndarray) -> ScanResult:
    """The usable image rows (in name order) as records, and the others reported as skipped."""
    from PIL import Image

    names, widths, heights, errors = images["names"], images["widths"], images["heights"], images["errors"]
    failed = errors.lengths() > 0
    max_pixels = Image.MAX_IMAGE_PIXELS or float("inf")
    unusable = failed | (widths.astype(np.int64) * heights > max_pixels)
    result = ScanResult()
    for row in order[unusable[order]].tolist():
        path = prefix + names.name(row)
        if failed[row]:
            error = errors[row].decode("utf-8")
        else:
            width, height = int(widths[row]), int(heights[row])
            error = (f"image too large to decode safely: {width}x{height} = {width * height} pixels, over "
                     f"PIL.Image.MAX_IMAGE_PIXELS ({max_pixels})")
        notices.warn(f"skipping {path}: {error}", DataWarning)
        result.skipped.append((path, error))
    rows = order[~unusable[order]]
    if captions is None:
        result.records = ImageRecords(prefix, names, widths, heights, rows, template)
    else:
        _warn_about_captions(prefix, names, rows, captions, caption_rows)
        result.records = ImageRecords(prefix, names, widths, heights, rows, template, captions["texts"],
                                      caption_rows)
    return result


def _warn_about_captions(prefix: str, names: Packed, rows: np.ndarray, captions: dict,
                         caption_rows: np.ndarray) -> None:
    """One warning per usable image whose caption is missing, unreadable, not UTF-8, cut short or empty."""
    linked = caption_rows[rows]
    has = linked >= 0
    failed, empty = captions["errors"].lengths() > 0, captions["texts"].lengths() == 0
    noted = captions["notes"].lengths() > 0
    bad = np.zeros(len(rows), dtype=bool)
    bad[has] = failed[linked[has]] | noted[linked[has]] | empty[linked[has]]
    for position in np.flatnonzero(~has | bad).tolist():
        row, caption = int(rows[position]), int(linked[position])
        if caption < 0:
            name = names.name(row)
            notices.warn(f"{prefix + name}: no caption file {name.rpartition('.')[0]}.txt for {TXT_PROMPT}; "
                          "using the prompt without it", DataWarning)
            continue
        path = prefix + captions["names"].name(caption)
        if failed[caption]:
            notices.warn(f"{path}: {captions['errors'][caption].decode('utf-8')}; using the prompt without it",
                          DataWarning)
        elif noted[caption]:
            notices.warn(f"{path}: {captions['notes'][caption].decode('utf-8')}", DataWarning)
        else:
            notices.warn(f"{path}: the caption is empty", DataWarning)
