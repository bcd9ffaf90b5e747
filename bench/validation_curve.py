"""Validation loss over a longer tiny-demo run on the CPU: does val_loss fall as the model learns?

    python bench/validation_curve.py [--steps 300] [--every 25] [--split 0.2] [--threads 1]

The tiny demo preset (DreamBooth with prior preservation, 64 px) trains with `validation.split` holding
out some of the instance images, which it then never trains on. The script prints val_loss at every
validation round next to the mean training loss of the steps since the previous round, and the
per-timestep figures of the first and last rounds.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=25)
    parser.add_argument("--split", type=float, default=0.2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from engine import events
    from engine.config import load
    from engine.testing import tiny_config
    from engine.train import Trainer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as output:
        config = load(base=tiny_config(Path(output), **{
            "trainer.max_steps": args.steps, "sampling.interval_steps": 0, "checkpoint.every_n_train_steps": 10**6,
            "validation": {"every_n_steps": args.every, "split": args.split}}))
        losses, rounds = [], []

        def record(event):
            if isinstance(event, events.Step):
                losses.append(event.loss)
            elif isinstance(event, events.Validation):
                rounds.append((event.step, event.loss, event.per_timestep, sum(losses) / len(losses)))
                losses.clear()
            elif isinstance(event, events.Log) and "validation images" in event.message:
                print(event.message)

        started = time.perf_counter()
        result = Trainer(config, on_event=record).run()
        if not isinstance(result, events.Finished):
            raise SystemExit(getattr(result, "error", result))
        elapsed = time.perf_counter() - started
    print(f"{args.steps} steps in {elapsed:.0f} s\n")
    print("| step | val_loss | mean training loss since the previous round |")
    print("|---|---|---|")
    for step, val_loss, _, train_loss in rounds:
        print(f"| {step} | {val_loss:.4f} | {train_loss:.4f} |")
    print()
    for label, (step, _, per_timestep, _) in (("first", rounds[0]), ("last", rounds[-1])):
        values = ", ".join(f"t{t} {v:.4f}" for t, v in per_timestep.items())
        print(f"{label} round (step {step}): {values}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
