"""The allocator setting (engine.allocator) on a full-size SD1.5 LoRA step on the CPU.

    python bench/allocator.py [--steps 6] [--rounds 3] [--threads 2] [--resolution 256]

A random SD1.5 UNet from the shipped config with the project's LoRA (rank 16, engine.models.adapters), AdamW,
fp32, batch 1: forward, backward and optimizer step on fixed inputs, in a thread of their own as a training run's
loop is. Each measurement is its own process (the setting is the process's), alternating (A B C A B C):
glibc's default allocator; `thresholds`, only the mmap and trim thresholds raised (which hold in the main
thread's heap alone); and `kept`, `keep_freed_memory` as the CLI and the app call it. The first two steps of each
are left out. Reported per step: wall time, CPU time in the kernel, minor page faults, and the process's peak
RSS; ratios are to the default, median over the rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 2

STEP = r"""
import json, resource, sys, threading, time
sys.path.insert(0, sys.argv[1])
import torch
from engine import allocator
from engine.config import Network
from engine.models.adapters import add_adapter
from engine.models.tiny import real_config
mode, steps, threads, resolution = sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
if mode == "kept":
    assert allocator.keep_freed_memory()
elif mode == "thresholds":
    libc = allocator._glibc()
    assert libc.mallopt(allocator.M_MMAP_THRESHOLD, allocator.MMAP_THRESHOLD)
    assert libc.mallopt(allocator.M_TRIM_THRESHOLD, allocator.TRIM_THRESHOLD)
from diffusers import UNet2DConditionModel
torch.manual_seed(0)
unet = UNet2DConditionModel.from_config(real_config("sd", "unet"))
add_adapter(unet, "unet", Network(type="lora", rank=16, alpha=16), seed=0)
params = [p for p in unet.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-4)
latents = torch.randn(1, 4, resolution // 8, resolution // 8)
text = torch.randn(1, 77, 768)
rows = []


def train():
    for _ in range(steps):
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        loss = unet(latents, torch.tensor([500]), text).sample.pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        end, after = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        rows.append((end - start, after.ru_stime - before.ru_stime, after.ru_minflt - before.ru_minflt))


loop = threading.Thread(target=train)
loop.start()
loop.join()
print(json.dumps({"rows": rows, "trained": sum(p.numel() for p in params),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def measure(mode: str, args) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    result = subprocess.run([sys.executable, "-c", STEP, str(ROOT), mode, str(args.steps + WARMUP),
                             str(args.threads), str(args.resolution)], env=env, capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(result.stderr[-3000:])
    found = json.loads(result.stdout.strip().splitlines()[-1])
    rows = found["rows"][WARMUP:]
    return {"step": statistics.median(r[0] for r in rows), "kernel": statistics.median(r[1] for r in rows),
            "faults": statistics.median(r[2] for r in rows), "peak_rss_gib": found["peak_rss_gib"],
            "trained": found["trained"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    args = parser.parse_args()
    results = {"default": [], "thresholds": [], "kept": []}
    for round_ in range(args.rounds):
        for mode in results:
            results[mode].append(measure(mode, args))
            print(f"round {round_ + 1} {mode}: {json.dumps(results[mode][-1])}", flush=True)
    print(f"\ntrained parameters: {results['kept'][0]['trained']:,}")
    print("| allocator | s/step | kernel s/step | minor faults/step | peak RSS (GiB) |\n|---|---|---|---|---|")
    for mode, rows in results.items():
        print(f"| {mode} | " + " | ".join(f"{statistics.median(r[k] for r in rows):,.3f}" if k != "faults" else
                                        f"{statistics.median(r[k] for r in rows):,.0f}"
                                        for k in ("step", "kernel", "faults", "peak_rss_gib")) + " |")
    for mode in ("thresholds", "kept"):
        ratio = statistics.median(k["step"] / d["step"] for d, k in zip(results["default"], results[mode]))
        print(f"\nstep time {mode} / default, median of the rounds' ratios: {ratio:.3f}")


if __name__ == "__main__":
    main()
