"""Training on several devices from the app: torchrun runs one engine process per device in a child
process, and rank 0's JSON events come back through child_job. One device trains in the app's process."""
from __future__ import annotations

import os
import queue
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

from engine import config as schema
from engine.errors import UserError

from .child_job import STOP_GRACE_S, ChildTraining

ROOT = Path(__file__).resolve().parent.parent


def process_count(devices: Any) -> int:
    """How many training processes trainer.devices asks for: -1 is every CUDA device, and without CUDA
    a number above 1 is that many CPU processes."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices == 0 or devices < -1:
        raise UserError("config key 'trainer.devices': expected a number of devices (1, 2, …) or -1 for every "
                        f"GPU, got {devices!r}")
    if devices == 1:
        return 1
    import torch

    gpus = torch.cuda.device_count()
    if devices == -1:
        return max(gpus, 1)
    if gpus and devices > gpus:
        raise UserError(f"config key 'trainer.devices': {devices} devices asked for, but this machine has {gpus} "
                        "GPUs (-1 uses every GPU)")
    return devices


def torchrun_training(event_queue: queue.Queue, processes: int, config: schema.Config,
                      resume_dir: Optional[str] = None) -> ChildTraining:
    """The job that trains config (or resumes the run in resume_dir, whose config it is) on processes devices."""
    _build_demo_assets(config)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "engine", "train", "--json-events"]
    files = []
    if resume_dir:
        command += ["--resume", str(resume_dir)]
    else:
        handle, name = tempfile.mkstemp(prefix="scal-sdt-config-", suffix=".yaml")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(schema.dump_yaml(config))
        command += ["--config", name]
        files.append(Path(name))
    env = {**os.environ,
           # the engine package is found wherever the app was started from
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           # torchrun kills the ranks this long after forwarding a stop (30 s by default: too short for
           # saving a full model's checkpoint)
           "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(int(STOP_GRACE_S))}
    return ChildTraining(command, event_queue, env=env, files=files)


def _build_demo_assets(config: schema.Config) -> None:
    """`demo:` assets are built on first use: once here, not by every rank writing the same files at once."""
    from engine import paths

    concepts = config.data.concepts
    for path in (config.model, config.vae, config.tokenizer, *(c.instance_set.path for c in concepts),
                 *(c.class_set.path for c in concepts if c.class_set is not None)):
        if path:
            paths.resolve(path)
