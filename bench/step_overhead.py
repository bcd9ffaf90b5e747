"""Trainer overhead and memory-feature cost on the CPU, on the tiny demo model.

    python bench/step_overhead.py [--steps 40] [--rounds 3] [--threads 1]

1. The trainer's median step time against a bare loop (VAE encode, noise, text encoder, UNet, loss,
   backward, optimizer step) on the same model, batches and settings. Target: at most 1.05x.
2. For each memory feature the config schema has, the trainer's median step time with it on over off.

Step times are the gaps between the trainer's Step events, so they include everything the loop does
per step (data loading, logging); the first steps are left out as warm-up.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

WARMUP = 5
# (label, config overrides turning it on); off is the base config.
FEATURES = [
    ("gradient checkpointing", {"gradient_checkpointing": True}),
    ("8-bit AdamW", {"optimizer.name": "bitsandbytes.optim.AdamW8bit"}),
    ("cached latents + text embeddings", {"cache.latents": True, "cache.text_embeddings": True}),
    ("fused backward", {"optimizer.fused_backward": True}),
    ("bf16 weights", {"weights_dtype": "bf16"}),
]


def base_config(output_dir: Path, steps: int, **overrides):
    from engine.config import load
    from engine.testing import tiny_config

    values = tiny_config(output_dir, **{
        "trainer.max_steps": steps + WARMUP, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": 10**6, "data.concepts[0].class_set.auto_generate.enabled": False,
        **overrides})
    return load(base=values)


def trainer_step_times(config) -> list[float]:
    from engine import events
    from engine.train import Trainer

    stamps = []
    result = Trainer(config, on_event=lambda e: stamps.append(time.perf_counter())
                     if isinstance(e, events.Step) else None).run()
    if not isinstance(result, events.Finished):
        raise RuntimeError(getattr(result, "error", result))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return gaps[WARMUP - 1:]


def bare_step_times(config) -> list[float]:
    """The same step without the trainer: batches read up front, no events, metrics or checks."""
    import torch

    from engine.models.sd import encode_prompt, load_components
    from engine.optim import build_optimizer
    from engine.data.prepare import prepare_data
    from engine.losses import dreambooth_loss

    torch.manual_seed(config.seed)
    parts = load_components(config.model)
    unet, text_encoder, vae, scheduler = parts.unet, parts.text_encoder, parts.vae, parts.noise_scheduler
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    unet.train()
    optimizer = build_optimizer(config.optimizer, list(unet.parameters()), config.optimizer.params.lr)
    data = prepare_data(config, parts.tokenizer, config.seed)
    batches = []
    while len(batches) < config.trainer.max_steps:
        batches += list(data.loader)
    generator = torch.Generator().manual_seed(config.seed)
    times = []
    for batch in batches[:config.trainer.max_steps]:
        start = time.perf_counter()
        with torch.no_grad():
            latents = vae.encode(batch["pixel_values"]).latent_dist.sample(generator) * vae.config.scaling_factor
            hidden = encode_prompt(text_encoder, batch["input_ids"], config.clip_stop_at_layer)
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator)
        prediction = unet(scheduler.add_noise(latents, noise, timesteps), timesteps, hidden).sample
        loss = dreambooth_loss(prediction, noise, batch["num_instance"], config.prior_preservation.prior_loss_weight)[0]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[WARMUP:]


def compare(rounds: int, reference, candidate) -> tuple[float, float, float]:
    """Median step of each (ms) and the median of the per-round ratios candidate / reference.

    The two alternate, and each round is compared with itself, so that load from other processes, which
    comes and goes, weighs on both sides alike."""
    reference_ms, candidate_ms, ratios = [], [], []
    for _ in range(rounds):
        reference_ms.append(statistics.median(reference()) * 1000)
        candidate_ms.append(statistics.median(candidate()) * 1000)
        ratios.append(candidate_ms[-1] / reference_ms[-1])
    return statistics.median(reference_ms), statistics.median(candidate_ms), statistics.median(ratios)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="measured steps per run (after warm-up)")
    parser.add_argument("--rounds", type=int, default=3, help="alternated runs of each side per comparison")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is the steadiest)")
    args = parser.parse_args(argv)

    import torch

    from engine import paths
    from engine.config import ConfigError
    from engine.testing import fill_class_folder

    torch.set_num_threads(args.threads)
    fill_class_folder(paths.demo_model_dir(), paths.demo_data_dir() / "class", count=10)
    with tempfile.TemporaryDirectory() as tmp:
        output = Path(tmp)
        base = base_config(output, args.steps)
        # A throwaway run first: the first steps of a process pay for kernel selection and allocator growth.
        bare_step_times(base_config(output, WARMUP))
        print(f"tiny demo model, {base.batch_size} instance + {base.batch_size} class rows at "
              f"{base.data.resolution} px, {args.threads} thread(s), {args.steps} steps per run, "
              f"median of {args.rounds} alternated rounds")
        print("| measurement | median step (ms) | ratio |")
        print("|---|---|---|")
        bare_ms, trainer_ms, ratio = compare(args.rounds, lambda: bare_step_times(base),
                                             lambda: trainer_step_times(base))
        print(f"| trainer against the bare loop | {trainer_ms:.1f} vs {bare_ms:.1f} | {ratio:.3f} |")
        for label, overrides in FEATURES:
            try:
                config = base_config(output, args.steps, **overrides)
            except ConfigError as error:
                print(f"| {label} | not in this version ({error}) | |")
                continue
            off_ms, on_ms, ratio = compare(args.rounds, lambda: trainer_step_times(base),
                                           lambda: trainer_step_times(config))
            print(f"| {label}, on against off | {on_ms:.1f} vs {off_ms:.1f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
