"""Previous runs under an output folder (output_dir/project/run_id) and their checkpoints."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Run:
    path: Path
    checkpoints: tuple[Path, ...]

    @property
    def label(self) -> str:
        newest = self.checkpoints[-1].name if self.checkpoints else "no checkpoint"
        return f"{self.path.parent.name}/{self.path.name} ({newest})"


def list_runs(output_dir: str) -> list[Run]:
    """Run folders (those with a config.yaml), newest first."""
    from engine import paths
    from engine.checkpoints import list_checkpoints
    from engine.run_dir import find_runs

    root = Path(paths.resolve(output_dir or "output"))
    if not root.is_dir():
        return []
    return [Run(run.path, tuple(list_checkpoints(run.path))) for run in find_runs(root)]


def resumable(runs: list[Run]) -> list[Run]:
    return [run for run in runs if run.checkpoints]


def checkpoints(found: list[Run]) -> list[tuple[str, str]]:
    """(label, path) of every checkpoint of these runs, newest run first."""
    return [(f"{run.path.parent.name}/{run.path.name}/{checkpoint.name}", str(checkpoint))
            for run in found for checkpoint in reversed(run.checkpoints)]
