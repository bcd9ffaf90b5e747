"""Presets are ordinary config files in presets/; the app offers them by file name with their description."""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
CPU_PRESET = "tiny-demo-cpu"
GPU_PRESET = "dreambooth-10gb"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str


def list_presets(folder: Path = PRESETS_DIR) -> list[Preset]:
    presets = []
    for path in sorted(folder.glob("*.yaml")):
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        presets.append(Preset(path.stem, path, str(values.get("description", ""))))
    return presets


def load_preset(preset: Preset, output_dir: Optional[str] = None) -> dict:
    """The preset's raw config; output_dir, when the app was given one, replaces the preset's."""
    values = yaml.safe_load(preset.path.read_text(encoding="utf-8")) or {}
    if output_dir:
        values["output_dir"] = output_dir
    return values


def has_cuda_gpu() -> bool:
    """Whether an NVIDIA GPU is visible, without importing torch (which would slow the app's start)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    if gpus.is_dir():
        return any(gpus.iterdir())
    return shutil.which("nvidia-smi") is not None


def default_preset(presets: list[Preset], gpu: bool) -> Preset:
    wanted = GPU_PRESET if gpu else CPU_PRESET
    for preset in presets:
        if preset.name == wanted:
            return preset
    return presets[0]
