"""`compile: true` against eager on the CPU, on the tiny demo model: step time and compile time.

    python bench/compile.py [--steps 30] [--rounds 3]

Each round trains the tiny SD model (a full fine-tune at 64 px, one bucket) eagerly, then compiled, each run a
process of its own on one torch thread, all in one fresh cache folder: the first compiled run compiles cold,
the later ones read Inductor's on-disk cache. Step times are the gaps between the trainer's Step events after
the warm-up steps (the compiled run's first step compiles); each run's median, then the median over rounds.
Tiny-model figures only: its kernels are too small for the CPU to gain from fusion what a real model's would.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ["OMP_NUM_THREADS"] = "1"

WARMUP = 3


def run(output_dir: Path, steps: int, compiled: bool) -> tuple[list[float], float]:
    """(step times after the warm-up, seconds compiling) of one run."""
    from engine import events
    from engine.config import load
    from engine.testing import tiny_config
    from engine.train import Trainer

    config = load(base=tiny_config(output_dir, compile=compiled, **{
        "trainer.max_steps": steps + WARMUP, "sampling.interval_steps": 0, "prior_preservation.enabled": False,
        "checkpoint.every_n_train_steps": 10**6}))
    stamps = []
    trainer = Trainer(config, on_event=lambda e: stamps.append(time.perf_counter())
                      if isinstance(e, events.Step) else None)
    result = trainer.run()
    if not isinstance(result, events.Finished):
        raise RuntimeError(getattr(result, "error", result))
    records = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps[WARMUP - 1:], sum(record.get("compile_s", 0.0) for record in records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--one", choices=["eager", "compiled"], help=argparse.SUPPRESS)  # one run, in this process
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        import torch

        torch.set_num_threads(1)
        times, seconds = run(Path(args.output), args.steps, args.one == "compiled")
        print(json.dumps({"median": statistics.median(times), "compile_s": seconds}))
        return
    with tempfile.TemporaryDirectory(prefix="scal-bench-compile-") as folder:
        env = {**os.environ, "SCAL_SDT_CACHE": str(Path(folder) / "cache")}
        medians, compile_s = {"eager": [], "compiled": []}, []
        for index in range(args.rounds):
            for kind in ("eager", "compiled"):
                done = subprocess.run([sys.executable, __file__, "--one", kind, "--steps", str(args.steps),
                                       "--output", str(Path(folder) / f"{kind}-{index}")],
                                      env=env, capture_output=True, text=True, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                medians[kind].append(result["median"])
                if kind == "compiled":
                    compile_s.append(result["compile_s"])
            print(f"round {index + 1}: eager {medians['eager'][-1] * 1000:.1f} ms/step, compiled "
                  f"{medians['compiled'][-1] * 1000:.1f} ms/step, compiling {compile_s[-1]:.1f} s", flush=True)
    a, b = statistics.median(medians["eager"]), statistics.median(medians["compiled"])
    print(f"median step: eager {a * 1000:.1f} ms, compiled {b * 1000:.1f} ms ({b / a:.2f}x); compile time "
          f"cold {compile_s[0]:.1f} s, from the disk cache {', '.join(f'{s:.1f}' for s in compile_s[1:])} s; "
          f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
