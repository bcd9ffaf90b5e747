"""Metric sinks: metrics.jsonl always; Weights & Biases and TensorBoard when the config names them."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional


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
            path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class ExternalLoggers:
    def __init__(self, config, run_dir: Path, resolved_config: dict):
        self.wandb_run = None
        self.tensorboard = None
        self.log_samples = False
        if config.loggers.wandb is not None:
            import wandb

            options = dict(config.loggers.wandb)
            self.log_samples = bool(options.pop("sample", False))
            known = {k: options[k] for k in ("entity", "name", "tags", "notes", "group", "mode") if k in options}
            self.wandb_run = wandb.init(project=config.project, dir=str(run_dir), config=resolved_config,
                                        id=run_dir.name, resume="allow", **known)
        if config.loggers.tensorboard is not None:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def log(self, record: dict) -> None:
        step = record["step"]
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if k != "step"}, step=step)
        if self.tensorboard is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    # val_loss and val_loss_t<T> become validation/loss and validation/loss_t<T>
                    tag = f"validation/{key[4:]}" if key.startswith("val_") else f"train/{key}"
                    self.tensorboard.add_scalar(tag, value, step)

    def log_images(self, step: int, paths: list[str]) -> None:
        if self.wandb_run is not None and self.log_samples:
            import wandb

            self.wandb_run.log({"samples": [wandb.Image(p) for p in paths]}, step=step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
