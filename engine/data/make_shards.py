"""`python -m engine make-shards SRC DST --per-shard N`: an image folder written as WebDataset shards.

The images go in name order, the order a folder scan gives them, each with its caption file (the .txt of
the same stem) and its loss mask (`<stem>.mask.png`) when it has them, their bytes unchanged: the shards
train exactly as the folder does.
Each shard's sidecar index (see shards) is written as soon as the shard is finished.
"""
from __future__ import annotations

import os
from typing import Callable

from ..errors import UserError
from .index import IMAGE_EXTENSIONS
from .masks import MASK_SUFFIX
from .shards import MASK_EXTENSION, SHARD_SUFFIX, SIDECAR_SUFFIX, shard_index

SHARD_PATTERN = "%06d" + SHARD_SUFFIX
_MASKS = tuple(".mask" + extension for extension in IMAGE_EXTENSIONS)


def folder_samples(source: str) -> list[tuple[str, str, str, str]]:
    """(WebDataset key, image name, caption name or "", mask name or "") of each image of the folder, in
    name order. Loss masks go with their images; hidden files are left out, as a folder scan leaves them."""
    names = sorted(name for name in os.listdir(source)
                   if not name.startswith(".") and os.path.isfile(os.path.join(source, name)))
    captions = {name.rpartition(".")[0]: name for name in names if name.lower().endswith(".txt")}
    masks = {name[:-len(MASK_SUFFIX)]: name for name in names if name.lower().endswith(MASK_SUFFIX)}
    samples, keys = [], set()
    for name in names:
        lower = name.lower()
        if not lower.endswith(IMAGE_EXTENSIONS) or lower.endswith(_MASKS):
            continue
        stem = name.rpartition(".")[0]
        # A WebDataset key ends at the first dot of the name; a.png and a.jpg need keys of their own.
        key = base = stem.replace(".", "_")
        copies = 0
        while key in keys:
            copies += 1
            key = f"{base}_{copies}"
        keys.add(key)
        samples.append((key, name, captions.get(stem, ""), masks.get(stem, "")))
    return samples


def _sample(folder: str, key: str, image: str, caption: str, mask: str) -> dict:
    """One sample as ShardWriter takes it: member extension -> bytes, read only when it is written."""
    sample = {"__key__": key, image.rpartition(".")[2].lower(): _read(folder, image)}
    if caption:
        sample["txt"] = _read(folder, caption)
    if mask:
        sample[MASK_EXTENSION] = _read(folder, mask)
    return sample


def _read(folder: str, name: str) -> bytes:
    with open(os.path.join(folder, name), "rb") as handle:
        return handle.read()


def make_shards(source: str, target: str, per_shard: int, say: Callable[[str], None] = print) -> list[str]:
    """Write the images of folder `source` as shards target/000000.tar, ... of per_shard samples each,
    with their sidecar indexes; returns the shard paths."""
    from webdataset import ShardWriter

    if per_shard < 1:
        raise UserError(f"make-shards --per-shard: must be at least 1, got {per_shard}")
    if not os.path.isdir(source):
        raise UserError(f"make-shards SRC: folder not found: {source}")
    samples = folder_samples(source)
    for name in sorted(os.listdir(source)):
        path = os.path.join(source, name)
        if name.lower().endswith(IMAGE_EXTENSIONS) and os.path.exists(path) and not os.path.isfile(path):
            say(f"skipping {name}: not a regular file")
    if not samples:
        raise UserError(f"make-shards SRC: no images in {source} (formats: jpg, png, webp, bmp)")
    os.makedirs(target, exist_ok=True)
    # Shards left from another run would mix into this dataset when the folder is trained on.
    if any(name.endswith(SHARD_SUFFIX) for name in os.listdir(target)):
        raise UserError(f"make-shards DST: {target} already holds .tar shards; name an empty folder")
    written = []

    def finished(shard: str) -> None:
        index = shard_index(shard)
        written.append(shard)
        say(f"{shard}: {len(index['samples'])} samples, {os.path.getsize(shard)} bytes")

    try:
        # A fixed member mtime makes the same folder give byte-identical shards.
        with ShardWriter(os.path.join(target, SHARD_PATTERN), maxcount=per_shard, post=finished, verbose=0,
                         encoder=False, mtime=0) as writer:
            for sample in samples:
                writer.write(_sample(source, *sample))
    except OSError as error:
        # The folder held no shards before: what is there now is this run's, and a partial set would make
        # the next run refuse the folder.
        for name in os.listdir(target):
            if name.endswith((SHARD_SUFFIX, SHARD_SUFFIX + SIDECAR_SUFFIX)):
                os.remove(os.path.join(target, name))
        raise UserError(f"make-shards: {error.strerror or error} ({error.filename or target}); the shards "
                        "written so far were removed") from None
    say(f"wrote {len(samples)} samples to {len(written)} shards in {target}, each with its index "
        f"<shard>{SIDECAR_SUFFIX}")
    return written


def cmd_make_shards(args) -> int:
    make_shards(args.source, args.target, args.per_shard)
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("make-shards", help="write an image folder (with .txt captions) as WebDataset "
                                                       "shards with their sidecar indexes")
    parser.add_argument("source", metavar="SRC", help="folder of images and their .txt captions")
    parser.add_argument("target", metavar="DST", help="folder for the shards 000000.tar, 000001.tar, ...")
    parser.add_argument("--per-shard", type=int, default=1000, metavar="N", help="samples per shard (default 1000)")
    parser.set_defaults(func=cmd_make_shards)
