"""The layout of a run folder, output_dir/project/run_id/:

    config.yaml          the resolved config the run started with (its seed included)
    metrics.jsonl        one line per logged step
    samples/<step>/      the sampling rounds' images
    checkpoints/step-N/  complete checkpoints (each with meta.json); .tmp-step-N while being written
    converted/           files that `convert` wrote from the run's checkpoints

The engine and the app find these names here and nowhere else.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .paths import writable_folder

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class RunDir:
    path: Path

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    @property
    def converted(self) -> Path:
        return self.path / "converted"

    def samples(self, step: int) -> Path:
        return self.path / "samples" / f"{step:06d}"

    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / CONFIG_FILE).is_file()

    @classmethod
    def create(cls, output_dir: str, project: str) -> "RunDir":
        """A fresh run folder output_dir/project/run_id; an existing folder is never reused."""
        parent = writable_folder(Path(output_dir) / project, "output_dir")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        for attempt in range(1000):
            path = parent / (stamp if attempt == 0 else f"{stamp}-{attempt}")
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:
                continue
        raise UserError(f"cannot create a new run folder under {parent}")


def find_runs(output_dir: Path) -> list[RunDir]:
    """The run folders under output_dir (output_dir/project/run_id), newest first."""
    # config.yaml is written once when a run begins, so its time orders runs by start.
    configs = sorted(Path(output_dir).glob(f"*/*/{CONFIG_FILE}"), key=lambda c: c.stat().st_mtime, reverse=True)
    return [RunDir(config.parent) for config in configs]
