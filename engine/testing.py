"""Small configs over the demo assets, shared by the test suite and the benchmarks."""
from __future__ import annotations

from pathlib import Path


def fill_class_folder(model_dir: Path, folder: Path, count: int, size: int = 64) -> None:
    """Render `count` class images with the tiny model unless the folder already has them."""
    from diffusers import StableDiffusionPipeline

    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.png"))) >= count:
        return
    pipeline = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipeline.set_progress_bar_config(disable=True)
    import torch

    generator = torch.Generator().manual_seed(0)
    images = pipeline(["toy"] * count, num_inference_steps=2, height=size, width=size, generator=generator).images
    for index, image in enumerate(images):
        image.save(folder / f"class_{index:03d}.png")


def tiny_config(output_dir: Path, **overrides) -> dict:
    """The tiny demo preset as a dict, pointed at output_dir, with key overrides (`a.b`: value)."""
    import yaml

    from .config import apply_override

    root = Path(__file__).resolve().parent.parent
    values = yaml.safe_load((root / "presets" / "tiny-demo-cpu.yaml").read_text(encoding="utf-8"))
    values["output_dir"] = str(output_dir)
    for key, value in overrides.items():
        apply_override(values, key, value)
    return values
