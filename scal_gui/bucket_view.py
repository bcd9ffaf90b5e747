"""The Dataset tab's view of engine.data.buckets_cli.bucket_report: table, chart, skipped images, thumbnails."""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from .thumbnails import draw_crop

MAX_THUMBNAILS = 48
TABLE_COLUMNS = ("bucket", "width", "height", "aspect", "images")
SKIPPED_COLUMNS = ("image", "reason")


def report(config) -> dict:
    from engine.data.buckets_cli import bucket_report  # the image scan pulls in PIL: loaded on first use

    return bucket_report(config)


def bucket_label(bucket: dict) -> str:
    return f"{bucket['width']}×{bucket['height']}"


def table(result: dict) -> pd.DataFrame:
    rows = [[bucket_label(b), b["width"], b["height"], round(b["width"] / b["height"], 3), b["count"]]
            for b in result["buckets"]]
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def chart(result: dict) -> pd.DataFrame:
    return pd.DataFrame({"bucket": [bucket_label(b) for b in result["buckets"]],
                         "images": [b["count"] for b in result["buckets"]]})


def skipped(result: dict) -> pd.DataFrame:
    return pd.DataFrame([[s["path"], s["reason"]] for s in result["skipped"]], columns=list(SKIPPED_COLUMNS))


def thumbnails(result: dict, label: str, out_dir: Path) -> list[tuple[str, str]]:
    """(thumbnail path, caption) for the images of the bucket with that label, the crop drawn on each."""
    for bucket in result["buckets"]:
        if bucket_label(bucket) == label:
            return [(str(draw_crop(image["path"], image["crop"], out_dir, mask=image.get("mask"))),
                     Path(image["path"]).name) for image in bucket["images"][:MAX_THUMBNAILS]]
    return []
