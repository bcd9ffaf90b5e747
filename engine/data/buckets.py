"""Target sizes for training images: aspect-ratio buckets and the bucket of each image.

With bucketing off there is one size, resolution x resolution. With it on, the sizes follow NovelAI's
scheme: sides on a grid from min_side to max_side in steps of `step`; for each width the tallest height
whose area stays within max_area, then the same with the axes swapped; the base size is always present.
An image goes to the bucket whose aspect ratio is nearest in log space (so 2:1 and 1:2 are equally far
from 1:1) and is skipped when even that one is max_aspect_error or more away. With bucketing off the
same limit applies, from the buckets the grid would have: an image bucketing would skip is not cropped
to one square instead (a 64x80000 strip would be decoded whole for a sliver of it). Every size is a
multiple of 8, the VAE's downsampling factor, so each bucket has a whole latent size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .. import notices
from ..config import Config, ConfigError
from .index import DataWarning, ImageRecord
from .records import LazyRecords

LATENT_FACTOR = 8
# An image this many times smaller than the smallest bucket side would be upscaled into mush.
MAX_UPSCALE = 8


@dataclass(frozen=True)
class BucketGrid:
    base: tuple[int, int]
    max_area: int
    min_side: int
    max_side: int
    step: int


@dataclass
class BucketPlan:
    sizes: list[tuple[int, int]]                 # (width, height) of each bucket
    assignments: list[int]                       # bucket index of each kept record
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    kept: Sequence[ImageRecord] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)  # position of each kept record in the input


def _floor8(value: float) -> int:
    return int(value) // LATENT_FACTOR * LATENT_FACTOR


def _ceil8(value: float) -> int:
    return math.ceil(value / LATENT_FACTOR) * LATENT_FACTOR


def _require_multiple_of_8(key: str, values: Sequence) -> None:
    if not all(isinstance(v, int) and v > 0 and v % LATENT_FACTOR == 0 for v in values):
        raise ConfigError(f"config key '{key}': expected positive multiples of 8, got {list(values)}")


def bucket_grid(config: Config) -> BucketGrid:
    """The grid parameters: derived from data.resolution, or aspect_ratio_bucket.manual as given."""
    arb = config.aspect_ratio_bucket
    manual = arb.manual
    if manual is not None:
        prefix = "aspect_ratio_bucket.manual"
        base = manual.base_res
        base = (base, base) if isinstance(base, int) else tuple(base)
        if len(base) != 2:
            raise ConfigError(f"config key '{prefix}.base_res': expected a side or [width, height], got {base}")
        _require_multiple_of_8(f"{prefix}.base_res", base)
        if len(manual.dim_range) != 2 or manual.dim_range[0] > manual.dim_range[1]:
            raise ConfigError(f"config key '{prefix}.dim_range': expected [min side, max side], "
                              f"got {manual.dim_range}")
        _require_multiple_of_8(f"{prefix}.dim_range", manual.dim_range)
        _require_multiple_of_8(f"{prefix}.divisor", [manual.divisor])
        return BucketGrid(base, manual.max_size, manual.dim_range[0], manual.dim_range[1], manual.divisor)
    # c_size, c_dim, c_div and manual.max_size are in range: the config's schema checked them at load
    resolution = config.data.resolution
    return BucketGrid(base=(resolution, resolution), max_area=int(resolution * resolution * arb.c_size),
                      min_side=_ceil8(resolution / arb.c_dim), max_side=_floor8(resolution * arb.c_dim),
                      step=max(LATENT_FACTOR, _floor8(resolution / arb.c_div)))


def generate_buckets(grid: BucketGrid) -> list[tuple[int, int]]:
    """All bucket sizes of a grid, ordered by aspect ratio (then area)."""
    sides = range(grid.min_side, grid.max_side + 1, grid.step)
    sizes = {grid.base, grid.base[::-1]}
    for width in sides:
        heights = [h for h in sides if width * h <= grid.max_area]
        if heights:
            sizes.add((width, heights[-1]))
            sizes.add((heights[-1], width))
    return sorted(sizes, key=lambda s: (s[0] / s[1], s[0] * s[1]))


def bucket_sizes(config: Config) -> list[tuple[int, int]]:
    if not config.aspect_ratio_bucket.enabled:
        return [(config.data.resolution, config.data.resolution)]
    return generate_buckets(bucket_grid(config))


def assign(sizes: Sequence[tuple[int, int]], widths, heights) -> tuple[np.ndarray, np.ndarray]:
    """(bucket index, log-aspect error) of each image: the nearest aspect, the larger bucket on ties."""
    bucket_log = np.log([w / h for w, h in sizes])
    # argmin keeps the first of equal errors: order candidates by area, largest first.
    order = np.argsort([-(w * h) for w, h in sizes], kind="stable")
    image_log = np.log(np.asarray(widths, dtype=np.float64) / np.asarray(heights, dtype=np.float64))
    buckets = np.empty(len(image_log), dtype=np.int64)
    best_errors = np.empty(len(image_log))
    for begin in range(0, len(image_log), 16384):  # bounds the images x buckets matrix
        errors = np.abs(image_log[begin:begin + 16384, None] - bucket_log[order][None, :])
        best = errors.argmin(axis=1)
        buckets[begin:begin + len(best)] = order[best]
        best_errors[begin:begin + len(best)] = errors[np.arange(len(best)), best]
    return buckets, best_errors


def plan_buckets(config: Config, records: Sequence[ImageRecord],
                 sizes: Optional[Sequence[tuple[int, int]]] = None) -> BucketPlan:
    """Each record's bucket; `sizes` reuses another plan's buckets (class images follow the instances').

    The rule runs on whole width and height columns; only skipped images are looked at one by one.
    Lazy records (a scan's, see records) stay lazy: plan.kept is then a lazy selection of them.
    """
    sizes = list(sizes) if sizes is not None else bucket_sizes(config)
    plan = BucketPlan(sizes=sizes, assignments=[])
    if not len(records):
        return plan
    widths, heights = _sides(records)
    max_error = config.aspect_ratio_bucket.max_aspect_error
    if config.aspect_ratio_bucket.enabled:
        buckets, errors = assign(sizes, widths, heights)
        too_far = errors >= max_error
    else:
        buckets, errors = np.zeros(len(records), dtype=np.int64), np.zeros(len(records))
        grid = generate_buckets(bucket_grid(config))
        widest = max(abs(math.log(w / h)) for w, h in grid)
        too_far = np.abs(np.log(widths / heights)) >= widest + max_error
    smallest_side = min(min(s) for s in sizes)
    too_small = np.minimum(widths, heights) * MAX_UPSCALE < smallest_side
    too_far &= ~too_small
    for index in np.flatnonzero(too_small | too_far).tolist():
        record = records[index]
        if too_small[index]:
            reason = (f"too small to train: {record.width}x{record.height} px; the shorter side must be at "
                      f"least {math.ceil(smallest_side / MAX_UPSCALE)} px (1/{MAX_UPSCALE} of the smallest "
                      f"bucket side, {smallest_side} px)")
        elif config.aspect_ratio_bucket.enabled:
            width, height = sizes[buckets[index]]
            reason = (f"aspect ratio {record.width}x{record.height} is too far from every bucket: the nearest, "
                      f"{width}x{height}, has a log-aspect error of {errors[index]:.2f} "
                      f"(aspect_ratio_bucket.max_aspect_error is {max_error})")
        else:
            reason = (f"aspect ratio {record.width}x{record.height} is beyond the limit bucketing has: a log-aspect "
                      f"of {abs(math.log(record.width / record.height)):.2f}, at least the "
                      f"{widest:.2f} of its most elongated bucket plus aspect_ratio_bucket.max_aspect_error "
                      f"({max_error})")
        notices.warn(f"skipping {record.path}: {reason}", DataWarning)
        plan.skipped.append((record.path, reason))
    kept = np.flatnonzero(~(too_small | too_far))
    plan.indices = kept.tolist()
    plan.assignments = buckets[kept].tolist()
    plan.kept = records.take(kept) if isinstance(records, LazyRecords) else [records[i] for i in plan.indices]
    return plan


def _sides(records: Sequence[ImageRecord]) -> tuple[np.ndarray, np.ndarray]:
    """The (widths, heights) columns of the records, as int64 so that no product overflows."""
    if isinstance(records, LazyRecords):
        return records.widths.astype(np.int64), records.heights.astype(np.int64)
    count = len(records)
    return (np.fromiter((r.width for r in records), dtype=np.int64, count=count),
            np.fromiter((r.height for r in records), dtype=np.int64, count=count))


def cover_resize(image_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[float, int, int]:
    """(scale, width, height) of the image resized, keeping its aspect, to just cover the bucket."""
    width, height = image_size
    bucket_w, bucket_h = bucket
    scale = max(bucket_w / width, bucket_h / height)
    return scale, max(bucket_w, round(width * scale)), max(bucket_h, round(height * scale))


def crop_box(image_size: tuple[int, int], bucket: tuple[int, int]) -> tuple[int, int, int, int]:
    """The centre crop (left, top, right, bottom) that data.crop_to_size takes, in original-image pixels."""
    bucket_w, bucket_h = bucket
    scale, resized_w, resized_h = cover_resize(image_size, bucket)
    left, top = (resized_w - bucket_w) // 2, (resized_h - bucket_h) // 2
    return (round(left / scale), round(top / scale), round((left + bucket_w) / scale),
            round((top + bucket_h) / scale))
