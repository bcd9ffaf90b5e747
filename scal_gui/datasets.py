"""The app's data folder: named datasets made from files uploaded through the page.

Each dataset is one flat folder `<data folder>/<name>/` of images, `.txt` captions and `<stem>.mask.png`
masks, the layout the trainer reads. Uploads are images, captions, masks or archives (unpacked by
engine.data.archive, which refuses hostile ones); nothing uploaded is trusted for its name or its size.
The data folder is `--data-dir DIR`, by default `$XDG_DATA_HOME/scal-sdt/datasets`
(`~/.local/share/scal-sdt/datasets`).
"""
from __future__ import annotations

import os
import re
import shutil
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Union

from engine.data import archive
from engine.errors import UserError

NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
MAX_UPLOAD_BYTES = 20 * 2**30   # all the files of one upload together, as uploaded (archives compressed)
_lock = threading.Lock()          # one upload at a time writes into the data folder


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "scal-sdt" / "datasets"


def check_name(name: str) -> str:
    """A dataset name: letters, digits, - and _ (starting with a letter or digit, at most 64); refused otherwise."""
    name = (name or "").strip()
    if not NAME.fullmatch(name):
        raise UserError(f"dataset name {name!r}: use letters, digits, - and _ only (no spaces, dots or slashes), "
                        "starting with a letter or digit, at most 64 characters")
    return name


def file_name_problem(name: str) -> Optional[str]:
    """Why name is not a plain file name of a dataset (folder parts, hidden, empty), or None."""
    why = archive.name_problem(name)
    if why is None and ("/" in name or "\\" in name):
        why = "a folder in its name"
    if why is None and (not name or name.startswith(".")):
        why = "a hidden or empty name"
    return why


def check_file_name(name: str) -> str:
    """An uploaded file's own name: a plain name, no folder parts, nothing hidden."""
    why = file_name_problem(name)
    if why:
        raise UserError(f"file {name!r}: refused: {why}")
    return name


@dataclass
class DatasetInfo:
    name: str
    path: Path
    images: int
    captioned: int

    def label(self) -> str:
        return f"{self.name} ({self.images} images, {self.captioned} captioned)"


def count(folder: Path) -> tuple[int, int]:
    """(images, images with a caption beside them) of a dataset folder; masks are not images."""
    names = [entry.name for entry in os.scandir(folder) if entry.is_file(follow_symlinks=False)]
    captions = {name[:-4].casefold() for name in names if archive.dataset_kind(name) == "caption"}
    images = [name for name in names if archive.dataset_kind(name) == "image"]
    return len(images), sum(os.path.splitext(name)[0].casefold() in captions for name in images)


def list_datasets(data_dir: Union[str, Path]) -> list[DatasetInfo]:
    """The data folder's datasets by name; a missing data folder has none (it is made by the first upload)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    found = []
    for entry in sorted(os.scandir(data_dir), key=lambda e: e.name.casefold()):
        if entry.is_dir(follow_symlinks=False) and NAME.fullmatch(entry.name):
            found.append(DatasetInfo(entry.name, Path(entry.path), *count(Path(entry.path))))
    return found


def dataset_path(data_dir: Union[str, Path], name: str) -> Path:
    return Path(data_dir) / check_name(name)


@dataclass
class AddReport:
    dataset: str
    added: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)   # one line each: what and why

    def message(self) -> str:
        parts = [f"{self.dataset}: added {len(self.added)} files"]
        if self.skipped:
            more = len(self.skipped) - 5
            shown = ", ".join(self.skipped[:5]) + (f" and {more} more" if more > 0 else "")
            parts.append(f"skipped {len(self.skipped)} that are not images, captions or masks ({shown})")
        if self.refused:
            parts.append(f"refused {len(self.refused)}: " + "; ".join(self.refused))
        return ", ".join(parts) + "."


Upload = Union[str, Path, tuple]   # a path (its own name is its base name) or (name as uploaded, path)


def _pairs(uploads: Iterable[Upload]) -> list[tuple[str, Path]]:
    pairs = []
    for upload in uploads:
        name, path = upload if isinstance(upload, tuple) else (Path(upload).name, upload)
        pairs.append((str(name), Path(path)))
    return pairs


def add_files(data_dir: Union[str, Path], name: str, uploads: Iterable[Upload],
              limits: archive.Limits = archive.Limits(), max_upload_bytes: int = MAX_UPLOAD_BYTES) -> AddReport:
    """Add uploaded images, captions, masks and archives to the dataset `name` (made if new).

    A bad dataset name, or an upload larger than max_upload_bytes in all, refuses the whole upload (a
    UserError). Otherwise each file is added, skipped (not a dataset file) or refused on its own: a bad
    name, a name already in the dataset (in any case), a hostile archive. A refused archive adds nothing.
    """
    name = check_name(name)
    pairs = _pairs(uploads)
    if not pairs:
        raise UserError("choose files to upload first")
    total = sum(path.stat().st_size for _, path in pairs)
    if total > max_upload_bytes:
        raise UserError(f"the upload is {total} bytes, over the limit of {max_upload_bytes} bytes; "
                        "split it or copy the folder onto the server")
    report = AddReport(name)
    folder = Path(data_dir) / name
    with _lock:
        created = not folder.is_dir()
        folder.mkdir(parents=True, exist_ok=True)
        for original, path in pairs:
            try:
                check_file_name(original)
                if archive.is_archive(original):
                    # extract chooses the format by the name, so the upload's own name is kept beside it
                    summary = _extract_as(original, path, folder, limits)
                    report.added += summary.extracted
                    report.skipped += [f"{original}:{member}" for member in summary.skipped]
                elif archive.dataset_kind(original) is None:
                    report.skipped.append(original)
                else:
                    _add_one(original, path, folder)
                    report.added.append(original)
            except UserError as error:
                report.refused.append(str(error))
            except OSError as error:
                report.refused.append(f"{original}: {error.strerror or error}")
        if created and not report.added:
            shutil.rmtree(folder, ignore_errors=True)   # nothing came of it: no empty dataset is left
    return report


def _extract_as(original: str, path: Path, folder: Path, limits: archive.Limits) -> archive.Summary:
    if path.name == original:
        return archive.extract(path, folder, limits)
    # an upload stored under another name: a link (or copy) named as uploaded, in a private folder
    holder = folder.parent / f".upload-{uuid.uuid4().hex}"
    holder.mkdir()
    try:
        named = holder / original
        try:
            os.link(path, named)
        except OSError:
            shutil.copyfile(path, named)
        return archive.extract(named, folder, limits)
    finally:
        shutil.rmtree(holder, ignore_errors=True)


def _add_one(original: str, path: Path, folder: Path) -> None:
    taken = {entry.casefold() for entry in os.listdir(folder)}
    if original.casefold() in taken:
        raise UserError(f"file {original!r}: refused: the dataset already has a file of that name")
    staging = folder / f".{original}.upload-{uuid.uuid4().hex}"
    try:
        shutil.copyfile(path, staging)
        os.rename(staging, folder / original)
    finally:
        if staging.exists():
            staging.unlink()
