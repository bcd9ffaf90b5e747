"""WebDataset shards as a dataset source: a folder of .tar shards, or a brace pattern naming them.

A shard is an uncompressed tar whose members sharing a key (the member name up to the first dot of its
base name, the WebDataset convention) form one sample: here an image (.jpg, .jpeg, .png, .webp, .bmp)
and optionally its caption, a .txt file or a .json object with a "caption" or "text" field, and its loss
mask, a `<key>.mask.png` member (see masks).

Training reads samples by random access rather than as a stream. Aspect-ratio buckets need every image's
size before the first batch, and the rank split and exact resume come from BucketBatchSampler, which
picks dataset indices by (seed, epoch) alone; a stream could offer neither without reading its shards
through first. So each shard is indexed once: a sidecar lists each sample's image member with its byte
offset and size in the tar, its upright width and height (from the header, pixels never decoded) and its
caption. A scan then reads only the sidecars, and loading a sample is one seek and one read. A sample
becomes an ordinary image record whose path is `<shard>#<member>`, so buckets, the sampler, the caches
keyed by path and prior-preservation pairing treat it like a file.

The sidecar `<shard>.idx.json` sits beside its shard, or, when the shard's folder cannot be written,
under the app's cache folder keyed by the shard's path, size and modification time. It records the
shard's size and mtime and is rebuilt when they change. Reading a member checks its tar header (name,
size, where its data starts) against the sidecar, so a sidecar edited or copied from another shard is
rebuilt rather than trusted. A shard cut short (a copy that ended early) is indexed up to its last
complete member; one with nothing readable is skipped, each with a warning. A sample with two images
(a.jpg beside a.png, or a member name repeated) keeps its first; the others are reported as skipped.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import re
import string
import threading
import uuid
import warnings
from collections import OrderedDict
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from .. import notices, paths
from ..errors import UserError
from .columns import Packed
from .headers import MAX_CAPTION_BYTES, decode_caption, read_caption_bytes, read_header
from .index import IMAGE_EXTENSIONS, DataWarning, ScanResult
from .records import TXT_PROMPT, ImageRecords

SHARD_SUFFIX = ".tar"
SIDECAR_SUFFIX = ".idx.json"
SIDECAR_VERSION = 3
MASK_EXTENSION = "mask.png"  # a member <key>.mask.png: the loss mask of sample <key>
MEMBER_SEPARATOR = "#"
CAPTION_FIELDS = ("caption", "text")
PATTERN_EXAMPLE = "shards/{000000..000009}.tar"
_TAR_BLOCK = 512
# Indexing shards is header parsing in Python: below this much data a pool's start-up is not repaid.
POOL_MIN_BYTES = 256 * 2**20
# Open shard files and loaded member tables kept per process; a dataset of more shards reopens some.
MAX_OPEN_SHARDS = 64
# A pattern naming more shards than this is refused before it is expanded: a slip such as
# {000000..999999999} would otherwise hold a billion paths in memory.
MAX_PATTERN_SHARDS = 100_000


# -- which shards a dataset path names -------------------------------------------------------------------

def shard_paths(path: str, label: str) -> Optional[list[str]]:
    """The shards a dataset path names, in order, or None when it is a folder of image files.

    A folder with no image file in it and .tar files is a shard folder (its shards in name order); a path
    with braces is expanded as WebDataset expands shard lists; a path ending in .tar is one shard.
    """
    if os.path.isdir(path):
        return _folder_shards(path)
    if "{" in path:
        from braceexpand import UnbalancedBracesError, braceexpand

        count = _expansion_count(path)
        if count > MAX_PATTERN_SHARDS:
            raise UserError(f"{label}: the shard pattern {path} names {count} shards, more than the "
                            f"{MAX_PATTERN_SHARDS} a pattern may name")
        try:
            expanded = list(braceexpand(path))
        except UnbalancedBracesError:
            raise UserError(f"{label}: unbalanced braces in the shard pattern {path}") from None
        missing = [shard for shard in expanded if not os.path.isfile(shard)]
        if missing:
            raise UserError(f"{label}: {len(missing)} of the {len(expanded)} shards of {path} are missing, "
                            f"the first {missing[0]}")
        return expanded
    if path.endswith(SHARD_SUFFIX) and os.path.isfile(path):
        return [path]
    found = "is a file" if os.path.exists(path) else "not found"
    raise UserError(f"{label}: {path} {found}; expected a folder of images, a folder of .tar shards or a shard "
                    f"pattern such as {PATTERN_EXAMPLE}")


_INT_RANGE = re.compile(r"(-?\d+)\.\.(-?\d+)(?:\.\.-?(\d+))?")
_CHAR_RANGE = re.compile(r"([A-Za-z])\.\.([A-Za-z])(?:\.\.-?(\d+))?")
_LETTERS = string.ascii_uppercase + string.ascii_lowercase


def _expansion_count(pattern: str) -> int:
    """How many names braceexpand makes of a pattern, counted without making them (it builds every
    range in memory before the first name). Follows its grammar: a group is an integer or letter range,
    a comma list, or else literal braces around a pattern; a backslash escapes the next character."""
    count, depth, start, position = 1, 0, 0, 0
    while position < len(pattern):
        character = pattern[position]
        if character == "\\":
            position += 2
            continue
        if character == "{":
            start = position if depth == 0 else start
            depth += 1
        elif character == "}" and depth:
            depth -= 1
            if depth == 0:
                count *= _group_count(pattern[start + 1:position])
        position += 1
    return count


def _group_count(group: str) -> int:
    found = _INT_RANGE.fullmatch(group) or _CHAR_RANGE.fullmatch(group)
    if found:
        first, last, step = found.groups()
        if first.lstrip("-").isdigit():
            first, last = int(first), int(last)
        else:  # braceexpand's letters run A-Z then a-z
            first, last = _LETTERS.index(first), _LETTERS.index(last)
        return abs(last - first) // (int(step or 1) or 1) + 1
    parts, depth, start, position = [], 0, 0, 0
    while position < len(group):
        character = group[position]
        if character == "\\":
            position += 2
            continue
        depth += {"{": 1, "}": -1}.get(character, 0)
        if character == "," and depth == 0:
            parts.append(group[start:position])
            start = position + 1
        position += 1
    if not parts:
        return _expansion_count(group)
    return sum(_expansion_count(part) for part in parts + [group[start:]])


def names_shards(path: str) -> bool:
    """Whether a dataset path names shards rather than a folder of image files, which need not exist yet."""
    if os.path.isdir(path):
        return _folder_shards(path) is not None
    return "{" in path or path.endswith(SHARD_SUFFIX)


def _folder_shards(folder: str) -> Optional[list[str]]:
    """The folder's .tar files in name order, or None if it holds an image file. The listing stops at the
    first image, so an image folder of any size costs a few entries here before its own scan."""
    shards = []
    with os.scandir(folder) as entries:
        for entry in entries:
            name = entry.name.lower()
            if name.startswith("."):
                continue
            if name.endswith(IMAGE_EXTENSIONS):
                return None
            if name.endswith(SHARD_SUFFIX):
                # Opening a named pipe would wait forever for a writer.
                if entry.is_file():
                    shards.append(entry.name)
                else:
                    notices.warn(f"skipping {os.path.join(folder, entry.name)!r}: not a regular file",
                                 DataWarning)
    return [os.path.join(folder, name) for name in sorted(shards)] or None


# -- sidecar indexes -----------------------------------------------------------------------------------------

def sidecar_locations(shard: str, stat: os.stat_result) -> tuple[Path, Path]:
    """(beside the shard, the fallback under the cache folder) for a shard's sidecar index."""
    identity = f"{os.path.abspath(shard)}|{stat.st_size}|{stat.st_mtime_ns}"
    digest = hashlib.sha256(os.fsencode(identity)).hexdigest()[:24]
    return Path(shard + SIDECAR_SUFFIX), paths.cache_dir() / "shard-index" / f"{digest}.json"


def shard_index(shard: str) -> dict:
    """The shard's sidecar index, built and saved first when it is missing or the shard has changed.

    {"version", "size", "mtime_ns", "problem": why the shard is cut short or unreadable, or "",
     "samples": [{"key", "member", "header", "offset", "size", "width", "height", "error", "caption",
                  "caption_problem", "mask", "dropped"}]}; a sample with an error (no image, an unreadable
    header) has no usable image. "header" is where the member's tar header starts, "offset" where its data
    does. "mask" is its mask member as {"member", "header", "offset", "size"}, or null; "dropped" lists
    [member, why] of the sample's members that are not used (a second image).
    """
    index = _fresh_sidecar(shard)
    if index is None:
        index = build_index(shard)
        _save_sidecar(shard, index, sidecar_locations(shard, os.stat(shard)))
    return index


def _fresh_sidecar(shard: str) -> Optional[dict]:
    """The sidecar index made from the shard as it is now, or None."""
    stat = os.stat(shard)
    for location in sidecar_locations(shard, stat):
        index = _load_sidecar(location)
        if index is not None and (index["size"], index["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns):
            return index
    return None


def _load_sidecar(location: Path) -> Optional[dict]:
    """A sidecar's content, or None when it is missing, corrupt or of another version."""
    try:
        index = json.loads(location.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return index if isinstance(index, dict) and index.get("version") == SIDECAR_VERSION else None


def _save_sidecar(shard: str, index: dict, locations: tuple[Path, Path]) -> None:
    # ASCII with escapes: a member name that is not UTF-8 holds surrogates, which UTF-8 cannot write.
    text = json.dumps(index)
    for location in locations:
        # Written under a temporary name and renamed, so that ranks indexing at once never read half a file.
        temp = location.with_name(f".{location.name}.{uuid.uuid4().hex}.tmp")
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
            temp.write_text(text, encoding="ascii")
            os.replace(temp, location)
            return
        except OSError:
            temp.unlink(missing_ok=True)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    notices.warn(f"{shard}: cannot write its index beside it or in {paths.cache_dir()}; the next scan reads "
                  "the shard again", DataWarning)


def build_index(shard: str) -> dict:
    """Index a shard by reading its tar headers and, of each sample, the image header and the caption."""
    import tarfile

    stat = os.stat(shard)
    # These three keys first: _looks_fresh reads them from the start of the saved file.
    index = {"version": SIDECAR_VERSION, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "problem": "",
             "samples": []}
    with open(shard, "rb") as handle:
        try:
            tar = tarfile.open(fileobj=handle, mode="r:")
        except tarfile.TarError as error:
            index["problem"] = f"not a readable tar file ({error})"
            return index
        with tar:
            members, cut = _complete_members(tar, handle, stat.st_size)
            if cut:
                last = f"its last complete member is {members[-1].name}" if members else "no member is complete"
                index["problem"] = f"the shard is cut short ({cut}); {last}"
            index["samples"] = [_sample(tar, key, parts) for key, parts in _group(members).items()]
    return index


def _complete_members(tar, handle, file_size: int) -> tuple[list, str]:
    """(the regular members whose data is all in the file, in tar order; what cut the shard short, or "").

    Python's tarfile takes a missing or garbled header for the end of the archive, so the end is checked
    here: a complete archive has a zero block where the next header would be.
    """
    import tarfile

    members = []
    try:
        for info in tar:
            if info.offset_data + info.size > file_size:
                return members, f"{info.name} ends past the end of the file"
            if info.isfile():
                members.append(info)
    except tarfile.TarError as error:
        return members, str(error)
    handle.seek(tar.offset)
    if handle.read(_TAR_BLOCK) != bytes(_TAR_BLOCK):
        return members, "no end-of-archive marker"
    return members, ""


def _group(members: list) -> dict[str, dict[str, list]]:
    """Members by sample key, then by extension (lower case), in the order keys first appear; a
    repeated member name is a second member of its extension."""
    from webdataset.tariterators import base_plus_ext

    samples: dict[str, dict[str, list]] = {}
    for info in members:
        key, extension = base_plus_ext(info.name)
        if key is not None:
            samples.setdefault(key, {}).setdefault(extension.lower(), []).append(info)
    return samples


def _sample(tar, key: str, grouped: dict[str, list]) -> dict:
    images = [info for e, found in grouped.items() if "." + e in IMAGE_EXTENSIONS for info in found]
    image = images[0] if images else None
    # Of each extension the first member is used: a sample is one image with one caption and one mask.
    parts = {extension: found[0] for extension, found in grouped.items()}
    dropped = [info for e, found in grouped.items() if "." + e not in IMAGE_EXTENSIONS for info in found[1:]]
    sample = {"key": key, "member": image.name if image else "", "header": image.offset if image else 0,
              "offset": image.offset_data if image else 0, "size": image.size if image else 0, "width": 0,
              "height": 0, "error": "", "caption": "", "caption_problem": "",
              "dropped": [[info.name, f"a second image of sample {key!r}, which uses {image.name}"]
                          for info in images[1:]]
              + [[info.name, f"a second member named {info.name} in sample {key!r}; the first is used"]
                 for info in dropped]}
    mask = parts.get(MASK_EXTENSION)
    sample["mask"] = ({"member": mask.name, "header": mask.offset, "offset": mask.offset_data, "size": mask.size}
                      if mask else None)
    if image is None:
        sample["error"] = "the sample has no image (" + ", ".join(f".{e}" for e in parts) + ")"
        return sample
    sample["width"], sample["height"], sample["error"] = _read_size(tar.extractfile(image))
    sample["caption"], sample["caption_problem"] = _caption(tar, parts)
    return sample


def _read_size(handle) -> tuple[int, int, str]:
    """(width, height, why the image cannot be used, or "") from the header, as a folder scan reads it."""
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # reported as skipped instead
            return (*read_header(handle), "")
    except Image.DecompressionBombError as error:
        return 0, 0, f"image too large to decode safely: {error}"
    except Exception as error:  # PIL raises many types for unreadable and corrupt files
        return 0, 0, f"cannot read image: {error.__class__.__name__}: {error}"


def _caption(tar, parts: dict[str, object]) -> tuple[str, str]:
    """(caption, what is wrong with it, or "") from the sample's .txt, else its .json."""
    if "txt" in parts:
        text, problem = decode_caption(*read_caption_bytes(tar.extractfile(parts["txt"])))
    elif "json" in parts:
        raw, longer = read_caption_bytes(tar.extractfile(parts["json"]))
        if longer:
            return "", f"the caption JSON is longer than {MAX_CAPTION_BYTES} bytes"
        try:
            fields = json.loads(raw)
        except ValueError as error:
            return "", f"the caption JSON cannot be read: {error}"
        found = [fields[f] for f in CAPTION_FIELDS if isinstance(fields, dict) and isinstance(fields.get(f), str)]
        if not found:
            return "", "the JSON has no " + " or ".join(f'"{f}"' for f in CAPTION_FIELDS) + " text field"
        text, problem = found[0].strip(), ""
    else:
        return "", "no caption (.txt or .json)"
    return text, problem or ("" if text else "the caption is empty")


def index_shards(shards: list[str]) -> Iterator[dict]:
    """Each shard's sidecar index, in order and one at a time, so that a million samples are never all in
    memory as dicts. Those missing or stale are built (and saved) first-come by a pool of processes when
    there is much to read."""
    stale = [shard for shard in shards if not _looks_fresh(shard)]
    work = sum(os.path.getsize(shard) for shard in stale)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    with contextlib.ExitStack() as stack:
        if len(stale) > 1 and cores > 1 and work >= POOL_MIN_BYTES:
            # Not forked: the app scans from one of its threads, and a forked child inherits held locks.
            pool = stack.enter_context(multiprocessing.get_context("spawn").Pool(min(cores, len(stale))))
            built = pool.imap(shard_index, stale, chunksize=1)
        else:
            built = map(shard_index, stale)
        pending = set(stale)
        for shard in shards:
            # shard_index checks the sidecar in full, and rebuilds one that only looked fresh.
            yield next(built) if shard in pending else shard_index(shard)


_SIDECAR_HEAD = re.compile(rb'^\{"version": (\d+), "size": (\d+), "mtime_ns": (\d+),')


def _looks_fresh(shard: str) -> bool:
    """Whether a sidecar of the shard as it is now exists, from its first bytes (written first, see
    build_index), without parsing the whole file."""
    stat = os.stat(shard)
    for location in sidecar_locations(shard, stat):
        try:
            with open(location, "rb") as handle:
                head = _SIDECAR_HEAD.match(handle.read(128))
        except OSError:
            continue
        if head and tuple(map(int, head.groups())) == (SIDECAR_VERSION, stat.st_size, stat.st_mtime_ns):
            return True
    return False


# -- scanning into records -----------------------------------------------------------------------------------

def member_path(shard: str, member: str) -> str:
    return f"{shard}{MEMBER_SEPARATOR}{member}"


def scan_shards(shards: list[str], template: str) -> ScanResult:
    """The usable samples of the shards, in shard then tar order, as image records with resolved prompts;
    the others are reported as skipped, naming shard and member. Each shard's samples become columns as
    soon as its index is read."""
    from PIL import Image

    max_pixels = Image.MAX_IMAGE_PIXELS or float("inf")
    wants_captions = TXT_PROMPT in template
    names, widths, heights, captions, result = [], [], [], [], ScanResult()

    def skip(path: str, reason: str) -> None:
        notices.warn(f"skipping {path}: {reason}", DataWarning)
        result.skipped.append((path, reason))

    for shard, index in zip(shards, index_shards(shards)):
        if index["problem"] and not index["samples"]:
            skip(shard, index["problem"])
            continue
        if index["problem"]:
            notices.warn(f"{shard}: {index['problem']}; using the {len(index['samples'])} samples up to it",
                          DataWarning)
        usable = []
        for sample in index["samples"]:
            for member, reason in sample["dropped"]:
                skip(member_path(shard, member), reason)
            path = member_path(shard, sample["member"] or sample["key"])
            if sample["error"]:
                skip(path, sample["error"])
            elif sample["width"] * sample["height"] > max_pixels:
                skip(path, f"image too large to decode safely: {sample['width']}x{sample['height']} pixels, "
                           f"over PIL.Image.MAX_IMAGE_PIXELS ({max_pixels})")
            else:
                if wants_captions and sample["caption_problem"]:
                    # As a folder scan says it: a caption read as latin-1 is still used.
                    fallback = "" if sample["caption"] else "; using the prompt without it"
                    notices.warn(f"{path}: {sample['caption_problem']}{fallback}", DataWarning)
                usable.append(sample)
        names.append(Packed.from_names([member_path(shard, sample["member"]) for sample in usable]))
        widths.append(np.array([sample["width"] for sample in usable], dtype=np.int32))
        heights.append(np.array([sample["height"] for sample in usable], dtype=np.int32))
        if wants_captions:
            captions.append(Packed.from_bytes([sample["caption"].encode("utf-8") for sample in usable]))
    count = sum(len(column) for column in names)
    rows = np.arange(count, dtype=np.int64)
    texts = Packed.join(captions) if wants_captions else None
    result.records = ImageRecords("", Packed.join(names),
                                  np.concatenate(widths or [np.zeros(0, np.int32)]),
                                  np.concatenate(heights or [np.zeros(0, np.int32)]), rows, template, texts,
                                  rows.astype(np.int32) if wants_captions else None)
    return result


def shard_masks(shards: list[str]) -> dict[str, str]:
    """Image member path -> mask member path, for the samples of the shards that have a mask member."""
    return {member_path(shard, sample["member"]): member_path(shard, sample["mask"]["member"])
            for shard in shards for sample in shard_index(shard)["samples"]
            if sample["member"] and sample.get("mask")}


# -- reading members -----------------------------------------------------------------------------------------

def member_table(index: dict) -> dict[str, tuple[int, int, int]]:
    """Member name -> (header offset, data offset, size) of the images and masks a shard's index lists."""
    table = {}
    for sample in index["samples"]:
        for part in (sample, sample["mask"]):
            if part and part["member"]:
                table[part["member"]] = (part["header"], part["offset"], part["size"])
    return table


def _header_at(tar, header: int):
    """The member whose tar header starts at `header`, as tarfile reads it (long and non-ASCII names
    come from the extended headers before the one next to the data), or None if none starts there."""
    import tarfile

    tar.fileobj.seek(header)
    try:
        return tarfile.TarInfo.fromtarfile(tar)
    except (tarfile.TarError, EOFError):
        return None


def split_member(path: str) -> Optional[tuple[str, str]]:
    """(shard, member) when a record's path names a member of a shard, else None."""
    shard, separator, member = path.rpartition(SHARD_SUFFIX + MEMBER_SEPARATOR)
    if not separator:
        return None
    shard += SHARD_SUFFIX
    # A file whose own name holds ".tar#" is still a file.
    return (shard, member) if os.path.isfile(shard) else None


class _OpenShards:
    """This process's open shards (as tarfile objects, for reading headers) and member tables (member ->
    header offset, data offset, size), the most recent MAX_OPEN_SHARDS of each. A forked data-loader
    worker starts with none of its own: the inherited files share their read position with the parent's,
    and the lock may have been held at the fork."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.lock = threading.Lock()
        self.files: OrderedDict[str, object] = OrderedDict()
        self.tables: OrderedDict[str, dict[str, tuple[int, int, int]]] = OrderedDict()

    def read(self, shard: str, member: str) -> bytes:
        import tarfile

        with self.lock:
            table = self._get(self.tables, shard, lambda: member_table(shard_index(shard)))
            tar = self._get(self.files, shard, lambda: tarfile.open(shard, mode="r:"))
            mismatch = self._mismatch(tar, table, member)
            if mismatch:
                # The sidecar matched the shard's size and mtime but not its content: edited, or copied
                # from another shard. It is rebuilt from the shard rather than trusted.
                notices.warn(f"{shard}: its index does not match the shard ({mismatch}); indexing it again",
                             DataWarning)
                index = build_index(shard)
                _save_sidecar(shard, index, sidecar_locations(shard, os.stat(shard)))
                table = self.tables[shard] = member_table(index)
                mismatch = self._mismatch(tar, table, member)
                if mismatch:
                    raise OSError(f"{shard}: {mismatch}")
            _, offset, size = table[member]
            tar.fileobj.seek(offset)
            data = tar.fileobj.read(size)
        if len(data) != size:
            raise OSError(f"{shard}: member {member} is cut short")
        return data

    @staticmethod
    def _mismatch(tar, table: dict, member: str) -> str:
        """What is wrong with the table's entry of member, read against the shard's tar header, or ""."""
        if member not in table:
            return f"it has no member {member!r}"
        header, offset, size = table[member]
        found = _header_at(tar, header)
        if found is None or (found.name, found.offset_data, found.size) != (member, offset, size):
            what = f"{found.name!r} of {found.size} bytes" if found is not None else "no member"
            return f"{what} at the place of {member!r} ({size} bytes)"
        return ""

    @staticmethod
    def _get(cache: OrderedDict, shard: str, make):
        if shard in cache:
            cache.move_to_end(shard)
            return cache[shard]
        value = cache[shard] = make()
        if len(cache) > MAX_OPEN_SHARDS:
            _, dropped = cache.popitem(last=False)
            if hasattr(dropped, "close"):
                dropped.close()
        return value


_open_shards = _OpenShards()
if hasattr(os, "register_at_fork"):  # where processes start by spawning, each imports a fresh one
    os.register_at_fork(after_in_child=_open_shards.reset)


def image_file(path: str):
    """What PIL should open for a record's path: the path of a file, or the bytes of a shard member."""
    found = split_member(path)
    return io.BytesIO(_open_shards.read(*found)) if found else path


def file_stamp(path: str) -> str:
    """The identity of a record's bytes for caches: absolute path, byte size and mtime. A shard member
    has its shard's size and mtime, since it changes only with its shard."""
    found = split_member(path)
    target = found[0] if found else path
    stat = os.stat(target)
    name = os.path.abspath(target) + (MEMBER_SEPARATOR + found[1] if found else "")
    return f"{name}|{stat.st_size}|{stat.st_mtime_ns}"
