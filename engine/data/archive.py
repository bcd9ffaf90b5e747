"""Unpacking an uploaded dataset archive (.zip, .tar, .tar.gz/.bz2/.xz) without trusting it.

Every member is checked before anything is written: its name (no `..`, no absolute path or drive letter,
valid UTF-8, no NUL, no two names that differ only in case), its type (regular files and folders only: no
links, devices or fifos), and the totals (member count, uncompressed bytes, compression ratio: a bomb).
A refusal is a UserError of one line naming the member. Only dataset files are written (images, `.txt`
captions, `<stem>.mask.png` masks), flattened into the destination folder; the others are skipped and
listed. Files are streamed into a hidden folder beside the destination and renamed in at the end, so a
refused or failed archive leaves nothing behind.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tarfile
import uuid
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

from ..errors import UserError
from .listing import IMAGE_EXTENSIONS

CAPTION_EXTENSIONS = (".txt",)
ZIP_SUFFIXES = (".zip",)
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tbz", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = ZIP_SUFFIXES + TAR_SUFFIXES
_CHUNK = 1 << 20
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class Limits:
    max_files: int = 50_000            # members of any kind (20,000 captioned images with masks fit)
    max_bytes: int = 20 * 2**30        # uncompressed bytes of all regular members
    max_ratio: float = 100.0           # uncompressed ÷ compressed, per zip member, for the whole tar stream
    ratio_floor: int = 1 << 20         # smaller members (or tars) are not held to max_ratio: text compresses well


@dataclass
class Summary:
    extracted: list[str] = field(default_factory=list)   # names written into the destination
    skipped: list[str] = field(default_factory=list)     # members that are not dataset files

    def describe(self) -> str:
        text = f"{len(self.extracted)} files added"
        if self.skipped:
            more = len(self.skipped) - 5
            shown = ", ".join(self.skipped[:5]) + (f" and {more} more" if more > 0 else "")
            text += f", {len(self.skipped)} skipped ({shown})"
        return text


def is_archive(name: str) -> bool:
    return name.lower().endswith(ARCHIVE_SUFFIXES)


def dataset_kind(name: str) -> Optional[str]:
    """"mask", "image" or "caption" for a file name a dataset keeps; None for others (and hidden files)."""
    lower = name.lower()
    if not name or name.startswith("."):
        return None
    if lower.endswith(tuple(".mask" + e for e in IMAGE_EXTENSIONS)):
        return "mask"
    if lower.endswith(IMAGE_EXTENSIONS):
        return "image"
    if lower.endswith(CAPTION_EXTENSIONS):
        return "caption"
    return None


def name_problem(name: str) -> Optional[str]:
    """Why a member's name is refused, or None: NUL, an absolute path, a drive letter, a `..` component."""
    if "\x00" in name:
        return "a NUL character in its name"
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return "a name that is not valid UTF-8"
    if name.startswith(("/", "\\")):
        return "an absolute path"
    if _DRIVE.match(name):
        return "a drive letter"
    if any(part == ".." for part in re.split(r"[\\/]", name)):
        return "a '..' component"
    return None


@dataclass
class _Member:
    name: str          # as checked
    size: int
    handle: object     # ZipInfo or the tar member's offset


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def _refuse(archive: Path, member: str, why: str) -> UserError:
    return UserError(f"{archive.name}: refused member {member!r}: {why}")


def _zip_name(info: zipfile.ZipInfo) -> str:
    """The member's name as stored: zipfile cuts names at a NUL and reads names without the UTF-8 flag as
    cp437, so the raw bytes are recovered and decoded as UTF-8 (surrogates mark bytes that are not)."""
    name = info.orig_filename
    if not info.flag_bits & 0x800:
        try:
            name = name.encode("cp437").decode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            pass
    return name


def _scan_zip(path: Path, archive: zipfile.ZipFile, limits: Limits) -> Iterator[tuple[str, Optional[_Member]]]:
    infos = archive.infolist()
    if len(infos) > limits.max_files:
        raise _refuse(path, _zip_name(infos[limits.max_files]),
                      f"more than {limits.max_files} members (the archive has {len(infos)})")
    for info in infos:
        name = _zip_name(info)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _refuse(path, name, "a symbolic link")
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise _refuse(path, name, "not a regular file")
        if info.flag_bits & 0x1:
            raise _refuse(path, name, "encrypted")
        if info.is_dir():
            yield name, None
            continue
        if info.file_size >= limits.ratio_floor and info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise _refuse(path, name, f"compressed more than {limits.max_ratio:g} times "
                                      f"({info.file_size} bytes from {info.compress_size}): a zip bomb")
        yield name, _Member(name, info.file_size, info)


def _scan_tar(path: Path, archive: tarfile.TarFile, limits: Limits) -> Iterator[tuple[str, Optional[_Member]]]:
    compressed = max(path.stat().st_size, 1)
    total, count = 0, 0
    for member in archive:
        count += 1
        name = member.name
        if count > limits.max_files:
            raise _refuse(path, name, f"more than {limits.max_files} members")
        if member.issym() or member.islnk():
            raise _refuse(path, name, f"a {'symbolic' if member.issym() else 'hard'} link to {member.linkname!r}")
        if member.isdir():
            yield name, None
            continue
        if not member.isreg():
            raise _refuse(path, name, "not a regular file (a device, fifo or other special member)")
        total += member.size
        if total >= limits.ratio_floor and total > limits.max_ratio * compressed:
            raise _refuse(path, name, f"the archive expands more than {limits.max_ratio:g} times "
                                      f"({total} bytes so far from {compressed}): a bomb")
        yield name, _Member(name, member.size, member.offset)


def _plan(path: Path, scan: Iterator, limits: Limits, taken: set[str]) -> tuple[list[_Member], list[str]]:
    """The members to write and the names skipped, or a refusal: every check before any write."""
    writes, skipped, seen, total = [], [], {}, 0
    for name, member in scan:
        why = name_problem(name)
        if why:
            raise _refuse(path, name, why)
        key = name.replace("\\", "/").rstrip("/").casefold()
        if key in seen:
            raise _refuse(path, name, f"a duplicate of {seen[key]!r} (names differing only in case clash on "
                                      "Windows and macOS)")
        seen[key] = name
        if member is None:
            continue
        total += member.size
        if total > limits.max_bytes:
            raise _refuse(path, name, f"more than {limits.max_bytes} bytes uncompressed in all")
        base = re.split(r"[\\/]", name)[-1]
        parts = re.split(r"[\\/]", name)
        if dataset_kind(base) is None or any(part.startswith(".") or part == "__MACOSX" for part in parts[:-1]):
            skipped.append(name)
            continue
        if base.casefold() in taken:
            raise _refuse(path, name, f"{base!r} is already taken (in the dataset or by another member; "
                                      "the archive's folders are flattened)")
        taken.add(base.casefold())
        member.name = base
        writes.append(member)
    return writes, skipped


def _copy(source, target: Path, size: int) -> None:
    written = 0
    with open(target, "xb") as sink:
        while chunk := source.read(_CHUNK):
            written += len(chunk)
            if written > size:
                raise UserError(f"{target.name}: more data than the archive declares")
            sink.write(chunk)


def extract(archive_path, destination, limits: Limits = Limits()) -> Summary:
    """Unpack the dataset files of archive_path into the folder destination (made if missing); see the module."""
    path, destination = Path(archive_path), Path(destination)
    lower = path.name.lower()
    taken = {name.casefold() for name in os.listdir(destination)} if destination.is_dir() else set()
    staging = destination.parent / f".{destination.name}.extract-{uuid.uuid4().hex}"
    summary = Summary()
    try:
        if lower.endswith(ZIP_SUFFIXES):
            try:
                archive = zipfile.ZipFile(path)
            except (zipfile.BadZipFile, OSError, UnicodeDecodeError, ValueError) as error:
                # a name flagged as UTF-8 that is not fails here, before its member can be named
                raise UserError(f"{path.name}: not a readable zip archive ({_one_line(error)})") from None
            with archive:
                writes, summary.skipped = _plan(path, _scan_zip(path, archive, limits), limits, taken)
                destination.parent.mkdir(parents=True, exist_ok=True)
                staging.mkdir()
                for member in writes:
                    try:
                        with archive.open(member.handle) as source:
                            _copy(source, staging / member.name, member.size)
                    except (zipfile.BadZipFile, EOFError, ValueError, NotImplementedError) as error:
                        raise UserError(f"{path.name}: member {member.name!r} cannot be read "
                                        f"({_one_line(error)})") from None
                    summary.extracted.append(member.name)
        elif lower.endswith(TAR_SUFFIXES):
            try:
                with tarfile.open(path, "r:*", encoding="utf-8", errors="surrogateescape") as archive:
                    writes, summary.skipped = _plan(path, _scan_tar(path, archive, limits), limits, taken)
                by_offset = {member.handle: member for member in writes}
                destination.parent.mkdir(parents=True, exist_ok=True)
                staging.mkdir()
                # A second pass in stream order: seeking back in a compressed stream means decompressing it again.
                with tarfile.open(path, "r:*", encoding="utf-8", errors="surrogateescape") as archive:
                    for entry in archive:
                        member = by_offset.get(entry.offset)
                        if member is not None:
                            with archive.extractfile(entry) as source:
                                _copy(source, staging / member.name, member.size)
                            summary.extracted.append(member.name)
            except (tarfile.TarError, EOFError, OSError) as error:
                raise UserError(f"{path.name}: not a readable tar archive ({_one_line(error)})") from None
        else:
            raise UserError(f"{path.name}: not an archive (expected {', '.join(ARCHIVE_SUFFIXES)})")
        if staging.is_dir():
            if destination.is_dir():
                for name in summary.extracted:
                    os.rename(staging / name, destination / name)
            else:
                destination.parent.mkdir(parents=True, exist_ok=True)
                os.rename(staging, destination)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary
