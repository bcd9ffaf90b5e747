"""Multi-process training through torchrun: process-group setup and the few collective operations the loop
needs. A single process (no WORLD_SIZE in the environment) uses none of this."""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from .errors import UserError


@dataclass
class Topology:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def world_size_from_environment() -> int:
    """How many processes train: torchrun says so in WORLD_SIZE; a plain start is one."""
    return int(os.environ.get("WORLD_SIZE", 1))


def process_count(devices: Any) -> int:
    """How many training processes trainer.devices asks for: -1 is every CUDA device, and without CUDA
    a number above 1 is that many CPU processes."""
    if isinstance(devices, bool) or not isinstance(devices, int) or devices == 0 or devices < -1:
        raise UserError("config key 'trainer.devices': expected a number of devices (1, 2, …) or -1 for every "
                        f"GPU, got {devices!r}")
    if devices == 1:
        return 1
    gpus = torch.cuda.device_count()
    if devices == -1:
        return max(gpus, 1)
    if gpus and devices > gpus:
        raise UserError(f"config key 'trainer.devices': {devices} devices asked for, but this machine has {gpus} "
                        "GPUs (-1 uses every GPU)")
    return devices


def torchrun_command(processes: int, config_file: Optional[str] = None, resume_dir: Optional[str] = None) -> list:
    """The command line that trains config_file (or resumes resume_dir) in `processes` processes, with the
    engine's events as JSON lines on stdout."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
               "-m", "engine", "train", "--json-events"]
    return command + (["--resume", str(resume_dir)] if resume_dir else ["--config", str(config_file)])


def init_from_environment(use_cuda: bool) -> Topology:
    """Join the process group torchrun describes in the environment: NCCL on CUDA, gloo on the CPU."""
    world_size = world_size_from_environment()
    topology = Topology(int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0)), world_size)
    if world_size > 1 and not dist.is_initialized():
        backend = "nccl" if use_cuda else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(topology.local_rank)
        dist.init_process_group(backend)
    return topology


def shutdown(topology: Topology) -> None:
    if topology.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(topology: Topology) -> None:
    if topology.distributed:
        dist.barrier()


def broadcast_from_main(topology: Topology, value: Any) -> Any:
    """Rank 0's value on every rank (run folder, seed)."""
    if not topology.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(topology: Topology, flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on one: all ranks stop at the same step."""
    if not topology.distributed:
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def mean_over_ranks(topology: Topology, value: float, device: torch.device) -> float:
    if not topology.distributed:
        return value
    tensor = torch.tensor([value], device=device, dtype=torch.float64)
    dist.all_reduce(tensor)
    return tensor.item() / topology.world_size


def wrap(model: torch.nn.Module, topology: Topology, device: torch.device) -> torch.nn.Module:
    if not topology.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids)


def main_first(topology: Topology, work: Callable[[], Any], then_others: bool = True) -> Any:
    """Run work on the main process while the other ranks wait, then (then_others) on the other ranks.

    Used for work whose results land on disk (class images, caches): the main process writes them once
    and the others find them done. A failure on the main process fails every rank with its message
    instead of leaving them waiting in the next collective.
    """
    result, error = None, None
    if topology.is_main:
        try:
            result = work()
        except Exception as caught:  # re-raised below once the other ranks know
            error = caught
    failure = broadcast_from_main(topology, None if error is None else str(error))
    if error is not None:
        raise error
    if failure is not None:
        raise UserError(f"stopped because the main process failed: {failure}")
    if not topology.is_main and then_others:
        result = work()
    return result
