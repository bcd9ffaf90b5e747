"""Thumbnails with the crop that training will use drawn on them."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Optional, Sequence

THUMB_SIDE = 192
SHADE = 110  # alpha of the veil over the parts that the crop cuts away
TINT = (230, 30, 60)  # blended over what a loss mask leaves out of the loss
PAIR_GAP, PAIR_GROUND = 4, (32, 32, 32)  # between an edit's control images and its target


def draw_crop(source: str, box: Sequence[float], out_dir: Path, side: int = THUMB_SIDE,
              mask: Optional[str] = None) -> Path:
    """A thumbnail of source with the area outside box (left, top, right, bottom in source pixels) veiled
    and the box outlined, and tinted where its loss mask (a file, or None) is black; written once per
    (file, box, mask) and reused. The source and mask may be shard members (see engine.data.shards)."""
    from PIL import Image, ImageDraw

    from engine.data.shards import file_stamp

    masked = file_stamp(mask) if mask else ""
    key = hashlib.sha1(f"{file_stamp(source)}:{list(box)}:{side}:{masked}".encode()).hexdigest()[:16]
    target = out_dir / f"{key}.png"
    if target.is_file():
        return target
    image, thumb, scale = _opened(source, side)
    if mask:
        from engine.data.masks import load_mask

        weights = load_mask(mask, source, image.size).resize(thumb.size)
        thumb = Image.composite(thumb, Image.blend(thumb, Image.new("RGB", thumb.size, TINT), 0.6), weights)
    left, top, right, bottom = (round(v * scale) for v in box)
    veil = Image.new("L", thumb.size, SHADE)
    ImageDraw.Draw(veil).rectangle((left, top, right - 1, bottom - 1), fill=0)
    thumb = Image.composite(Image.new("RGB", thumb.size, (0, 0, 0)), thumb, veil)
    # White inside black reads on any picture.
    draw = ImageDraw.Draw(thumb)
    draw.rectangle((left, top, right - 1, bottom - 1), outline=(0, 0, 0), width=3)
    draw.rectangle((left + 1, top + 1, right - 2, bottom - 2), outline=(255, 255, 255), width=1)
    out_dir.mkdir(parents=True, exist_ok=True)
    thumb.save(target)
    return target


def beside(controls: Sequence[str], thumb: Path, out_dir: Path, side: int = THUMB_SIDE) -> Path:
    """One picture of the control images' thumbnails, then `thumb` (their target's), left to right: an edit's
    pictures before and after. Written once per (controls, thumbnail) and reused."""
    from PIL import Image

    from engine.data.shards import file_stamp

    key = hashlib.sha1(f"{[file_stamp(path) for path in controls]}:{thumb.name}:{side}".encode()).hexdigest()[:16]
    target = out_dir / f"{key}.png"
    if target.is_file():
        return target
    parts = [_opened(path, side)[1] for path in controls]
    with Image.open(thumb) as after:
        parts.append(after.convert("RGB"))
    picture = Image.new("RGB", (sum(part.width for part in parts) + PAIR_GAP * (len(parts) - 1),
                                max(part.height for part in parts)), PAIR_GROUND)
    left = 0
    for part in parts:
        picture.paste(part, (left, (picture.height - part.height) // 2))
        left += part.width + PAIR_GAP
    out_dir.mkdir(parents=True, exist_ok=True)
    picture.save(target)
    return target


def plain(source: str, out_dir: Path, side: int = THUMB_SIDE) -> Path:
    """A thumbnail of the image file source, upright, at most side pixels on a side; written once per file
    (its path, size and mtime) and reused."""
    from engine.data.shards import file_stamp

    key = hashlib.sha1(f"{file_stamp(source)}:{side}".encode()).hexdigest()[:16]
    target = out_dir / f"{key}.png"
    if not target.is_file():
        out_dir.mkdir(parents=True, exist_ok=True)
        _opened(source, side)[1].save(target)
    return target


def _opened(source: str, side: int):
    """(the image upright in RGB, its thumbnail at most side pixels on a side, the thumbnail's scale)."""
    from PIL import Image, ImageOps

    from engine.data.shards import image_file

    with Image.open(image_file(source)) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
    scale = side / max(image.size)
    return image, image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale)))), scale
