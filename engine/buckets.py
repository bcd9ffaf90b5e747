"""Target sizes for training images. With aspect-ratio bucketing off there is one size, resolution^2."""
from __future__ import annotations

from dataclasses import dataclass, field

from .config import Config
from .data import ImageRecord


@dataclass
class BucketPlan:
    sizes: list[tuple[int, int]]                 # (width, height) of each bucket
    assignments: list[int]                       # bucket index of each record
    skipped: list[tuple[str, str]] = field(default_factory=list)
    kept: list[ImageRecord] = field(default_factory=list)


def plan_buckets(config: Config, records: list[ImageRecord], sizes=None) -> BucketPlan:
    resolution = config.data.resolution
    return BucketPlan(sizes=[(resolution, resolution)], assignments=[0] * len(records), kept=list(records))
