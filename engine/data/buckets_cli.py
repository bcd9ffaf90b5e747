"""`python -m engine buckets`: which bucket each instance image of a config goes to, and what is skipped.

bucket_report is the same information for the app, with a sample of each bucket's images and their crop
boxes. It works on the scan's columns, so that a dataset of a million images costs arrays of a million
numbers rather than a million Python objects.
"""
from __future__ import annotations

import json
from typing import Optional

import numpy as np

from .. import notices, paths
from .buckets import bucket_sizes, crop_box, plan_buckets
from ..config import Config, add_overrides_argument
from .controls import found_controls
from .masks import concept_masks
from .shards import shard_paths
from .sources import scan_images

# As many images of a bucket as the app's Dataset tab shows, and skipped images as its table lists.
SAMPLE_PER_BUCKET = 48
SKIPPED_LISTED = 1000


def spread(count: int, sample: int) -> np.ndarray:
    """`sample` positions of 0..count-1 spaced evenly from the first to the last; all of them when there
    are no more than `sample`. The same positions every time, so that a preview shows the same images."""
    if count <= sample:
        return np.arange(count)
    return np.linspace(0, count - 1, sample).round().astype(np.int64)


def bucket_report(config: Config, sample: int = SAMPLE_PER_BUCKET,
                  skipped_limit: Optional[int] = SKIPPED_LISTED) -> dict:
    """Every bucket of the config (empty ones too) with how many instance images of all concepts it
    receives and up to `sample` of them, spread over the bucket (see spread).

    {"buckets": [{"width", "height", "count", "images": [{"path", "width", "height", "crop"}]}],
     "skipped": [{"path", "reason"}], "skipped_count", "shards"}. A bucket's images are in concept, then
    scan order; "count" counts them all. Image sizes are upright (EXIF orientation applied); "crop" is the
    centre crop [left, top, right, bottom] in those pixels. With masked_loss on, each listed image also has
    its "mask" file (or None); an image with control images (an edit model's pairs, see controls) has their
    "controls" paths. "skipped" lists the first skipped_limit skipped images (all with None) and
    "skipped_count" counts them all; skipped images are also reported as notices. "shards" is the number of
    WebDataset shards the concepts read, 0 for folders of image files.
    """
    found, shards = [], 0
    for index, concept in enumerate(config.data.concepts):
        path = paths.resolve(concept.instance_set.path)
        label = f"config key 'data.concepts[{index}].instance_set.path'"
        # Captions do not affect buckets: an empty prompt keeps the scan from reading them.
        found.append(scan_images(path, "", label))
        # The scan has accepted the path, so this only counts its shards: a listing that stops at the first
        # image of a folder of image files.
        shards += len(shard_paths(path, label) or [])
    sizes = bucket_sizes(config)
    # An image's bucket depends on its own size alone, so each concept is planned apart: their records
    # stay lazy column views instead of one list of every record.
    plans = [plan_buckets(config, scan.records, sizes=sizes) for scan in found]
    skipped = [item for scan in found for item in scan.skipped] + [item for plan in plans for item in plan.skipped]
    assignments = np.concatenate([np.asarray(plan.assignments, dtype=np.int64) for plan in plans]
                                 or [np.zeros(0, dtype=np.int64)])
    counts = np.bincount(assignments, minlength=len(sizes))
    # Positions in `assignments` grouped by bucket, each group in concept then scan order.
    by_bucket = np.argsort(assignments, kind="stable")
    bucket_starts = np.concatenate([[0], np.cumsum(counts)])
    concept_starts = np.cumsum([0] + [len(plan.kept) for plan in plans])
    buckets, listed = [], [[] for _ in plans]
    for bucket_index, ((width, height), count) in enumerate(zip(sizes, counts.tolist())):
        bucket = {"width": width, "height": height, "count": count, "images": []}
        buckets.append(bucket)
        for position in by_bucket[bucket_starts[bucket_index] + spread(count, sample)].tolist():
            concept = int(np.searchsorted(concept_starts, position, side="right")) - 1
            record = plans[concept].kept[position - int(concept_starts[concept])]
            entry = {"path": record.path, "width": record.width, "height": record.height,
                     "crop": list(crop_box((record.width, record.height), (width, height)))}
            bucket["images"].append(entry)
            listed[concept].append((record, entry))
    if config.masked_loss.enabled:
        # Masks are looked up for the listed images only; training looks them up for all (prepare_data).
        for index, (concept, entries) in enumerate(zip(config.data.concepts, listed)):
            masks = concept_masks(concept.instance_set, index, [record for record, _ in entries])
            for record, entry in entries:
                entry["mask"] = masks.get(record.path)
    # An edit model's pairs: the listed images' control images, where they have them.
    for concept, entries in zip(config.data.concepts, listed):
        controls = found_controls(concept.instance_set, [record for record, _ in entries])
        for record, entry in entries:
            if record.path in controls:
                entry["controls"] = list(controls[record.path])
    return {"buckets": buckets,
            "skipped": [{"path": path, "reason": reason} for path, reason in skipped[:skipped_limit]],
            "skipped_count": len(skipped), "shards": shards}


def format_table(report: dict) -> str:
    lines = [f"{'bucket':>11}  {'aspect':>6}  {'images':>6}"]
    for bucket in report["buckets"]:
        size = f"{bucket['width']}x{bucket['height']}"
        lines.append(f"{size:>11}  {bucket['width'] / bucket['height']:>6.2f}  {bucket['count']:>6}")
    total = sum(bucket["count"] for bucket in report["buckets"])
    lines.append(f"{len(report['buckets'])} buckets, {total} images, {report['skipped_count']} skipped")
    lines += [f"skipped {item['path']}: {item['reason']}" for item in report["skipped"]]
    return "\n".join(lines)


def cmd_buckets(args) -> int:
    from ..config import load

    config = load(args.config, args.set)
    # The command lists every skipped image with its reason; the notices would say it twice. Neither
    # output shows images, so none are sampled.
    with notices.collect(lambda message: None):
        report = bucket_report(config, sample=0, skipped_limit=None)
    if args.json:
        print(json.dumps({"buckets": [{key: bucket[key] for key in ("width", "height", "count")}
                                      for bucket in report["buckets"]],
                          "skipped": report["skipped"]}, ensure_ascii=False))
    else:
        print(format_table(report))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("buckets", help="show the aspect-ratio buckets of a config's images")
    parser.add_argument("--config", required=True, help="YAML config file")
    add_overrides_argument(parser, "aspect_ratio_bucket.enabled=true")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=cmd_buckets)
