"""Metric sinks: metrics.jsonl always; Weights & Biases and TensorBoard when the config names them."""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Callable, Optional

from . import notices


def _step_of(line: str) -> Optional[int]:
    """The step of a metrics line; None for a line cut short when the process was killed mid-write."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """metrics.jsonl, one object per logged step. On resume, lines past the checkpoint's step are dropped
    so the file continues with no gaps and no duplicate steps."""

    def __init__(self, path: Path, resume_step: Optional[int] = None):
        self.path = path
        if resume_step is not None and path.is_file():
            kept = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines()
                    if _step_of(line) is not None and _step_of(line) <= resume_step]
            # A new file renamed over the old one: a kill during the rewrite leaves the whole history.
            temp = path.with_name(f".{path.name}.tmp")
            temp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
            os.replace(temp, path)
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _reason(error: Exception) -> str:
    """The error on one line: some libraries (W&B's settings validation) raise messages of several lines."""
    return f"{error.__class__.__name__}: {' '.join(str(error).split())}"


LOGGER_NAMES = {"wandb_run": "W&B", "tensorboard": "TensorBoard"}


class ExternalLoggers:
    """W&B and TensorBoard. Both are side tasks: one that cannot start, or that fails while the run writes to
    it, is one warning naming it, and the run goes on without it (metrics.jsonl still gets every record)."""

    def __init__(self, config, run_dir: Path, resolved_config: dict):
        self.wandb_run = None
        self.tensorboard = None
        self.log_samples = False
        if config.loggers.wandb is not None:
            options = dict(config.loggers.wandb)
            self.log_samples = bool(options.pop("sample", False))
            known = {k: options[k] for k in ("entity", "name", "tags", "notes", "group", "mode") if k in options}

            def start_wandb():
                import wandb

                return wandb.init(project=config.project, dir=str(run_dir), config=resolved_config,
                                  id=run_dir.name, resume="allow", **known)

            self.wandb_run = self._start("wandb_run", start_wandb)
        if config.loggers.tensorboard is not None:
            def start_tensorboard():
                from torch.utils.tensorboard import SummaryWriter

                return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

            self.tensorboard = self._start("tensorboard", start_tensorboard)

    @staticmethod
    def _start(attribute: str, start: Callable):
        try:
            return start()
        except Exception as error:  # a bad setting, a blocked folder, a missing package: none ends the run
            notices.warn(f"{LOGGER_NAMES[attribute]} logging is off for this run: it could not start "
                         f"({_reason(error)}); metrics.jsonl still gets every metric")
            return None

    def _use(self, attribute: str, work: Callable) -> None:
        """work(logger) unless the logger is off. The first failure turns it off with a warning, so a logger
        that broke mid-run (a full disk, a lost connection) is one warning, not one per logged step."""
        logger = getattr(self, attribute)
        if logger is None:
            return
        try:
            work(logger)
        except Exception as error:  # whatever the library raises, the run goes on
            setattr(self, attribute, None)
            notices.warn(f"{LOGGER_NAMES[attribute]} logging failed and is off from here on ({_reason(error)}); "
                         f"metrics.jsonl still gets every metric")
            with contextlib.suppress(Exception):  # it is broken already: releasing its files is all that is left
                _close(logger)

    def log(self, record: dict) -> None:
        step = record["step"]
        self._use("wandb_run", lambda run: run.log({k: v for k, v in record.items() if k != "step"}, step=step))
        self._use("tensorboard", lambda writer: _add_scalars(writer, record))

    def log_images(self, step: int, paths: list[str]) -> None:
        if self.log_samples:
            def upload(run):
                import wandb

                run.log({"samples": [wandb.Image(p) for p in paths]}, step=step)

            self._use("wandb_run", upload)

    def close(self) -> None:
        self._use("wandb_run", _close)
        self._use("tensorboard", _close)


def _close(logger) -> None:
    if hasattr(logger, "finish"):  # a W&B run
        logger.finish()
    else:
        logger.close()


def _add_scalars(writer, record: dict) -> None:
    step = record["step"]
    for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
            # val_loss and val_loss_t<T> become validation/loss and validation/loss_t<T>
            tag = f"validation/{key[4:]}" if key.startswith("val_") else f"train/{key}"
            writer.add_scalar(tag, value, step)
