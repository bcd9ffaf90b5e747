"""Real GPU memory and speed of the training presets, next to their pre-flight estimates.

    python bench/gpu.py [--steps 30] [--arch sd15|sd21] [PRESET ...]

Each preset trains on the real architecture (the shipped SD1.5, SD2.1 or SDXL configs; SDXL for the
SDXL presets, --arch for the others) with random weights,
written once to a temporary diffusers folder, on the demo images at the preset's own resolution, batch
and memory settings. Printed per preset: the estimate, the peak of torch.cuda.max_memory_allocated over
the training steps after the first (the figure the estimate predicts) and over the whole run (loading and
caching included), and the median steps per second. For a preset with blocks on the CPU
(`memory.blocks_on_cpu`) a second table sets the swap's cost against its copies: the median step time without
the swap and with it, the time one step's copies take on their own (each swapped block to the device for its
forward and again for its backward, and a full fine-tune's trained tensors back), and the share of that copy
time hidden behind compute. Without CUDA it prints "no CUDA device" and exits 0.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")

PRESETS = ("dreambooth-6gb", "dreambooth-10gb", "dreambooth-24gb", "native-finetune", "sdxl-lora-8gb",
           "sdxl-dreambooth-8gb", "sdxl-dreambooth-12gb", "sdxl-24gb")
GIB = 2**30


def write_random_model(arch: str, folder: Path) -> Path:
    """A diffusers folder with the architecture's UNet, VAE and text encoder(s) at random weights.

    The tokenizers, scheduler and model index come from the demo model of the same family: same classes
    and noise schedule, and its small vocabulary indexes the real text encoders' embedding tables just as
    well."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engine import paths
    from engine.config import Config
    from engine.vram import resolve_architecture

    architecture = resolve_architecture(Config(), arch)
    demo = paths.demo_model_dir("sdxl" if arch == "sdxl" else "sd")
    for name in ("tokenizer", "tokenizer_2", "scheduler"):
        if (demo / name).is_dir():
            shutil.copytree(demo / name, folder / name)
    shutil.copy(demo / "model_index.json", folder / "model_index.json")
    models = {"unet": UNet2DConditionModel.from_config(architecture.unet),
              "vae": AutoencoderKL.from_config(architecture.vae),
              "text_encoder": CLIPTextModel(CLIPTextConfig.from_dict(architecture.text_encoder))}
    if architecture.text_encoder_2 is not None:
        models["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(architecture.text_encoder_2))
    for name, model in models.items():
        model.save_pretrained(folder / name)
    return folder


def preset_config(preset: str, model_dir: Path, output: Path, steps: int):
    from engine.config import load, read_yaml

    values = read_yaml(ROOT / "presets" / f"{preset}.yaml")
    values.update(model=str(model_dir), output_dir=str(output), seed=0)
    values["trainer"].update(max_steps=steps + 1, max_epochs=None)
    values["sampling"]["interval_steps"] = 0
    values["checkpoint"] = {"every_n_train_steps": 10**6}
    for concept in values["data"]["concepts"]:
        prior = values.get("prior_preservation", {}).get("enabled", True)
        concept["instance_set"]["path"] = "demo:sample-data/instance" if prior else "demo:sample-data/finetune"
        if concept.get("class_set"):
            concept["class_set"]["path"] = "demo:sample-data/class"
            concept["class_set"]["auto_generate"]["enabled"] = False
    return load(base=values)


def measure(config) -> dict:
    """Train; the peak allocated over the steps after the first and over the run, steps per second, and the
    run's block swap (engine.block_swap.BlockSwap; None without one)."""
    import torch

    from engine import block_swap, events
    from engine.train import Trainer

    stamps, step_peak, swaps = [], {}, []
    trainer = None
    apply = block_swap.apply

    def recorded_apply(*args, **kwargs):
        swaps.append(apply(*args, **kwargs))
        return swaps[-1]

    def on_event(event):
        if not isinstance(event, events.Step):
            return
        torch.cuda.synchronize()
        stamps.append(time.perf_counter())
        if event.step == 1:
            step_peak["run"] = torch.cuda.max_memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        if event.step == event.total_steps:
            step_peak["steps"] = torch.cuda.max_memory_allocated()
            trainer.stop(save_checkpoint=False)

    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    trainer = Trainer(config, on_event=on_event)
    block_swap.apply = recorded_apply
    try:
        result = trainer.run()
    finally:
        block_swap.apply = apply
    if not isinstance(result, events.Finished):
        raise RuntimeError(getattr(result, "error", result))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"steps_gib": step_peak["steps"] / GIB, "run_gib": max(step_peak.values()) / GIB,
            "it_per_s": 1 / statistics.median(gaps), "swap": swaps[-1] if swaps else None}


def copy_seconds(swap, rounds: int = 3) -> float:
    """The time one training step's copies of a BlockSwap take with nothing else running (median of rounds):
    each swapped block to the device twice (forward and backward) and its trained tensors back once."""
    import torch

    def synchronize():
        if swap.cuda:
            torch.cuda.synchronize(swap.device)

    def timed(action) -> float:
        synchronize()
        start = time.perf_counter()
        action()
        synchronize()
        return time.perf_counter() - start

    totals = []
    for _ in range(rounds):
        total = 0.0
        for index in swap.order:
            total += 2 * timed(lambda: swap._load(index))
            trained = [entry for entry in swap.tensors[index] if entry.trained]
            total += timed(lambda: [entry.cpu.copy_(entry.tensor.data, non_blocking=swap.cuda)
                                    for entry in trained])
            swap._unload(index, copy_back=False)
        totals.append(total)
    return statistics.median(totals)


def overlap(step_without: float, step_with: float, copies: float) -> dict:
    """The swap's cost in seconds per step (step_with - step_without) against its copies' own time, and the
    share of the copy time hidden behind compute (0 to 1)."""
    added = step_with - step_without
    hidden = 1.0 if copies <= 0 else min(1.0, max(0.0, 1 - added / copies))
    return {"added_s": added, "copies_s": copies, "hidden": hidden}


def measure_swap(config, with_swap: dict) -> dict:
    """Block swap's overlap for a config with blocks on the CPU, `with_swap` being measure(config): the same
    run without the swap, the copy time of a step of the swap, and overlap()."""
    import dataclasses

    without = measure(dataclasses.replace(config, memory=dataclasses.replace(config.memory, blocks_on_cpu=0)))
    step_without, step_with = 1 / without["it_per_s"], 1 / with_swap["it_per_s"]
    return {"step_without_s": step_without, "step_with_s": step_with,
            **overlap(step_without, step_with, copy_seconds(with_swap["swap"]))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("presets", nargs="*", default=list(PRESETS), help=f"presets (default: {' '.join(PRESETS)})")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per preset, after the first")
    parser.add_argument("--arch", choices=("sd15", "sd21"), default="sd15", help="for the SD1.x/SD2.x presets")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        print("no CUDA device")
        return 0

    from engine import paths, vram
    from engine.testing import fill_class_folder

    fill_class_folder(paths.demo_model_dir(), paths.demo_data_dir() / "class", count=10)
    print(f"{torch.cuda.get_device_name()}, random weights, {args.steps} steps per preset")
    print("| preset | arch | estimate (GiB) | peak over steps (GiB) | peak over run (GiB) | it/s |")
    print("|---|---|---|---|---|---|")
    from engine.config import read_yaml

    swapped: list[tuple[str, int, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dirs: dict[str, Path] = {}
        for preset in args.presets:
            named = vram.guess_architecture(read_yaml(ROOT / "presets" / f"{preset}.yaml").get("model", ""))
            arch = "sdxl" if named == "sdxl" else args.arch
            if arch not in model_dirs:
                model_dirs[arch] = write_random_model(arch, Path(tmp) / arch)
            config = preset_config(preset, model_dirs[arch], Path(tmp) / "output", args.steps)
            estimate = vram.estimate(config, arch)
            real = measure(config)
            print(f"| {preset} | {arch} | {estimate.peak:.2f} | {real['steps_gib']:.2f} | {real['run_gib']:.2f} | "
                  f"{real['it_per_s']:.2f} |", flush=True)
            if real["swap"] is not None:
                swapped.append((preset, config.memory.blocks_on_cpu, measure_swap(config, real)))
    if swapped:
        print("\n| preset | blocks on the CPU | step without swap (ms) | step with swap (ms) | copies of a step "
              "alone (ms) | copy time hidden |")
        print("|---|---|---|---|---|---|")
        for preset, blocks, figures in swapped:
            print(f"| {preset} | {blocks} | {figures['step_without_s'] * 1e3:.1f} | {figures['step_with_s'] * 1e3:.1f} "
                  f"| {figures['copies_s'] * 1e3:.1f} | {figures['hidden']:.0%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
