"""Editing the captions of a dataset folder in place: each image with its caption, one caption saved, and
edits of every caption (a trigger word added or replaced, find and replace) that return how many changed.

An image's caption is the `.txt` file of its stem (a.png: a.txt), the one the trainer reads
(engine.data.index: the extension in any case; of several, the last in name order), read as the trainer
reads it (engine.data.headers). Captions are comma-separated tags. A caption is written whole, as the
captioner writes it (engine.data.caption_files): a caption file that is a link is replaced, never written
through, so nothing outside the folder is written.
"""
from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

from engine.data import archive
from engine.data.caption_files import write_caption
from engine.data.headers import decode_caption, open_regular, read_caption_bytes
from engine.errors import UserError

from .datasets import file_name_problem

Folder = Union[str, Path]


@dataclass(frozen=True)
class Entry:
    image: str          # the image's file name in the dataset folder
    caption: str        # its caption, "" when it has none
    caption_file: str   # the caption file's name: the existing one, else `<stem>.txt`


def entries(folder: Folder) -> list[Entry]:
    """The dataset's images in name order, each with its caption; masks are not entries.

    A caption file that cannot be read, or one longer than the trainer reads, is refused (a UserError
    naming it): editing it here would lose what was not read.
    """
    folder = _dataset(folder)
    names = sorted(os.listdir(folder))
    captions = {}
    for name in names:   # in name order, so the last caption file of a stem wins, as in the trainer
        if archive.dataset_kind(name) == "caption":
            captions[name[:-4]] = name
    found = []
    for name in names:
        if archive.dataset_kind(name) == "image":
            stem = os.path.splitext(name)[0]
            caption_file = captions.get(stem)
            text = _read(folder / caption_file) if caption_file else ""
            found.append(Entry(name, text, caption_file or stem + ".txt"))
    return found


def save_caption(folder: Folder, image: str, text: str) -> Entry:
    """Write the caption of one image of the dataset (its surrounding whitespace dropped, as the trainer
    drops it); the entry as saved. An image named with folder parts, or not in the dataset, is refused."""
    folder = _dataset(folder)
    if not image:
        raise UserError("choose an image first")
    why = file_name_problem(image)
    if why:
        raise UserError(f"image {image!r}: refused: {why}; name an image of the dataset {folder.name!r}")
    entry = next((e for e in entries(folder) if e.image == image), None)
    if entry is None:
        raise UserError(f"image {image!r}: not an image of the dataset {folder.name!r}")
    saved = Entry(entry.image, (text or "").strip(), entry.caption_file)
    _write(folder, saved.caption_file, saved.caption)
    return saved


def add_trigger(folder: Folder, word: str) -> int:
    """Put the trigger word first in every caption that lacks it as a whole word (an image without a caption
    gets one of the word alone); how many captions changed."""
    word = _check_word(word, "trigger word")
    present = _whole(word)
    return _edit_all(folder, lambda caption: caption if present.search(caption)
                     else f"{word}, {caption}" if caption else word)


def replace_trigger(folder: Folder, old: str, new: str) -> int:
    """Replace the word old by new wherever it stands as a whole word or tag (not inside another word);
    how many captions changed."""
    old, new = _check_word(old, "word to replace"), _check_word(new, "replacement word")
    found = _whole(old)
    return _edit_all(folder, lambda caption: found.sub(lambda _: new, caption))


def find_replace(folder: Folder, find: str, replace: str) -> int:
    """Replace the literal text find by replace in every caption; how many captions changed."""
    if not find:
        raise UserError("find: type the text to find first")
    return _edit_all(folder, lambda caption: caption.replace(find, replace or ""))


def tag_counts(folder: Folder) -> list[tuple[str, int]]:
    """(tag, how many times it appears) over the captions split on commas, most common first, then by tag."""
    counts = Counter(tag for entry in entries(folder) for tag in map(str.strip, entry.caption.split(",")) if tag)
    return sorted(counts.items(), key=lambda item: (-item[1], item[0]))


def _dataset(folder: Folder) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"dataset folder {str(folder)!r} does not exist")
    return folder


def _read(path: Path) -> str:
    try:
        with open_regular(str(path)) as handle:
            raw, cut = read_caption_bytes(handle)
    except OSError as error:
        raise UserError(f"caption {path.name!r}: cannot be read: {error.strerror or error}") from None
    if cut:
        raise UserError(f"caption {path.name!r} is longer than the trainer reads ({len(raw)} bytes); "
                        "shorten it outside the app first")
    return decode_caption(raw)[0]


def _write(folder: Path, name: str, text: str) -> None:
    try:
        write_caption(folder / name, text)
    except OSError as error:
        raise UserError(f"caption {name!r}: cannot be written: {error.strerror or error}") from None


def _edit_all(folder: Folder, edit: Callable[[str], str]) -> int:
    """Write edit(caption) to each caption file where it differs from the caption (images of one stem share
    theirs); how many were written. A write that fails is refused naming its file and how many were
    written before it."""
    folder = _dataset(folder)
    changed, seen = 0, set()
    for entry in entries(folder):
        text = edit(entry.caption).strip()
        if entry.caption_file in seen or text == entry.caption:
            continue
        seen.add(entry.caption_file)
        try:
            _write(folder, entry.caption_file, text)
        except UserError as error:
            raise UserError(f"{error} ({changed} captions were changed before it)") from None
        changed += 1
    return changed


def _check_word(word: str, what: str) -> str:
    word = (word or "").strip()
    if not word:
        raise UserError(f"{what}: type a word first")
    if "," in word or "\n" in word:
        raise UserError(f"{what} {word!r}: refused: a comma or line break in it (captions are comma-separated tags)")
    return word


def _whole(word: str) -> re.Pattern:
    """The word where no letter, digit or _ touches it on either side."""
    return re.compile(rf"(?<!\w){re.escape(word)}(?!\w)")
