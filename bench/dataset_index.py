"""Benchmark of the dataset index: first index, re-open, refresh after a change, bucket assignment, data
preparation, memory.

    python bench/dataset_index.py                      # 100k, 300k and 1M images
    python bench/dataset_index.py --counts 10000 --captions
    python bench/dataset_index.py --repeat 2           # the fastest of two rounds of each figure

Writes small synthetic images of varied sizes and formats (a tenth of the JPEGs EXIF-rotated) to one
temporary folder, growing it from count to count, and deletes it at the end. Each measurement runs in
its own process, so that its peak RSS is its own:

- the floors, measured in the same run: a single-process loop reading each header with PIL and nothing
  else, and a bare os.scandir + stat loop (what any re-open must do to see changed files);
- the first index (no index file yet), the re-open, and plan_buckets over the re-opened records;
- the refresh: a re-open after one image was added and another rewritten with other sides (so a new
  size and mtime), which reads those two headers and writes the index again; the two files are put
  back as they were afterwards;
- prepare_data for a training config of the folder (one concept, bucketing on, with the tiny demo
  model's CLIP tokenizer): its scan (a re-open), bucket plan and dataset. Its process imports torch and
  transformers, so its RSS before the call is printed beside its peak.

The files are in the OS page cache after writing, so these are warm-cache figures. Wall and CPU time are
both printed: on a shared machine the wall time also counts waiting for a core. The first index's own
CPU time and its worker processes' (which read the files) are printed apart.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("webp", "WEBP"), ("bmp", "BMP"))
# Targets: first index against the bare PIL loop, re-open against the scandir + stat loop, the refresh
# after a change against the re-open.
FIRST_RATIO, REOPEN_RATIO, REFRESH_RATIO, PEAK_RSS_MB, BUCKET_SECONDS = 0.7, 1.5, 1.5, 300, 1.0
# The image the refresh measurement rewrites (the first one written: a PNG) and the one it adds.
CHANGED_IMAGE, ADDED_IMAGE = "img_0000000.png", "added.png"


def _variants(count: int, seed: int) -> list[tuple[str, bytes]]:
    from PIL import Image

    rng = random.Random(seed)
    variants = []
    for index in range(count):
        width, height = rng.randint(16, 96), rng.randint(16, 96)
        extension, fmt = FORMATS[index % len(FORMATS)]
        image = Image.new("RGB", (width, height), tuple(rng.randrange(256) for _ in range(3)))
        buffer = io.BytesIO()
        if fmt == "JPEG" and index % 10 == 1:
            exif = Image.Exif()
            exif[0x0112] = 6
            image.save(buffer, format=fmt, exif=exif)
        else:
            image.save(buffer, format=fmt)
        variants.append((extension, buffer.getvalue()))
    return variants


def _write_range(folder: Path, captions: bool, bounds: tuple[int, int]) -> None:
    variants = _variants(256, seed=0)
    for index in range(*bounds):
        extension, data = variants[index % len(variants)]
        with open(folder / f"img_{index:07d}.{extension}", "wb") as handle:
            handle.write(data)
        if captions:
            with open(folder / f"img_{index:07d}.txt", "w", encoding="utf-8") as handle:
                handle.write(f"caption number {index}")


def make_images(folder: Path, start: int, stop: int, captions: bool) -> None:
    """Add images start..stop-1 (cycling through a few hundred distinct encodings) with a process per
    core: writing a million small files is system-call bound, and is not what is measured."""
    folder.mkdir(parents=True, exist_ok=True)
    step = 20_000
    ranges = [(begin, min(begin + step, stop)) for begin in range(start, stop, step)]
    from functools import partial

    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        pool.map(partial(_write_range, folder, captions), ranges, chunksize=1)


def change_two_files(folder: Path) -> bytes:
    """Add one image and rewrite another with other sides; returns the rewritten file's bytes."""
    from PIL import Image

    original = (folder / CHANGED_IMAGE).read_bytes()
    Image.new("RGB", (40, 24), (10, 200, 30)).save(folder / ADDED_IMAGE)
    Image.new("RGB", (100, 20), (200, 10, 30)).save(folder / CHANGED_IMAGE)
    return original


def restore_two_files(folder: Path, original: bytes) -> None:
    (folder / ADDED_IMAGE).unlink()
    (folder / CHANGED_IMAGE).write_bytes(original)


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def _rss_mb() -> float:
    """The RSS now (Linux only: elsewhere the peak so far)."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _peak_rss_mb()


def _prepare_config(folder: str, template: str):
    from engine import config as cfg

    return cfg.load(base={"data": {"resolution": 64, "concepts": [{"instance_set": {"path": folder,
                                                                                    "prompt": template}}]},
                          "aspect_ratio_bucket": {"enabled": True}, "prior_preservation": {"enabled": False},
                          "num_workers": 0})


def measure(folder: str, mode: str, template: str, tokenizer_dir: str = "") -> dict:
    """Runs inside the child process: time one scan (or a floor loop) after the imports."""
    sys.path.insert(0, str(ROOT))
    import warnings

    from PIL import Image

    from engine import config as cfg, notices
    from engine.data.buckets import plan_buckets
    from engine.data.index import scan_folder

    figures = {}
    if mode == "buckets":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = scan_folder(folder, template).records
        config = cfg.load(base={"data": {"resolution": 64}, "aspect_ratio_bucket": {"enabled": True}})
    if mode == "prepare":
        from transformers import CLIPTokenizer

        from engine.data.prepare import prepare_data

        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
        config = _prepare_config(folder, template)
        figures["rss_before_mb"] = _rss_mb()
    blocks = sys.getallocatedblocks()
    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "pil":
        count = 0
        for entry in os.scandir(folder):
            if not entry.name.startswith(".") and not entry.name.endswith(".txt"):
                with Image.open(entry.path) as image:
                    count += image.size[0] > 0
    elif mode == "stat":
        for entry in os.scandir(folder):
            entry.stat()
    elif mode == "buckets":
        messages = []
        with notices.collect(messages.append):
            plan = plan_buckets(config, records)
        count = len(plan.kept) + len(plan.skipped)
        figures["bucket_skipped"] = len(plan.skipped)
    elif mode == "prepare":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            data = prepare_data(config, tokenizer, seed=0)
        count = len(data.dataset)
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = scan_folder(folder, template)
        count = len(result.records)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    reaped = os.times()  # the worker processes that read for the scan, ended by now
    figures["worker_cpu_seconds"] = reaped.children_user + reaped.children_system
    if mode == "stat":
        count = sum(not name.startswith(".") and not name.endswith(".txt") for name in os.listdir(folder))
    figures.update(seconds=seconds, cpu_seconds=cpu_seconds, images=count, peak_rss_mb=_peak_rss_mb(),
                   # Small Python objects still held after the scan, its result included: a few per
                   # folder, not per image.
                   blocks_kept=sys.getallocatedblocks() - blocks)
    return figures


def _child(folder: Path, mode: str, template: str, tokenizer_dir: Path) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", str(folder), mode, template, str(tokenizer_dir)],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output)


MEASUREMENTS = ("pil", "stat", "first", "reopen", "refresh", "buckets", "prepare")


def run(counts: list[int], captions: bool, base: Path, repeat: int) -> list[dict]:
    from engine.data.index import index_locations

    template = "photo, {TXT_PROMPT}" if captions else "photo"
    folder = base / "images"
    # In a process of its own, as the measurements are: it imports torch and diffusers.
    subprocess.run([sys.executable, "-m", "engine", "make-tiny-model", str(base / "tiny-model")], cwd=ROOT,
                   check=True, capture_output=True)
    tokenizer_dir = base / "tiny-model" / "tokenizer"
    rows, written = [], 0
    for count in sorted(counts):
        started = time.perf_counter()
        make_images(folder, written, count, captions)
        written = count
        print(f"wrote {count} images in {time.perf_counter() - started:.0f} s", flush=True)
        row = {"images": count, "captions": captions, "load_average": os.getloadavg()[0]}
        # Rounds of all measurements, keeping each one's fastest: other work on a shared machine only
        # ever adds time, and alternating spreads it over all of them.
        for _ in range(repeat):
            for location in index_locations(folder):
                location.unlink(missing_ok=True)
            for key in MEASUREMENTS:
                original = change_two_files(folder) if key == "refresh" else None
                found = _child(folder, key if key in ("pil", "stat", "buckets", "prepare") else "scan", template,
                               tokenizer_dir)
                if original is not None:
                    restore_two_files(folder, original)
                if found["images"] != count + (key == "refresh"):
                    raise SystemExit(f"{key}: expected {count} images, got {found}")
                if key not in row or found["seconds"] < row[key]["seconds"]:
                    row[key] = found
        row["load_after"] = os.getloadavg()[0]
        rows.append(row)
        print(_line(row), flush=True)
    return rows


def _line(row: dict) -> str:
    figures = ", ".join(f"{label} {row[key]['seconds']:.3f} s (CPU {row[key]['cpu_seconds']:.3f} s, "
                        f"workers' CPU {row[key]['worker_cpu_seconds']:.3f} s, peak RSS {row[key]['peak_rss_mb']:.0f} MB)"
                        for key, label in (("pil", "bare PIL loop"), ("stat", "scandir+stat loop"),
                                           ("first", "first index"), ("reopen", "re-open"),
                                           ("refresh", "re-open after 1 added + 1 changed"),
                                           ("buckets", "bucket assignment"), ("prepare", "prepare_data")))
    return (f"{row['images']:>7} images{' + captions' if row['captions'] else ''}, load average "
            f"{row['load_average']:.1f}-{row['load_after']:.1f}: {figures}; objects kept by re-open "
            f"{row['reopen']['blocks_kept']}, by prepare_data {row['prepare']['blocks_kept']}; prepare_data's RSS "
            f"before the call {row['prepare']['rss_before_mb']:.0f} MB")


def table(rows: list[dict]) -> str:
    lines = ["| images | load avg (before–after) | bare PIL loop (CPU) | scandir+stat loop | first index (ratio to PIL loop) | "
             "first index CPU (this process + workers) | re-open (ratio to scandir+stat) | re-open per image | "
             "re-open after 1 added + 1 changed (ratio to scandir+stat / to re-open) | "
             "bucket assignment | peak RSS (first / re-open / refresh) | objects kept by re-open | "
             "prepare_data (peak RSS; RSS before the call) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        first, reopen, refresh = row["first"]["seconds"], row["reopen"]["seconds"], row["refresh"]["seconds"]
        lines.append(
            f"| {row['images']:,}{' + captions' if row['captions'] else ''} | "
            f"{row['load_average']:.1f}–{row['load_after']:.1f} | "
            f"{row['pil']['seconds']:.2f} s ({row['pil']['cpu_seconds']:.2f} s) | {row['stat']['seconds']:.2f} s | "
            f"{first:.2f} s ({first / row['pil']['seconds']:.2f}x) | "
            f"{row['first']['cpu_seconds']:.2f} + {row['first']['worker_cpu_seconds']:.2f} s | "
            f"{reopen:.2f} s ({reopen / row['stat']['seconds']:.2f}x) | {reopen / row['images'] * 1e6:.2f} µs | "
            f"{refresh:.2f} s ({refresh / row['stat']['seconds']:.2f}x / {refresh / reopen:.2f}x) | "
            f"{row['buckets']['seconds']:.3f} s | "
            f"{row['first']['peak_rss_mb']:.0f} / {row['reopen']['peak_rss_mb']:.0f} / "
            f"{row['refresh']['peak_rss_mb']:.0f} MB | {row['reopen']['blocks_kept']} | "
            f"{row['prepare']['seconds']:.2f} s ({row['prepare']['peak_rss_mb']:.0f} MB; "
            f"{row['prepare']['rss_before_mb']:.0f} MB) |")
    return "\n".join(lines)


def verdicts(rows: list[dict]) -> list[str]:
    largest = max(rows, key=lambda row: row["images"])
    found = []
    for row in rows:
        first_ratio = row["first"]["seconds"] / row["pil"]["seconds"]
        reopen_ratio = row["reopen"]["seconds"] / row["stat"]["seconds"]
        refresh_ratio = row["refresh"]["seconds"] / row["reopen"]["seconds"]
        peak = max(row[key]["peak_rss_mb"] for key in ("first", "reopen", "refresh", "buckets"))
        found.append(f"{row['images']:,}: first index {first_ratio:.2f}x the PIL loop (target <= {FIRST_RATIO}), "
                     f"re-open {reopen_ratio:.2f}x the scandir+stat loop (<= {REOPEN_RATIO}), "
                     f"refresh after a change {refresh_ratio:.2f}x the re-open (<= {REFRESH_RATIO}), "
                     f"peak RSS {peak:.0f} MB (<= {PEAK_RSS_MB})")
    found.append(f"bucket assignment at {largest['images']:,}: {largest['buckets']['seconds']:.3f} s "
                 f"(<= {BUCKET_SECONDS} s; {largest['buckets']['bucket_skipped']} images skipped by the rule)")
    return found


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(*sys.argv[2:6])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 300_000, 1_000_000])
    parser.add_argument("--captions", action="store_true", help="a .txt caption per image, read via {TXT_PROMPT}")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of measurements; each figure is the fastest")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    # The index falls back to the cache folder only when the dataset folder is read-only; keep it private.
    with tempfile.TemporaryDirectory(prefix="scal-bench-") as temp:
        os.environ["SCAL_SDT_CACHE"] = str(Path(temp) / "cache")
        rows = run(args.counts, args.captions, Path(temp), args.repeat)
        print("deleting the images", flush=True)
    print(table(rows))
    print("\n".join(verdicts(rows)))
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
