"""Benchmark of the latent and text caches' shard store at a million keys: open, lookups, memory, pickle.

    python bench/cache_store.py                  # 100k and 1M keys
    python bench/cache_store.py --counts 100000

Writes a cache folder of `count` tiny tensors under latent-style keys (sha1 hex), 2,048 keys per shard as
in a real latent cache of 512 px images (256 MiB shards of 128 KiB latents), then, in a fresh process
each: opens the store (reading every shard's header), looks up 10,000 random keys and reads their
tensors, and pickles the store as the data loader does for each worker. Peak RSS is printed with the RSS
after the imports (torch).
"""
from __future__ import annotations

import argparse
import json
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dataset_index import _peak_rss_mb

ROOT = Path(__file__).resolve().parent.parent
KEYS_PER_SHARD = 2048
LOOKUPS = 10_000


def _key(index: int) -> str:
    import hashlib

    return hashlib.sha1(str(index).encode()).hexdigest()


def write_store(folder: Path, count: int) -> None:
    sys.path.insert(0, str(ROOT))
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    for begin in range(0, count, KEYS_PER_SHARD):
        tensors = {_key(i): torch.full((4,), float(i)) for i in range(begin, min(begin + KEYS_PER_SHARD, count))}
        save_file(tensors, str(folder / f"{begin:08d}.safetensors"))


def measure(folder: str, count: int) -> dict:
    sys.path.insert(0, str(ROOT))
    from engine.data.cache import ShardStore

    rss_imported = _peak_rss_mb()
    start = time.perf_counter()
    store = ShardStore(Path(folder))
    opened = time.perf_counter() - start
    rng = random.Random(0)
    wanted = [rng.randrange(count) for _ in range(LOOKUPS)]
    start = time.perf_counter()
    assert all(_key(i) in store for i in wanted)
    values = [store.get(_key(i))[0].item() for i in wanted]
    looked_up = time.perf_counter() - start
    assert values == [float(i) for i in wanted]
    start = time.perf_counter()
    pickled = len(pickle.dumps(store))
    return {"keys": len(store), "shards": len(store.shards), "open_s": opened,
            "lookup_us": looked_up / LOOKUPS * 1e6, "pickle_bytes": pickled,
            "pickle_s": time.perf_counter() - start, "peak_rss_mb": _peak_rss_mb(), "rss_imported_mb": rss_imported}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--counts", type=int, nargs="+", default=[100_000, 1_000_000])
    args = parser.parse_args()
    lines = ["| keys (shards) | open | lookup + read per key | pickled store | peak RSS (after imports) |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="scal-cache-bench-") as base:
        for count in args.counts:
            folder = Path(base) / str(count)
            write_store(folder, count)
            code = (f"import sys, json; sys.path.insert(0, {str(ROOT / 'bench')!r}); import cache_store; "
                    f"print(json.dumps(cache_store.measure({str(folder)!r}, {count})))")
            done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(row, flush=True)
            lines.append(f"| {row['keys']:,} ({row['shards']}) | {row['open_s']:.2f} s | {row['lookup_us']:.0f} µs | "
                         f"{row['pickle_bytes'] / 2**20:.1f} MB in {row['pickle_s']:.3f} s | "
                         f"{row['peak_rss_mb']:.0f} MB ({row['rss_imported_mb']:.0f} MB) |")
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
