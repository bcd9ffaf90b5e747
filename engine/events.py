"""Typed events a job puts on its queue; the CLI's progress bar and the GUI consume the same stream."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import ClassVar, Optional


@dataclass
class Event:
    kind: ClassVar[str] = "event"

    def to_dict(self) -> dict:
        return {"kind": self.kind, **asdict(self)}


@dataclass
class Started(Event):
    kind: ClassVar[str] = "started"
    run_dir: str = ""
    total_steps: int = 0
    start_step: int = 0


@dataclass
class Step(Event):
    kind: ClassVar[str] = "step"
    step: int = 0
    epoch: int = 0
    loss: float = 0.0
    lr: float = 0.0
    it_per_s: float = 0.0
    eta_s: float = 0.0
    total_steps: int = 0


@dataclass
class Validation(Event):
    """A validation round after an optimizer step: val_loss, the mean over images and timesteps."""
    kind: ClassVar[str] = "validation"
    step: int = 0
    loss: float = 0.0
    per_timestep: dict = field(default_factory=dict)  # str(timestep) -> mean loss (JSON keeps keys as strings)


@dataclass
class Progress(Event):
    """Progress of a job that is not a training run (class image generation, conversion)."""
    kind: ClassVar[str] = "progress"
    done: int = 0
    total: int = 0
    eta_s: float = 0.0


@dataclass
class Sample(Event):
    kind: ClassVar[str] = "sample"
    step: int = 0
    paths: list = field(default_factory=list)


@dataclass
class Image(Event):
    kind: ClassVar[str] = "image"
    path: str = ""


@dataclass
class CheckpointSaved(Event):
    kind: ClassVar[str] = "checkpoint"
    step: int = 0
    path: str = ""


@dataclass
class Log(Event):
    kind: ClassVar[str] = "log"
    level: str = "info"
    message: str = ""


@dataclass
class Finished(Event):
    kind: ClassVar[str] = "finished"
    run_dir: str = ""
    step: int = 0
    stopped: bool = False
    summary: Optional[dict] = None


@dataclass
class Failed(Event):
    kind: ClassVar[str] = "failed"
    error: str = ""
    run_dir: str = ""
    user_error: bool = False  # a mistake the user can fix (config, paths), as opposed to an engine fault


_BY_KIND = {cls.kind: cls for cls in Event.__subclasses__()}


def event_from_dict(values: dict) -> Event:
    """The event that to_dict() turned into values: how a parent process reads a child's --json-events.

    Raises ValueError for a kind or a field this engine does not know, so that a line from another program
    or another engine version is never mistaken for an event.
    """
    fields = dict(values)
    kind = fields.pop("kind", None)
    cls = _BY_KIND.get(kind)
    if cls is None:
        raise ValueError(f"unknown event kind {kind!r}")
    try:
        return cls(**fields)
    except TypeError as error:
        raise ValueError(f"{kind} event: {error}") from None
