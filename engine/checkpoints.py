"""Run folders and checkpoints: written to a temporary folder and renamed, so a kill never leaves a
half-written checkpoint where a valid one is expected."""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .errors import UserError
from .run_dir import RunDir

CHECKPOINT_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
META_FILE = "meta.json"
STATE_FILE = "training_state.pt"


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:08d}"


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. Leftover temporary folders are not checkpoints."""
    folder = RunDir(Path(run_dir)).checkpoints
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.name.startswith(CHECKPOINT_PREFIX) and (p / META_FILE).is_file()]
    return sorted(found, key=lambda p: p.name)


def clean_partial(run_dir: Path) -> list[Path]:
    """Remove the remains of writes that were interrupted; returns what was removed."""
    folder = RunDir(Path(run_dir)).checkpoints
    removed = []
    if folder.is_dir():
        for p in folder.iterdir():
            if p.name.startswith(TEMP_PREFIX) or (p.name.startswith(CHECKPOINT_PREFIX)
                                                  and not (p / META_FILE).is_file()):
                shutil.rmtree(p, ignore_errors=True)
                removed.append(p)
    return removed


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def save_checkpoint(run_dir: Path, step: int, models: dict, state: dict, meta: dict, keep: int,
                    extra: Optional[Callable[[Path], None]] = None) -> Path:
    """Write models (name -> an object with save_pretrained), the training state and what `extra` writes
    into the folder; prune to the `keep` newest.

    meta.json is written last inside the temporary folder and the folder is renamed into place, so a
    checkpoint with meta.json is complete.
    """
    folder = RunDir(Path(run_dir)).checkpoints
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / checkpoint_name(step)
    temp = folder / f"{TEMP_PREFIX}{final.name}"
    if temp.exists():
        shutil.rmtree(temp)
    temp.mkdir()
    for name, model in models.items():
        model.save_pretrained(temp / name)  # diffusers and EMAModel default to safetensors
    torch.save(state, temp / STATE_FILE)
    if extra is not None:
        extra(temp)
    (temp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=1), encoding="utf-8")
    if final.exists():
        shutil.rmtree(final)
    os.replace(temp, final)
    if keep >= 0:
        # save_top_k 0 still keeps the newest: a run never loses its only valid checkpoint.
        for old in list_checkpoints(run_dir)[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_meta(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / META_FILE).read_text(encoding="utf-8"))


def load_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def load_model_weights(model, checkpoint: Path, name: str) -> None:
    from safetensors.torch import load_file

    folder = Path(checkpoint) / name
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {checkpoint} has no weights for {name}")
    state = {}
    for file in files:
        state.update(load_file(file))
    model.load_state_dict(state)


STATE_VERSION = 1


@dataclass
class TrainState:
    """Where a run stands; saved with every checkpoint and restored exactly on resume."""
    step: int = 0
    epoch: int = 0
    position: int = 0        # micro-batches of the current epoch already trained
    overflow_steps: int = 0  # fp16 steps skipped for inf/NaN gradients

    def advance(self, micro_batches: int, batches_per_epoch: int) -> bool:
        """Count one optimizer step over micro_batches; True when it completed an epoch."""
        self.step += 1
        self.position += micro_batches
        if self.position < batches_per_epoch:
            return False
        self.epoch, self.position = self.epoch + 1, 0
        return True

    def to_dict(self) -> dict:
        return {"version": STATE_VERSION, "global_step": self.step, "overflow_steps": self.overflow_steps,
                "sampler": {"epoch": self.epoch, "position": self.position}}

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainState":
        return cls(step=saved["global_step"], epoch=saved["sampler"]["epoch"],
                   position=saved["sampler"]["position"], overflow_steps=saved.get("overflow_steps", 0))


def rng_states(device: torch.device) -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def restore_rng_states(states: dict, device: torch.device) -> None:
    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if device.type == "cuda" and states.get("cuda") is not None:
        torch.cuda.set_rng_state(states["cuda"], device)
