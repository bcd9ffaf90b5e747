"""Previous runs under an output folder (output_dir/project/run_id), their checkpoints and how they ended."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import yaml

RUNNING = "running"
FINISHED = "finished"
STOPPED = "stopped"
# No checkpoint says the run ended: it failed, was killed, or stopped without saving.
ENDED_EARLY = "ended early"


@dataclass(frozen=True)
class Run:
    path: Path
    checkpoints: tuple[Path, ...]
    outcome: str = ""

    @property
    def label(self) -> str:
        newest = self.checkpoints[-1].name if self.checkpoints else "no checkpoint"
        return f"{self.path.parent.name}/{self.path.name} ({newest}, {self.outcome})"


def outcome(run_path: Path, found: tuple[Path, ...]) -> str:
    """How a run ended, from what its folder records: the newest checkpoint's reason ('end' or 'stop'), or,
    where the end of the run fell on a periodic checkpoint (which the end does not save again), its step or
    epoch against the limits in the run's config.yaml."""
    from engine.checkpoints import read_meta
    from engine.run_dir import RunDir

    if not found:
        return ENDED_EARLY
    try:
        meta = read_meta(found[-1])
    except (OSError, ValueError):
        return ENDED_EARLY
    reason = meta.get("reason")
    if reason in ("end", "stop"):
        return FINISHED if reason == "end" else STOPPED
    try:
        trainer = (yaml.safe_load(RunDir(run_path).config.read_text(encoding="utf-8")) or {}).get("trainer") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return ENDED_EARLY
    max_steps, max_epochs = trainer.get("max_steps"), trainer.get("max_epochs")
    if (isinstance(max_steps, int) and meta.get("step", 0) >= max_steps) or (
            isinstance(max_epochs, int) and meta.get("epoch", 0) >= max_epochs):
        return FINISHED
    return ENDED_EARLY


def list_runs(output_dir: str, active: Optional[str] = None) -> list[Run]:
    """Run folders (those with a config.yaml), newest first; the folder of the run in progress, when given
    as active, is marked running."""
    from engine import paths
    from engine.checkpoints import list_checkpoints
    from engine.run_dir import find_runs

    root = Path(paths.resolve(output_dir or "output"))
    if not root.is_dir():
        return []
    found = []
    for run in find_runs(root):
        saved = tuple(list_checkpoints(run.path))
        running = active and Path(active).resolve() == run.path.resolve()
        found.append(Run(run.path, saved, RUNNING if running else outcome(run.path, saved)))
    return found


def resumable(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.checkpoints]


def checkpoints(found: list[Run]) -> list[tuple[str, str]]:
    """(label, path) of every checkpoint of these runs, newest run first."""
    return [(f"{run.path.parent.name}/{run.path.name}/{checkpoint.name} ({run.outcome})", str(checkpoint))
            for run in found for checkpoint in reversed(run.checkpoints)]
