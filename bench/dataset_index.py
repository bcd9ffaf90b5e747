"""Benchmark of the dataset index: first scan, re-open of an unchanged folder, and peak memory.

    python bench/dataset_index.py                      # 10k and 100k images
    python bench/dataset_index.py --counts 10000 --captions

Writes N small synthetic images of varied sizes and formats (a tenth of the JPEGs EXIF-rotated) to a
temporary folder, then runs each measurement in its own process so that the peak RSS is the scan's
alone: a bare PIL header-read loop for reference, the first scan (no index yet) and the re-open. The
files are in the OS page cache after writing, so these are warm-cache figures. Wall and CPU time are
both printed: on a shared machine the wall time also counts waiting for a core.
"""
from __future__ import annotations

import argparse
import io
import json
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


def make_images(folder: Path, count: int, captions: bool, seed: int = 0) -> None:
    """Write `count` images cycling through a few hundred distinct encodings (writing is not measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    variants = _variants(256, seed)
    for index in range(count):
        extension, data = variants[index % len(variants)]
        (folder / f"img_{index:07d}.{extension}").write_bytes(data)
        if captions:
            (folder / f"img_{index:07d}.txt").write_text(f"caption number {index}", encoding="utf-8")


def _peak_rss_mb() -> float:
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    scale = 1 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def measure(folder: str, mode: str, template: str) -> dict:
    """Runs inside the child process: time one scan (or the bare loop) after the imports."""
    sys.path.insert(0, str(ROOT))
    import warnings

    from PIL import Image

    from engine.data.index import scan_folder

    start, cpu_start = time.perf_counter(), time.process_time()
    if mode == "bare":
        count = 0
        for entry in os.scandir(folder):
            if not entry.name.startswith(".") and not entry.name.endswith(".txt"):
                with Image.open(entry.path) as image:
                    count += image.size[0] > 0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            count = len(scan_folder(folder, template).records)
    return {"seconds": time.perf_counter() - start, "cpu_seconds": time.process_time() - cpu_start,
            "images": count, "peak_rss_mb": _peak_rss_mb()}


def _child(folder: Path, mode: str, template: str) -> dict:
    output = subprocess.run([sys.executable, __file__, "--child", str(folder), mode, template],
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output)


def run(counts: list[int], captions: bool, base: Path) -> list[dict]:
    template = "photo, {TXT_PROMPT}" if captions else "photo"
    rows = []
    for count in counts:
        folder = base / f"n{count}"
        make_images(folder, count, captions)
        from engine.data.index import index_locations

        for location in index_locations(folder):
            location.unlink(missing_ok=True)
        row = {"images": count, "captions": captions}
        row["bare"] = _child(folder, "bare", template)
        row["first"] = _child(folder, "scan", template)
        row["reopen"] = _child(folder, "scan", template)
        rows.append(row)
        if not row["bare"]["images"] == row["first"]["images"] == row["reopen"]["images"] == count:
            raise SystemExit(f"expected {count} images, got {row}")
        print(f"{count:>7} images{' + captions' if captions else ''}, load average {os.getloadavg()[0]:.1f}: "
              + ", ".join(f"{label} {row[key]['seconds']:.3f} s (CPU {row[key]['cpu_seconds']:.3f} s, "
                          f"peak RSS {row[key]['peak_rss_mb']:.0f} MB)"
                          for key, label in (("bare", "bare PIL loop"), ("first", "first scan"),
                                             ("reopen", "re-open"))), flush=True)
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        print(json.dumps(measure(*sys.argv[2:5])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--counts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--captions", action="store_true", help="a .txt caption per image, read via {TXT_PROMPT}")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON at the end")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    # The index falls back to the cache folder only when the dataset folder is read-only; keep it private.
    with tempfile.TemporaryDirectory(prefix="scal-bench-") as temp:
        os.environ["SCAL_SDT_CACHE"] = str(Path(temp) / "cache")
        rows = run(args.counts, args.captions, Path(temp))
    if args.json:
        print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
