"""Block swap (`memory.blocks_on_cpu`): the denoiser's last N repeated blocks wait in system memory and visit
the device one at a time.

Each swapped tensor (parameter or buffer) keeps a CPU copy, pinned when the device is a GPU. A forward
pre-hook puts a block's tensors on the device just before it runs and starts the copy of the next swapped
block on a side CUDA stream, so that it overlaps this block's compute; a forward post-hook takes the block off
again. Backward visits the blocks in reverse: a hook on a block's output gradient brings it back (and starts
the copy of the block before it), and the block is taken off once the backward of the block before it begins,
its own backward then being over (the last one when the whole backward ends). Moves set `tensor.data`
between block executions, as `Module.to()` does, so autograd's saved references to parameters follow them.

Frozen tensors travel only to the device: their CPU copy stays valid and the device copy is dropped. Trained
tensors that swap (a full fine-tune, whose optimizer steps inside backward) are copied back after their
block's backward; an adapter's own parameters never leave the device. `log` records where each swapped block
is at each of these moments. With the CPU as the device, blocks are copied all the same, so that the tests see
the moves of a GPU run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Optional

import torch

from .config import ConfigError


def repeated_blocks(unet: torch.nn.Module) -> list[torch.nn.Module]:
    """The denoiser's repeated blocks in the order its forward runs them: a Flux transformer's double-stream
    then single-stream blocks, Qwen-Image's blocks; a Z-Image transformer's main blocks (its small refiners stay
    on the device); a UNet's down then up blocks (its mid block stays on the device)."""
    if hasattr(unet, "transformer_blocks"):
        return [*unet.transformer_blocks, *getattr(unet, "single_transformer_blocks", ())]
    if hasattr(unet, "noise_refiner"):
        return [*unet.layers]
    return [*unet.down_blocks, *unet.up_blocks]


def swapped_blocks(unet: torch.nn.Module, count: int) -> list[torch.nn.Module]:
    """The last `count` repeated blocks; refuses more than the model has."""
    blocks = repeated_blocks(unet)
    check_count(len(blocks), count)
    return blocks[len(blocks) - count:] if count else []


def check_count(total: int, count: int) -> None:
    """Refuse swapping `count` blocks of a denoiser that has `total` repeated blocks, if more than it has."""
    if count > total:
        raise ConfigError(f"config key 'memory.blocks_on_cpu': this model has {total} blocks that can wait "
                          f"on the CPU, got {count}")


def move_except(model: torch.nn.Module, kept: list[torch.nn.Module], device: torch.device) -> None:
    """Move the model's tensors to device, except those of the modules in `kept`."""
    skip = {id(t) for module in kept for t in (*module.parameters(), *module.buffers())}
    for tensor in (*model.parameters(), *model.buffers()):
        if id(tensor) not in skip and tensor.device != device:
            tensor.data = tensor.data.to(device)


@dataclass
class Placement:
    """Where a swapped block was at one moment of a step."""
    moment: str      # "before forward", "after forward", "before backward", "after backward"
    block: int       # its index among repeated_blocks
    where: str       # "device": its tensors are the device copies; "cpu": the CPU copies; "mixed"
    resident: int    # swapped blocks on the device (or on their way) at that moment


@dataclass
class _Tensor:
    tensor: torch.Tensor
    cpu: torch.Tensor
    trained: bool


class BlockSwap:
    """Hooks that keep `blocks` (the swapped ones, by their index among all repeated blocks) off the device
    but while they run. `stays_trained`: trained tensors never leave the device (an adapter's)."""

    def __init__(self, blocks: dict[int, torch.nn.Module], device: torch.device, stays_trained: bool):
        self.device = device
        self.order = sorted(blocks)
        self.blocks = blocks
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.ready: dict[int, Optional[torch.cuda.Event]] = {}  # blocks on the device (their copy's event)
        self.backward_started: set[int] = set()
        self.log: list[Placement] = []  # the moves of the latest forward and its backward
        self.tensors: dict[int, list[_Tensor]] = {}
        for index, block in blocks.items():
            entries = []
            for tensor in (*block.parameters(), *block.buffers()):
                trained = tensor.requires_grad
                if trained and stays_trained:
                    tensor.data = tensor.data.to(device)
                if not _travels(tensor, stays_trained):
                    continue
                cpu = tensor.data.to("cpu")
                tensor.data = cpu.pin_memory() if self.cuda else cpu
                entries.append(_Tensor(tensor, tensor.data, trained))
            self.tensors[index] = entries
            block.register_forward_pre_hook(self._forward_pre_hook(index))
            block.register_forward_hook(self._forward_hook(index))

    # -- moves -------------------------------------------------------------------------------------------

    def _load(self, index: int) -> None:
        """Start copying block index to the device (on the side stream), unless it is there already."""
        if index in self.ready:
            return
        context = contextlib.nullcontext()
        if self.cuda:
            # the copy may read CPU copies that a copy back, queued on the compute stream, still writes
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            context = torch.cuda.stream(self.stream)
        with context:
            for entry in self.tensors[index]:
                # a copy even where the device is the CPU, so that a CPU run moves as a GPU run does
                entry.tensor.data = entry.cpu.to(self.device, non_blocking=True, copy=True)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.stream)
        self.ready[index] = event

    def _wait(self, index: int) -> None:
        """Make the compute stream wait for block index's copy, which it then owns."""
        event = self.ready[index]
        if event is not None:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(event)
            for entry in self.tensors[index]:
                entry.tensor.data.record_stream(stream)
            self.ready[index] = None

    def _unload(self, index: int, copy_back: bool) -> None:
        if index not in self.ready:
            return
        self._wait(index)
        for entry in self.tensors[index]:
            if copy_back and entry.trained and entry.tensor.data_ptr() != entry.cpu.data_ptr():
                entry.cpu.copy_(entry.tensor.data, non_blocking=self.cuda)
            entry.tensor.data = entry.cpu
        del self.ready[index]

    def _next(self, index: int, step: int) -> Optional[int]:
        position = self.order.index(index) + step
        return self.order[position] if 0 <= position < len(self.order) else None

    def _record(self, moment: str, index: int) -> None:
        # read from the tensors themselves: a device copy is never the CPU copy (on a CPU device too)
        copies = {entry.tensor.data_ptr() == entry.cpu.data_ptr() for entry in self.tensors[index]}
        where = "cpu" if copies == {True} else "device" if copies == {False} else "mixed"
        self.log.append(Placement(moment, index, where, len(self.ready)))

    # -- hooks -------------------------------------------------------------------------------------------

    @staticmethod
    def _in_backward() -> bool:
        # a backward pass is running: gradient checkpointing's recomputation of a block
        return torch._C._current_graph_task_id() != -1

    def _forward_pre_hook(self, index: int):
        def hook(module, args):
            recomputing = self._in_backward()
            if index == self.order[0] and not recomputing:
                self.log.clear()
            self._load(index)  # (a recomputed block is there already: its backward hook loaded it)
            self._wait(index)
            if recomputing:
                return
            following = self._next(index, 1)
            if following is not None:
                self._load(following)
            self._record("before forward", index)
        return hook

    def _forward_hook(self, index: int):
        def hook(module, args, output):
            if self._in_backward():
                return
            self._unload(index, copy_back=False)
            self._record("after forward", index)
            for tensor in _tensors(output):
                if tensor.requires_grad:
                    tensor.register_hook(self._backward_hook(index))
        return hook

    def _backward_hook(self, index: int):
        def hook(grad):
            if index in self.backward_started:
                return
            if not self.backward_started:
                torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            # blocks run later in the forward have finished their backward by now
            for done in [i for i in self.backward_started if i > index and i in self.ready]:
                self._unload(done, copy_back=True)
                self._record("after backward", done)
            self.backward_started.add(index)
            self._load(index)
            self._wait(index)
            previous = self._next(index, -1)
            if previous is not None:
                self._load(previous)
            self._record("before backward", index)
        return hook

    def _backward_done(self) -> None:
        for index in sorted(self.ready, reverse=True):
            self._unload(index, copy_back=True)
            if index in self.backward_started:
                self._record("after backward", index)
        self.backward_started.clear()
        if self.cuda and any(entry.trained for entries in self.tensors.values() for entry in entries):
            # the copies back are asynchronous: the CPU copies must be whole before a checkpoint or EMA reads them
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def trained_seen_on_device(self):
        """The trained tensors that wait on the CPU seen on the device without their bytes (empty): an
        optimizer state loaded meanwhile is put where their steps, on the device, will use it."""
        entries = [entry for index in self.order for entry in self.tensors[index] if entry.trained]
        for entry in entries:
            entry.tensor.data = torch.empty(0, dtype=entry.cpu.dtype, device=self.device)
        try:
            yield
        finally:
            for entry in entries:
                entry.tensor.data = entry.cpu

    def modules(self) -> list[torch.nn.Module]:
        return [self.blocks[index] for index in self.order]



def _travels(tensor: torch.Tensor, stays_trained: bool) -> bool:
    # the meta device holds a shape only (nf4 storage's weight): no bytes to move
    return tensor.device.type != "meta" and not (tensor.requires_grad and stays_trained)


def block_bytes(blocks: list[torch.nn.Module], stays_trained: bool) -> list[int]:
    """The bytes each block moves (and keeps a CPU copy of), as BlockSwap(blocks, ..., stays_trained) would."""
    return [sum(t.numel() * t.element_size() for t in (*block.parameters(), *block.buffers())
                if _travels(t, stays_trained)) for block in blocks]


def device_bytes_saved(sizes: list[int]) -> int:
    """Device memory a swap of blocks of these sizes (block_bytes) frees: all but the two largest, since two
    blocks are on the device at a time."""
    return sum(sorted(sizes, reverse=True)[2:])


def pipeline_to(pipeline, denoiser: torch.nn.Module, device: torch.device):
    """pipeline.to(device), except that a swapped denoiser's blocks stay in system memory: moving them all would
    put the whole model on the device at once."""
    swap = getattr(denoiser, "block_swap", None)
    if swap is None:
        return pipeline.to(device)
    for module in pipeline.components.values():
        if isinstance(module, torch.nn.Module) and module is not denoiser:
            module.to(device)
    move_except(denoiser, swap.modules(), device)
    return pipeline


def _tensors(output) -> list[torch.Tensor]:
    """The tensors of a block's output, nested tuples opened (a UNet down block's skip connections)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [tensor for item in output for tensor in _tensors(item)]
    return []


def apply(unet: torch.nn.Module, count: int, device: torch.device, stays_trained: bool) -> Optional[BlockSwap]:
    """Swap the unet's last `count` repeated blocks (already on the CPU, see move_except); None for 0."""
    if not count:
        return None
    blocks = repeated_blocks(unet)
    swapped = {index: block for index, block in enumerate(blocks) if index >= len(blocks) - count}
    return BlockSwap(swapped, device, stays_trained)
