"""Training on several devices from the app: torchrun runs one engine process per device in a child
process, and rank 0's JSON events come back through child_job. One device trains in the app's process."""
from __future__ import annotations

import os
import queue
import tempfile
from pathlib import Path
from typing import Optional

from engine import config as schema

from .child_job import STOP_GRACE_S, ChildTraining

ROOT = Path(__file__).resolve().parent.parent


def torchrun_training(event_queue: queue.Queue, processes: int, config: schema.Config,
                      resume_dir: Optional[str] = None) -> ChildTraining:
    """The job that trains config (or resumes the run in resume_dir, whose config it is) on processes devices."""
    from engine.distributed import torchrun_command  # torch: loaded with the job, not with the page
    from engine.plan import refuse_for_processes

    _build_demo_assets(config)
    refuse_for_processes(config, processes)  # the engine would refuse too, but only after torchrun started
    files = []
    if resume_dir:
        command = torchrun_command(processes, resume_dir=resume_dir)
    else:
        handle, name = tempfile.mkstemp(prefix="scal-sdt-config-", suffix=".yaml")
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(schema.dump_yaml(config))
        command = torchrun_command(processes, config_file=name)
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
