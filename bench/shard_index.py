"""Benchmark of WebDataset shards as a dataset source: indexing, re-opening, buckets, memory.

    python bench/shard_index.py                         # 100k and 1M samples in shards of 1000
    python bench/shard_index.py --counts 100000 --per-shard 500

Writes shards of small synthetic images (those of bench/dataset_index.py) each with a .txt caption to one
temporary folder, growing it from count to count, and deletes it at the end. Each measurement runs in
its own process, so that its peak RSS is its own:

- the floor: a single-process loop listing every shard's tar headers with tarfile, nothing else;
- the first index: every shard's sidecar written (image headers and captions read; worker processes
  once the shards hold more than engine.data.shards.POOL_MIN_BYTES);
- the re-open: scan_shards with {TXT_PROMPT} on the indexed shards, to records with their captions;
- plan_buckets over those records, and the Dataset tab's bucket report.

The shards are in the OS page cache after writing, so these are warm-cache figures.
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from functools import partial
from pathlib import Path

from dataset_index import _peak_rss_mb, _variants

ROOT = Path(__file__).resolve().parent.parent
MODES = ("floor", "first", "reopen", "buckets", "report")


def _write_shards(folder: Path, per_shard: int, shard_numbers: range) -> None:
    variants = _variants(256, seed=0)
    for number in shard_numbers:
        with tarfile.open(folder / f"{number:06d}.tar", "w") as tar:
            for index in range(number * per_shard, (number + 1) * per_shard):
                extension, data = variants[index % len(variants)]
                caption = f"caption number {index}".encode("utf-8")
                for name, payload in ((f"img_{index:07d}.{extension}", data), (f"img_{index:07d}.txt", caption)):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def make_shards(folder: Path, per_shard: int, first: int, stop: int) -> None:
    """Shards first..stop-1, a process per core (writing them is not what is measured)."""
    folder.mkdir(parents=True, exist_ok=True)
    groups = [range(begin, min(begin + 20, stop)) for begin in range(first, stop, 20)]
    with multiprocessing.get_context("spawn").Pool(os.cpu_count() or 1) as pool:
        pool.map(partial(_write_shards, folder, per_shard), groups, chunksize=1)


def measure(folder: str, mode: str) -> dict:
    """Runs inside the child process: time one mode after the imports."""
    sys.path.insert(0, str(ROOT))
    import warnings

    from engine import config as cfg, notices
    from engine.data.buckets import plan_buckets
    from engine.data.shards import index_shards, scan_shards, shard_paths

    if mode == "report":
        from engine.data.buckets_cli import bucket_report  # with the mask code it imports torch

    shards = shard_paths(folder, "shards")
    config = cfg.load(base={"data": {"resolution": 64, "concepts": [{"instance_set": {"path": folder}}]},
                            "aspect_ratio_bucket": {"enabled": True}, "prior_preservation": {"enabled": False}})
    records = scan_shards(shards, "{TXT_PROMPT}").records if mode == "buckets" else None
    rss_before = _peak_rss_mb()
    start, cpu_start = time.perf_counter(), time.process_time()
    with warnings.catch_warnings(), notices.collect(lambda message: None):
        warnings.simplefilter("ignore")
        if mode == "floor":
            samples = 0
            for shard in shards:
                with tarfile.open(shard, "r:") as tar:
                    samples += sum(1 for info in tar if info.name.endswith(".txt"))
        elif mode == "first":
            samples = sum(len(index["samples"]) for index in index_shards(shards))
        elif mode == "reopen":
            samples = len(scan_shards(shards, "{TXT_PROMPT}").records)
        elif mode == "buckets":
            samples = len(plan_buckets(config, records).kept)
        else:
            report = bucket_report(config)
            samples = sum(b["count"] for b in report["buckets"]) + report["skipped_count"]
    return {"mode": mode, "samples": samples, "seconds": time.perf_counter() - start,
            "cpu_seconds": time.process_time() - cpu_start, "peak_rss_mb": _peak_rss_mb(),
            "rss_before_mb": rss_before}


def _child(folder: Path, mode: str) -> dict:
    code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import shard_index; "
            f"print(json.dumps(shard_index.measure({str(folder)!r}, {mode!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(counts: list[int], per_shard: int, base: Path) -> list[dict]:
    rows, made = [], 0
    folder = base / "shards"
    for count in counts:
        shards = -(-count // per_shard)
        make_shards(folder, per_shard, made, shards)
        made = shards
        for sidecar in folder.glob("*.idx.json"):
            sidecar.unlink()  # the first index of every shard, not only the new ones
        row = {"samples": shards * per_shard, "shards": shards}
        for mode in MODES:
            row[mode] = _child(folder, mode)
            print(f"{row['samples']:>9} samples  {mode:>8}: {row[mode]['seconds']:7.2f} s "
                  f"(CPU {row[mode]['cpu_seconds']:.2f} s)  peak RSS {row[mode]['peak_rss_mb']:.0f} MB "
                  f"(after imports {row[mode]['rss_before_mb']:.0f} MB)", flush=True)
        rows.append(row)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| samples (shards) | tar header floor | first index | re-open | µs per sample re-opened | "
             "buckets | tab report | peak RSS re-open / report |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        floor, first, reopen = row["floor"]["seconds"], row["first"]["seconds"], row["reopen"]["seconds"]
        lines.append(f"| {row['samples']:,} ({row['shards']:,}) | {floor:.2f} s | {first:.2f} s "
                     f"({first / floor:.2f}x) | {reopen:.2f} s | {reopen / row['samples'] * 1e6:.1f} | "
                     f"{row['buckets']['seconds']:.3f} s | {row['report']['seconds']:.2f} s | "
                     f"{row['reopen']['peak_rss_mb']:.0f} / {row['report']['peak_rss_mb']:.0f} MB |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--per-shard", type=int, default=1000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="scal-shard-bench-") as base:
        rows = run(sorted(args.counts), args.per_shard, Path(base))
    print()
    print(table(rows))


if __name__ == "__main__":
    main()
