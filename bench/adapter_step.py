"""Step time of adapter training (LoRA family) against full fine-tuning, on the CPU, on the tiny demo model.

    python bench/adapter_step.py [--steps 40] [--rounds 5] [--threads 1] [--only lora,locon]

For each adapter configuration, the trainer's median step time with it against the same config training
the full UNet (`network.type: full`), in one process: the full run and the adapter run alternate (A B A B
...), and the ratio is the median of the per-round ratios adapter / full, so that load from other processes
weighs on both sides alike. Everything but `network` is the tiny demo preset (engine.testing.tiny_config):
2 instance + 2 class rows at 64 px, AdamW, fp32, no sampling or checkpoints while measuring.

Step times are the gaps between the trainer's Step events (bench/step_overhead.py's measurement), so they
include everything the loop does per step; the first steps are left out as warm-up. On this tiny model the
UNet's own compute is small, so the figures show the adapter layers' per-layer overhead more than the
optimizer and gradient savings an adapter brings on a real model and GPU.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

from step_overhead import WARMUP, base_config, compare, trainer_step_times  # noqa: E402

# (label, network overrides); the reference is network.type: full with everything else the same.
ADAPTERS = [
    ("lora", "LoRA rank 4", {"network.type": "lora", "network.rank": 4, "network.alpha": 4}),
    ("locon", "LoRA rank 4 + conv rank 2 (LoCon, tiny-lora-cpu)",
     {"network.type": "lora", "network.rank": 4, "network.alpha": 4, "network.conv_rank": 2,
      "network.conv_alpha": 2}),
    ("lora16", "LoRA rank 16", {"network.type": "lora", "network.rank": 16, "network.alpha": 16}),
    ("dora", "DoRA rank 4", {"network.type": "dora", "network.rank": 4, "network.alpha": 4}),
    ("loha", "LoHa rank 4", {"network.type": "loha", "network.rank": 4, "network.alpha": 4}),
    ("lokr", "LoKr rank 4", {"network.type": "lokr", "network.rank": 4, "network.alpha": 4}),
]


def trained_parameters(config) -> int:
    """How many weights the config trains: the trainer's own freezing rules and adapter, on the CPU."""
    import torch

    from engine.models.sd import StableDiffusion, load_components
    from engine.plan import make_plan
    from engine.setup import parameter_groups, prepare_models

    family = StableDiffusion()
    components = load_components(config.model)
    plan = make_plan(config, "cpu")
    prepare_models(family, components, config, plan, torch.device("cpu"))
    groups = parameter_groups(components, plan, config, config.optimizer.params.lr)
    return sum(p.numel() for group in groups for p in group["params"])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per run (after warm-up)")
    parser.add_argument("--rounds", type=int, default=5, help="alternated runs of each side per comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is the steadiest)")
    parser.add_argument("--only", default="", help="comma-separated adapter keys: "
                        + ", ".join(key for key, _, _ in ADAPTERS))
    args = parser.parse_args(argv)
    wanted = [a for a in ADAPTERS if not args.only or a[0] in args.only.split(",")]
    if not wanted:
        parser.error(f"--only: none of {args.only!r} is one of " + ", ".join(key for key, _, _ in ADAPTERS))

    import torch

    from engine import paths
    from engine.config import ConfigError
    from engine.testing import fill_class_folder

    torch.set_num_threads(args.threads)
    fill_class_folder(paths.demo_model_dir(), paths.demo_data_dir() / "class", count=10)
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp)
        full = base_config(output, args.steps, **{"network.type": "full"})
        # A throwaway run first: the first steps of a process pay for kernel selection and allocator growth.
        trainer_step_times(base_config(output, WARMUP))
        print(f"tiny demo model, {full.batch_size} instance + {full.batch_size} class rows at "
              f"{full.data.resolution} px, {args.threads} thread(s), {args.steps} steps per run, "
              f"median of {args.rounds} alternated rounds (full A, adapter B)")
        print("| network | trained weights | median step (ms), adapter vs full | ratio adapter / full |")
        print("|---|---|---|---|")
        print(f"| full UNet (reference) | {trained_parameters(full):,} | | 1 |")
        for _, label, overrides in wanted:
            try:
                config = base_config(output, args.steps, **overrides)
            except ConfigError as error:
                print(f"| {label} | not in this version ({error}) | | |")
                continue
            full_ms, adapter_ms, ratio = compare(args.rounds, lambda: trainer_step_times(full),
                                                 lambda: trainer_step_times(config))
            print(f"| {label} | {trained_parameters(config):,} | {adapter_ms:.1f} vs {full_ms:.1f} | {ratio:.3f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
