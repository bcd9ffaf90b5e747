"""Real GPU memory and speed of the training presets, next to their pre-flight estimates.

    python bench/gpu.py [--steps 30] [--arch sd15|sd21] [PRESET ...]

Each preset trains on the real architecture (the shipped SD1.5, SD2.1 or SDXL configs; SDXL for the
SDXL presets, --arch for the others) with random weights,
written once to a temporary diffusers folder, on the demo images at the preset's own resolution, batch
and memory settings. Printed per preset: the estimate, the peak of torch.cuda.max_memory_allocated over
the training steps after the first (the figure the estimate predicts) and over the whole run (loading and
caching included), and the median steps per second. Without CUDA it prints "no CUDA device" and exits 0.
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
    """Train; the peak allocated over the steps after the first and over the run, and steps per second."""
    import torch

    from engine import events
    from engine.train import Trainer

    stamps, step_peak = [], {}
    trainer = None

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
    result = trainer.run()
    if not isinstance(result, events.Finished):
        raise RuntimeError(getattr(result, "error", result))
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return {"steps_gib": step_peak["steps"] / GIB, "run_gib": max(step_peak.values()) / GIB,
            "it_per_s": 1 / statistics.median(gaps)}


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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
