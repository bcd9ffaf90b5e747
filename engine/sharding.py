"""trainer.strategy fsdp: the denoiser of a full fine-tune sharded over the training processes with PyTorch's
FSDP2, and its weights and optimizer state gathered into (and spread back from) the layout a single process
saves, so that checkpoints are the same files whatever the strategy and process count."""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from .block_swap import repeated_blocks

# Whole tensors, in the main process's system memory only: what the main process writes.
GATHERED = StateDictOptions(full_state_dict=True, cpu_offload=True)
# Whole tensors given to every process, each of which keeps its own shard of them.
WHOLE = StateDictOptions(full_state_dict=True)


def shard(unet: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Shard each repeated block (gathered whole only while it runs), then what remains at the root (the
    embeddings, the mid block, the output layers), over every process of the group. The module is changed in
    place; its parameters become DTensors holding this process's shard, which FSDP moves to `device` a block
    at a time: the denoiser arrives from system memory and no device ever holds it whole. Gradients are reduced
    to shards after every backward pass, also within an accumulation group (there is no no_sync), so that no
    whole set of them waits on a device."""
    # FSDP2 warns of each module that returns a view, in case an in-place op on it skipped its hook. Diffusers'
    # denoisers never change a block's output in place (Flux's blocks return slices of one tensor), which the
    # tests hold to by comparing the sharded run with one process. A lasting filter, as the warning comes at
    # every step and catch_warnings would swap process-wide state under the app's other threads.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    # the run's own device type: FSDP's default is the machine's accelerator, also for a run on the CPU
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in repeated_blocks(unet):
        fully_shard(block, mesh=mesh)
    fully_shard(unet, mesh=mesh)
    return unet


class GatheredModel:
    """A sharded model's save_pretrained writing its gathered weights: the model's own writer (its config, its
    file names and shards), handed the whole tensors in place of its sharded state dict."""

    def __init__(self, model: torch.nn.Module, weights: dict):
        self.model, self.weights = model, weights

    def save_pretrained(self, folder: Path) -> None:
        # an attribute of the instance, which the writer's self.state_dict() finds before the class's method
        self.model.state_dict = lambda *args, **kwargs: self.weights
        try:
            self.model.save_pretrained(folder)
        finally:
            del self.model.state_dict


def gathered_weights(model: torch.nn.Module) -> dict:
    """The whole weights on the main process ({} on the others); every process must call it."""
    return get_model_state_dict(model, options=GATHERED)


def gathered_optimizer_state(model: torch.nn.Module, optimizer) -> dict:
    """The optimizer's state on the main process as optimizer.state_dict() gives it in one process: parameters
    numbered in the order of the optimizer's groups ({} on the others); every process must call it."""
    named = get_optimizer_state_dict(model, optimizer, options=GATHERED)
    if not named:
        return {}
    order = {name: index for index, name in enumerate(name for group in named["param_groups"]
                                                       for name in group["params"])}
    return {"state": {order[name]: value for name, value in named["state"].items()},
            "param_groups": [{**group, "params": [order[name] for name in group["params"]]}
                             for group in named["param_groups"]]}


def load_weights(model: torch.nn.Module, weights: dict) -> None:
    """Whole weights (a checkpoint's), of which each process keeps its shard."""
    set_model_state_dict(model, weights, options=WHOLE)


def load_optimizer_state(model: torch.nn.Module, optimizer, saved: dict) -> None:
    """A state saved by optimizer.state_dict() in one process, or by gathered_optimizer_state, of which each
    process keeps its shard."""
    names = {param: name for name, param in model.named_parameters()}
    order = [names[param] for group in optimizer.param_groups for param in group["params"]]
    named = {"state": {order[index]: value for index, value in saved["state"].items()},
             "param_groups": [{**group, "params": [order[index] for index in group["params"]]}
                              for group in saved["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, named, options=WHOLE)


def local_bytes(model: torch.nn.Module) -> int:
    """The bytes of this process's shards of the model's trained parameters."""
    return sum(param.to_local().nbytes for param in model.parameters() if param.requires_grad)
