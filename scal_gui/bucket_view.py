"""The Dataset tab's view of engine.data.buckets_cli.bucket_report: table, chart, skipped images, thumbnails.

The report holds every bucket's count but only a sample of its images and the first of the skipped ones,
so that what the page keeps per preview stays small however large the dataset is.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .thumbnails import beside, draw_crop

MAX_THUMBNAILS = 48  # per bucket, spread over its images
MAX_SKIPPED_ROWS = 1000
TABLE_COLUMNS = ("bucket", "width", "height", "aspect", "images")
SKIPPED_COLUMNS = ("image", "reason")


def report(config) -> dict:
    from engine.data.buckets_cli import bucket_report  # the image scan pulls in PIL: loaded on first use

    return bucket_report(config, sample=MAX_THUMBNAILS, skipped_limit=MAX_SKIPPED_ROWS)


def bucket_label(bucket: dict) -> str:
    return f"{bucket['width']}×{bucket['height']}"


def table(result: dict) -> pd.DataFrame:
    rows = [[bucket_label(b), b["width"], b["height"], round(b["width"] / b["height"], 3), b["count"]]
            for b in result["buckets"]]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def chart(result: dict) -> pd.DataFrame:
    return pd.DataFrame({"bucket": [bucket_label(b) for b in result["buckets"]],
                         "images": [b["count"] for b in result["buckets"]]})


def summary(result: dict) -> str:
    """One line: images, buckets used, skipped images (and how many the table lists), shards read."""
    total = sum(b["count"] for b in result["buckets"])
    used = sum(1 for b in result["buckets"] if b["count"])
    shards = f" from {result['shards']:,} shards" if result["shards"] else ""
    skipped_count, listed = result["skipped_count"], len(result["skipped"])
    shown = f" (first {listed:,} shown)" if listed < skipped_count else ""
    line = f"{total:,} images{shards} in {used} of {len(result['buckets'])} buckets, {skipped_count:,} skipped{shown}."
    if any(b["count"] > len(b["images"]) for b in result["buckets"]):
        line += (f" A bucket of more than {MAX_THUMBNAILS} images shows {MAX_THUMBNAILS} of them, spaced evenly "
                 "from its first to its last.")
    return line


def skipped(result: dict) -> pd.DataFrame:
    return pd.DataFrame([[s["path"], s["reason"]] for s in result["skipped"]], columns=list(SKIPPED_COLUMNS))


def thumbnails(result: dict, label: str, out_dir: Path) -> list[tuple[str, str]]:
    """(thumbnail path, caption) for the listed images of the bucket with that label, the crop drawn on each;
    an image with control images (an edit model's pairs) shows them to its left."""
    for bucket in result["buckets"]:
        if bucket_label(bucket) == label:
            return [_thumbnail(image, out_dir) for image in bucket["images"]]
    return []


def _thumbnail(image: dict, out_dir: Path) -> tuple[str, str]:
    thumb = draw_crop(image["path"], image["crop"], out_dir, mask=image.get("mask"))
    name = Path(image["path"]).name
    if image.get("controls"):
        return str(beside(image["controls"], thumb, out_dir)), f"{name} (control → target)"
    return str(thumb), name
