"""Benchmark of the Dataset tab's bucket report on large folders: time, peak RSS and size of the report.

    python bench/dataset_tab.py --counts 100000            # 100k images
    python bench/dataset_tab.py --counts 100000 1000000    # and 1M (several minutes)

Builds the synthetic folders of bench/dataset_index.py (the same images, one temporary folder grown from
count to count, deleted at the end) and indexes each once. Then, each in its own process so that its peak
RSS is its own:

- the re-open of the folder alone (scan_folder on the unchanged folder): the floor of any report;
- "dataset tab report": bucket_report as the tab calls it (48 images per bucket, the first 1000 skipped
  images listed) on the re-opened folder, at resolution 64 with aspect-ratio buckets. A max_aspect_error
  of 0.1 (default 0.5) skips the images whose aspect falls between buckets, about a tenth of them, so that
  the report also has many more skipped images than it lists.

Peak RSS is printed with the RSS after the imports, since importing the engine (torch) is most of it. The
report's size is that of its JSON, about what the page keeps per preview.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataset_index import _peak_rss_mb, make_images

ROOT = Path(__file__).resolve().parent.parent


def measure(folder: str, mode: str) -> dict:
    """Runs inside the child process: time one re-open or one report, after the imports."""
    sys.path.insert(0, str(ROOT))
    import warnings

    from engine import config as cfg, notices
    from engine.data.buckets_cli import bucket_report
    from engine.data.index import scan_folder

    config = cfg.load(base={"data": {"resolution": 64, "concepts": [{"instance_set": {"path": folder}}]},
                            "aspect_ratio_bucket": {"enabled": True, "max_aspect_error": 0.1},
                            "prior_preservation": {"enabled": False}})
    rss_imported = _peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    # Each skipped image is also a warning and a notice; neither is what is measured.
    with warnings.catch_warnings(), notices.collect(lambda message: None):
        warnings.simplefilter("ignore")
        if mode == "reopen":
            figures = {"images": len(scan_folder(folder, "").records)}
        else:
            report = bucket_report(config)
            figures = {"images": sum(b["count"] for b in report["buckets"]) + report["skipped_count"],
                       "skipped": report["skipped_count"], "listed": len(report["skipped"]),
                       "sampled": sum(len(b["images"]) for b in report["buckets"]),
                       "buckets_used": sum(1 for b in report["buckets"] if b["count"])}
    figures.update(seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start,
                   rss_imported_mb=rss_imported, peak_rss_mb=_peak_rss_mb())
    if mode == "report":
        figures["report_kb"] = len(json.dumps(report)) / 1024
    return figures


def _child(folder: Path, mode: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", str(folder), mode],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def run(counts: list[int], base: Path, repeat: int) -> list[dict]:
    folder = base / "images"
    rows, written = [], 0
    for count in sorted(counts):
        started = time.perf_counter()
        make_images(folder, written, count, captions=False)
        written = count
        _child(folder, "reopen")  # the first scan writes the index that the measured ones re-open
        print(f"wrote and indexed {count} images in {time.perf_counter() - started:.0f} s", flush=True)
        row = {"images": count, "load_average": os.getloadavg()[0]}
        # Alternating rounds, each figure the fastest: other work on a shared machine only adds time.
        for _ in range(repeat):
            for mode in ("reopen", "report"):
                found = _child(folder, mode)
                if found["images"] != count:
                    raise SystemExit(f"expected {count} images, got {found}")
                if mode not in row or found["seconds"] < row[mode]["seconds"]:
                    row[mode] = found
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    reopen, report = row["reopen"], row["report"]
    return (f"{row['images']:>7} images, load average {row['load_average']:.1f}-{row['load_after']:.1f}: "
            f"re-open {reopen['seconds']:.2f} s (CPU {reopen['cpu_seconds']:.2f} s, peak RSS "
            f"{reopen['peak_rss_mb']:.0f} MB); dataset tab report {report['seconds']:.2f} s (CPU "
            f"{report['cpu_seconds']:.2f} s, peak RSS {report['peak_rss_mb']:.0f} MB, "
            f"{report['rss_imported_mb']:.0f} MB after the imports), {report['buckets_used']} buckets used, "
            f"{report['sampled']} images sampled, {report['skipped']} skipped ({report['listed']} listed), "
            f"report {report['report_kb']:.0f} KB")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(*sys.argv[2:4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--repeat", type=int, default=1, help="rounds of measurements; each figure is the fastest")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    args = parser.parse_args()
    # The index falls back to the cache folder only when the dataset folder is read-only; keep it private.
    with tempfile.TemporaryDirectory(prefix="scal-bench-") as temp:
        os.environ["SCAL_SDT_CACHE"] = str(Path(temp) / "cache")
        rows = run(args.counts, Path(temp), args.repeat)
        print("deleting the images", flush=True)
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
