"""`python -m engine buckets`: which bucket each instance image of a config goes to, and what is skipped.

bucket_report is the same information for the app, with each bucket's images and their crop boxes.
"""
from __future__ import annotations

import json

from .. import notices, paths
from .buckets import crop_box, plan_buckets
from ..config import Config
from .masks import concept_masks
from .sources import scan_images


def bucket_report(config: Config) -> dict:
    """Every bucket of the config (empty ones too) with the instance images of all concepts it receives.

    {"buckets": [{"width", "height", "count", "images": [{"path", "width", "height", "crop"}]}],
     "skipped": [{"path", "reason"}]}. Image sizes are upright (EXIF orientation applied); "crop" is the
    centre crop [left, top, right, bottom] in those pixels. With masked_loss on, each image also has its
    "mask" file (or None). Skipped images are also reported as notices.
    """
    records, skipped, masks = [], [], {}
    for index, concept in enumerate(config.data.concepts):
        # Captions do not affect buckets: an empty prompt keeps the scan from reading them.
        found = scan_images(paths.resolve(concept.instance_set.path), "",
                            f"config key 'data.concepts[{index}].instance_set.path'")
        records += found.records
        skipped += found.skipped
        if config.masked_loss.enabled:
            masks.update(concept_masks(concept.instance_set, index, found.records))
    plan = plan_buckets(config, records)
    buckets = [{"width": w, "height": h, "count": 0, "images": []} for w, h in plan.sizes]
    for record, index in zip(plan.kept, plan.assignments):
        bucket = buckets[index]
        bucket["count"] += 1
        bucket["images"].append({"path": record.path, "width": record.width, "height": record.height,
                                 "crop": list(crop_box((record.width, record.height),
                                                       (bucket["width"], bucket["height"])))})
        if config.masked_loss.enabled:
            bucket["images"][-1]["mask"] = masks.get(record.path)
    return {"buckets": buckets,
            "skipped": [{"path": path, "reason": reason} for path, reason in skipped + plan.skipped]}


def format_table(report: dict) -> str:
    lines = [f"{'bucket':>11}  {'aspect':>6}  {'images':>6}"]
    for bucket in report["buckets"]:
        size = f"{bucket['width']}x{bucket['height']}"
        lines.append(f"{size:>11}  {bucket['width'] / bucket['height']:>6.2f}  {bucket['count']:>6}")
    total = sum(bucket["count"] for bucket in report["buckets"])
    lines.append(f"{len(report['buckets'])} buckets, {total} images, {len(report['skipped'])} skipped")
    lines += [f"skipped {item['path']}: {item['reason']}" for item in report["skipped"]]
    return "\n".join(lines)


def cmd_buckets(args) -> int:
    from ..config import load

    config = load(args.config, args.set)
    # The report lists every skipped image with its reason; the notices would say it twice.
    with notices.collect(lambda message: None):
        report = bucket_report(config)
    if args.json:
        for bucket in report["buckets"]:
            del bucket["images"]
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_table(report))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser("buckets", help="show the aspect-ratio buckets of a config's images")
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set aspect_ratio_bucket.enabled=true (repeatable)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.set_defaults(func=cmd_buckets)
