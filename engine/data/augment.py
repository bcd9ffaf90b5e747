"""Per-sample augmentations of images and tag captions, driven by a per-sample random generator."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

from ..config import AugmentStep, Captions


def process_caption(caption: str, options: Optional[Captions], rng: np.random.Generator) -> str:
    """Shuffle and drop comma-separated tags; the first keep_tokens tags stay where they are."""
    if options is None or not (options.shuffle_tags or options.tag_dropout > 0) or "," not in caption:
        return caption
    tags = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = tags[:options.keep_tokens], tags[options.keep_tokens:]
    if options.tag_dropout > 0:
        rest = [t for t in rest if rng.random() >= options.tag_dropout]
    if options.shuffle_tags:
        rest = [rest[i] for i in rng.permutation(len(rest))]
    return ", ".join(kept + rest)


def largest_rotated_rect(width: int, height: int, angle_rad: float) -> tuple[float, float]:
    """Size of the largest axis-aligned rectangle inside a width x height image rotated by angle_rad."""
    if width <= 0 or height <= 0:
        return 0.0, 0.0
    long_side, short_side = max(width, height), min(width, height)
    sin_a, cos_a = abs(math.sin(angle_rad)), abs(math.cos(angle_rad))
    if short_side <= 2.0 * sin_a * cos_a * long_side or abs(sin_a - cos_a) < 1e-10:
        # Half-constrained: two corners of the rectangle touch the longer side.
        x = 0.5 * short_side
        w, h = (x / sin_a, x / cos_a) if width >= height else (x / cos_a, x / sin_a)
    else:
        cos_2a = cos_a * cos_a - sin_a * sin_a
        w = (width * cos_a - height * sin_a) / cos_2a
        h = (height * cos_a - width * sin_a) / cos_2a
    return w, h


def rotate_and_crop(image, degrees: float):
    """Rotate, then crop the borders away so no empty corner reaches the training crop."""
    if abs(degrees) < 1e-6:
        return image
    from PIL import Image

    rotated = image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=False)
    w, h = largest_rotated_rect(image.width, image.height, math.radians(degrees))
    w, h = int(w), int(h)
    left, top = (image.width - w) // 2, (image.height - h) // 2
    return rotated.crop((left, top, left + w, top + h))


def augment_before_crop(image, steps: Sequence[AugmentStep], rng: np.random.Generator, mask=None) -> tuple:
    """(image, mask): geometric steps that change the framing run before the bucket crop. The image's loss
    mask (or None) turns with it, by the same draw."""
    for step in steps:
        if step.name == "rotate" and rng.random() < step.p:
            degrees = float(rng.uniform(-step.degrees, step.degrees))
            image = rotate_and_crop(image, degrees)
            mask = rotate_and_crop(mask, degrees) if mask is not None else None
    return image, mask


def augment_after_crop(image, steps: Sequence[AugmentStep], rng: np.random.Generator, mask=None) -> tuple:
    """(image, mask, mirrored): steps that keep the bucket size, flips and colour; the mask (or None) flips
    with the image and keeps its values. mirrored: whether the image ends up mirrored left to right."""
    from PIL import ImageEnhance, ImageOps

    mirrored = False
    for step in steps:
        if step.name == "hflip" and rng.random() < step.p:
            image = ImageOps.mirror(image)
            mask = ImageOps.mirror(mask) if mask is not None else None
            mirrored = not mirrored
        elif step.name == "color_jitter" and rng.random() < step.p:
            for enhancer, amount in ((ImageEnhance.Brightness, step.brightness),
                                     (ImageEnhance.Contrast, step.contrast),
                                     (ImageEnhance.Color, step.saturation)):
                if amount > 0:
                    image = enhancer(image).enhance(float(rng.uniform(1 - amount, 1 + amount)))
    return image, mask, mirrored
