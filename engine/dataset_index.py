"""Scanning dataset folders: image sizes from headers, captions, and the images that cannot be used."""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

from .data import IMAGE_EXTENSIONS, DataWarning, ImageRecord, resolve_prompt
from .errors import UserError


@dataclass
class ScanResult:
    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def _header_size(path: Path) -> tuple[int, int]:
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        width, height = image.size
        orientation = image.getexif().get(0x0112, 1)
    # EXIF orientations 5-8 rotate by 90 degrees: the upright image has its sides swapped.
    return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def scan_folder(folder: str, prompt_template: str, label: str = "folder") -> ScanResult:
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{label}: folder not found: {folder}")
    result = ScanResult()
    for path in sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        try:
            width, height = _header_size(path)
        except Exception as error:  # PIL raises many types for unreadable files
            reason = f"cannot read image: {error.__class__.__name__}: {error}"
            warnings.warn(f"skipping {path}: {reason}", DataWarning, stacklevel=2)
            result.skipped.append((str(path), reason))
            continue
        result.records.append(ImageRecord(str(path), width, height, resolve_prompt(prompt_template, path)))
    return result
