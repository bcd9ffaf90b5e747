"""Presets are ordinary config files: the shipped ones in presets/, the user's own in USER_PRESETS_DIR. The app
offers them by file name with their description."""
from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

PRESETS_DIR = Path(__file__).resolve().parent.parent / "presets"
# Outside the checkout and the output folder: an update or a new output folder leaves them where they are.
USER_PRESETS_DIR = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "scal-sdt" / "presets"
# A name becomes a file name in that folder: no path separators, no leading dot.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_ .+()-]{0,63}")
CPU_PRESET = "tiny-demo-cpu"
GPU_PRESET = "dreambooth-10gb"


@dataclass(frozen=True)
class Preset:
    name: str
    path: Path
    description: str
    user: bool = False  # saved from the app, in USER_PRESETS_DIR

    @property
    def label(self) -> str:
        return f"{self.name} (yours)" if self.user else self.name


class PresetError(ValueError):
    """A preset that cannot be saved under that name."""


def list_presets(folder: Path = PRESETS_DIR) -> list[Preset]:
    presets = []
    for path in sorted(folder.glob("*.yaml")):
        values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        presets.append(Preset(path.stem, path, str(values.get("description", ""))))
    return presets


def all_presets() -> list[Preset]:
    """The shipped presets, then the user's; a user's preset cannot take a shipped one's name."""
    shipped = list_presets()
    taken = {p.name for p in shipped}
    own = []
    if USER_PRESETS_DIR.is_dir():
        for path in sorted(USER_PRESETS_DIR.glob("*.yaml")):
            try:
                values = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, UnicodeDecodeError, yaml.YAMLError):
                continue  # a file the user broke by hand: not offered, the app still starts
            if path.stem not in taken and isinstance(values, dict):
                own.append(Preset(path.stem, path, str(values.get("description", "")), user=True))
    return shipped + own


def save_user_preset(name: str, raw: dict) -> Preset:
    """Write raw as the user's preset NAME (replacing the user's own of that name); raises PresetError."""
    name = (name or "").strip()
    if not _NAME.fullmatch(name):
        raise PresetError("a preset name is up to 64 letters, digits, spaces and _ . + ( ) -, "
                          "without a path separator or a leading dot")
    if any(p.name == name for p in list_presets()):
        raise PresetError(f"'{name}' is a shipped preset; choose another name")
    values = {**raw, "description": "Your preset, saved from the app."}
    path = USER_PRESETS_DIR / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(values, sort_keys=False, allow_unicode=True), encoding="utf-8")
    return Preset(name, path, values["description"], user=True)


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
