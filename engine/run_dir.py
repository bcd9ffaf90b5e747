"""The layout of a run folder, output_dir/project/run_id/:

    config.yaml          the resolved config (its seed included), with the changes a resume made
    .lock                locked by the process training the run (it names that process)
    metrics.jsonl        one line per logged step
    samples/<step>/      the sampling rounds' images
    checkpoints/step-N/  complete checkpoints (each with meta.json); .tmp-step-N while being written
    converted/           files that `convert` wrote from the run's checkpoints

The engine and the app find these names here and nowhere else.
"""
from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import UserError
from .paths import writable_folder

CONFIG_FILE = "config.yaml"
LOCK_FILE = ".lock"
# Windows locks are mandatory: the byte locked lies past the holder's name, which others must read.
WINDOWS_LOCK_OFFSET = 4096


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

    def update_config(self, text: str) -> None:
        """Replace config.yaml (after a resume changed it) atomically, keeping its time: find_runs orders runs
        by when they began."""
        times = self.config.stat()
        temp = self.path / f".{CONFIG_FILE}.tmp"
        temp.write_text(text, encoding="utf-8")
        os.utime(temp, ns=(times.st_atime_ns, times.st_mtime_ns))
        os.replace(temp, self.config)

    @staticmethod
    def is_run(path: Path) -> bool:
        return (Path(path) / CONFIG_FILE).is_file()

    def holds_nothing_trained(self) -> bool:
        """Whether the folder holds only what a run writes before it trains: its config, its lock and an
        empty metrics log."""
        for entry in self.path.iterdir():
            if entry.name in (CONFIG_FILE, LOCK_FILE):
                continue
            if entry == self.metrics and entry.stat().st_size == 0:
                continue
            return False
        return True

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


class RunLock:
    """The OS lock on a run folder's .lock file, held by the one process training it: two processes
    training one folder would write over each other's checkpoints and metrics. The OS releases it when the
    process ends, however it ends, so a killed run never leaves its folder locked.

    On POSIX it is a record lock (lockf), which forked children such as data-loader workers do not inherit:
    a worker that outlives its killed trainer for a moment must not keep the folder locked. Record locks do
    not exclude the process that holds them, and closing any handle on the file releases them, so this
    process's own locks are also kept in `_held` and checked before the file is opened."""

    _held: set[Path] = set()
    _guard = threading.Lock()

    def __init__(self, file: IO[bytes], folder: Path):
        self._file = file
        self._folder = folder

    @classmethod
    def acquire(cls, run_dir: Path) -> "RunLock":
        """Lock run_dir, or raise UserError naming the process that holds it."""
        folder = Path(run_dir).resolve()
        with cls._guard:
            if folder in cls._held:
                raise _in_use(run_dir, _holder())
            # "a+b" creates the file without emptying it: the holder's name stays readable until it is locked.
            file = open(folder / LOCK_FILE, "a+b")
            try:
                _lock(file)
            except OSError:
                file.seek(0)
                holder = file.read().decode("utf-8", errors="replace").strip() or "another process"
                file.close()
                raise _in_use(run_dir, holder) from None
            cls._held.add(folder)
        file.seek(0)
        file.truncate()
        file.write(f"{_holder()}\n".encode("utf-8"))
        file.flush()
        return cls(file, folder)

    @classmethod
    def is_held(cls, run_dir: Path) -> bool:
        """Whether a process (this one included) trains run_dir now."""
        try:
            cls.acquire(run_dir).release()
        except UserError:
            return True
        return False

    def release(self) -> None:
        with self._guard:
            if os.name == "nt":
                import msvcrt

                self._file.seek(WINDOWS_LOCK_OFFSET)
                msvcrt.locking(self._file.fileno(), msvcrt.LK_UNLCK, 1)
            self._file.close()  # on POSIX, closing the file releases its lock
            self._held.discard(self._folder)


def _holder() -> str:
    return f"process {os.getpid()} on {socket.gethostname()}"


def _in_use(run_dir: Path, holder: str) -> UserError:
    return UserError(f"{run_dir} is in use by {holder}: a run folder is trained by one process at a time; wait "
                     "for that one to end or stop it")


def _lock(file: IO[bytes]) -> None:
    """Lock file without waiting; OSError when another process holds it."""
    if os.name == "nt":
        import msvcrt

        file.seek(WINDOWS_LOCK_OFFSET)
        msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    else:
        import fcntl

        fcntl.lockf(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)


def find_runs(output_dir: Path) -> list[RunDir]:
    """The run folders under output_dir (output_dir/project/run_id), newest first."""
    # config.yaml is written when a run begins (a resume that changes it keeps its time): its time orders runs
    # by start.
    configs = sorted(Path(output_dir).glob(f"*/*/{CONFIG_FILE}"), key=lambda c: c.stat().st_mtime, reverse=True)
    return [RunDir(config.parent) for config in configs]
