"""Run folders and checkpoints: written to a temporary folder and renamed, so a kill never leaves a
half-written checkpoint where a valid one is expected."""
from __future__ import annotations

import errno
import json
import os
import random
import shutil
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .errors import UserError
from .run_dir import RunDir

CHECKPOINT_PREFIX = "step-"
TEMP_PREFIX = ".tmp-"
DAMAGED_PREFIX = "damaged-"
META_FILE = "meta.json"
STATE_FILE = "training_state.pt"
# A full disk, or a full quota (which Windows does not have)
DISK_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


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


def damage(checkpoint: Path) -> Optional[str]:
    """What is wrong with a checkpoint's files, or None when it verifies. Cheap: the files it must hold are
    there, meta.json parses, the training state is a whole zip archive, and each safetensors file is as long
    as its header says. A disk that failed or filled up after the rename can leave any of these broken."""
    checkpoint = Path(checkpoint)
    try:
        meta = json.loads((checkpoint / META_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        return f"{META_FILE} is unreadable ({error.__class__.__name__})"
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int):
        return f"{META_FILE} names no step"
    if not (checkpoint / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    if not zipfile.is_zipfile(checkpoint / STATE_FILE):
        return f"{STATE_FILE} is cut short"
    for name in meta.get("trained", []):
        if not (checkpoint / name).is_dir():
            return f"the weights of {name} are missing"
    for file in sorted(checkpoint.rglob("*.safetensors")):
        problem = _safetensors_damage(file)
        if problem:
            return f"{file.relative_to(checkpoint)} {problem}"
    return None


def _safetensors_damage(file: Path) -> Optional[str]:
    """A safetensors file is an 8-byte header length, a JSON header of tensor offsets, then the data."""
    size = file.stat().st_size
    with open(file, "rb") as handle:
        start = handle.read(8)
        if len(start) < 8:
            return "is cut short"
        (header_size,) = struct.unpack("<Q", start)
        if 8 + header_size > size:
            return "is cut short"
        try:
            header = json.loads(handle.read(header_size))
            ends = [entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"]
        except (ValueError, AttributeError, KeyError, IndexError, TypeError):  # not JSON, or not offsets
            return "has an unreadable header"
    if 8 + header_size + max(ends, default=0) != size:
        return f"is {size} bytes where its header describes {8 + header_size + max(ends, default=0)}"
    return None


def newest_intact(run_dir: Path) -> Optional[Path]:
    """The newest checkpoint that verifies."""
    return next((c for c in reversed(list_checkpoints(run_dir)) if damage(c) is None), None)


def set_aside_damaged(run_dir: Path) -> list[tuple[Path, str]]:
    """Rename the checkpoints newer than the newest intact one to damaged-step-N, out of the checkpoints a
    resume, the step loop and save_top_k see, but kept for whoever wants to look into them; returns each
    with what is wrong with it."""
    moved = []
    for checkpoint in reversed(list_checkpoints(run_dir)):
        problem = damage(checkpoint)
        if problem is None:
            break
        target = checkpoint.with_name(DAMAGED_PREFIX + checkpoint.name)
        shutil.rmtree(target, ignore_errors=True)  # one set aside at this step before
        checkpoint.rename(target)
        moved.append((checkpoint, problem))
    return moved


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
    previous = latest_checkpoint(run_dir)
    try:
        temp.mkdir()
        for name, model in models.items():
            model.save_pretrained(temp / name)  # diffusers and EMAModel default to safetensors
        torch.save(state, temp / STATE_FILE)
        if extra is not None:
            extra(temp)
        (temp / META_FILE).write_text(json.dumps({**meta, "step": step}, indent=1), encoding="utf-8")
    except BaseException as error:
        # The partial files would only take space that the next try needs.
        shutil.rmtree(temp, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in DISK_FULL:
            need = _folder_bytes(previous) if previous is not None else _tensor_bytes([models, state])
            raise UserError(f"the disk is full: checkpoint {final.name} could not be written to {folder} (it "
                            f"needs about {_size(need)}, {_size(shutil.disk_usage(folder).free)} are free; older "
                            f"checkpoints are removed only after a new one is written, so free that much space)"
                            ) from None
        raise
    if final.exists():
        shutil.rmtree(final)
    os.replace(temp, final)
    if keep >= 0:
        # save_top_k 0 still keeps the newest: a run never loses its only valid checkpoint.
        for old in list_checkpoints(run_dir)[:-max(keep, 1)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def _tensor_bytes(value) -> int:
    """The bytes of the tensors in value (nested in dicts, lists and objects with a state_dict): about what a
    first checkpoint writes."""
    if isinstance(value, torch.Tensor):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(_tensor_bytes(v) for v in value)
    if callable(getattr(value, "state_dict", None)):
        return _tensor_bytes(value.state_dict())
    return 0


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count < 2**30 else f"{count / 2**30:.2f} GiB"


def read_meta(checkpoint: Path) -> dict:
    return json.loads((Path(checkpoint) / META_FILE).read_text(encoding="utf-8"))


def load_state(checkpoint: Path) -> dict:
    return torch.load(Path(checkpoint) / STATE_FILE, map_location="cpu", weights_only=False)


def read_model_weights(checkpoint: Path, name: str) -> dict:
    """The weights of the checkpoint's model `name`, from all its safetensors files."""
    from safetensors.torch import load_file

    folder = Path(checkpoint) / name
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"checkpoint {checkpoint} has no weights for {name}")
    state = {}
    for file in files:
        state.update(load_file(file))
    return state


def load_model_weights(model, checkpoint: Path, name: str) -> None:
    model.load_state_dict(read_model_weights(checkpoint, name))


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
