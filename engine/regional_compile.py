"""`compile: true`: regional compilation. torch.compile compiles the denoiser's repeated blocks (the classes its
diffusers model names in `_repeated_blocks`: a UNet's transformer blocks, a transformer's blocks), adapter
layers inside them included, rather than the whole model: one block's graph serves every block of its shapes,
so a run compiles a few graphs instead of one per layer. Where the step encodes its images (no latent cache),
the frozen VAE's convolutional encoder compiles whole too: without gradients its graph is one per image size.

Shapes are static (`dynamic=False`): each bucket's sizes compile once, on the first step that meets them. The
compiled kernels go to Inductor's on-disk caches under the app's cache folder, so a later run of the same model
and sizes compiles from there. `CompileClock` measures the seconds spent compiling, which the trainer reports
apart from the step time.
"""
from __future__ import annotations

import os
import time
from typing import Optional

import torch

from . import paths
from .config import ConfigError

# Dynamo's default recompile limit: all compiled blocks run one code object (Module._call_impl), so it counts
# every block shape of every size; 8 holds the distinct block shapes of one model at one size.
SHAPES_PER_SIZE = 8


def inductor_cache() -> str:
    return str(paths.cache_dir() / "inductor")


def refuse_unusable(device: torch.device) -> None:
    """Refuse `compile` where Inductor cannot build kernels for the device: Triton on CUDA, a C++ compiler on
    the CPU."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise ConfigError("config key 'compile': compiling for CUDA needs Triton, which is not installed "
                              "(on Windows: the triton-windows package); set compile to false")
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()  # Inductor's own search (the CXX variable, then g++, clang++; MSVC's cl on Windows)
    except Exception as error:  # each platform's search fails in its own way
        raise ConfigError(f"config key 'compile': compiling for the CPU needs a C++ compiler, and none was "
                          f"found ({error.__class__.__name__}: {error}); install one or set compile to "
                          f"false") from None


def allow_graphs(count: int) -> None:
    """Let Dynamo keep `count` graphs of the code all compiled modules share (Module._call_impl) before it runs
    them eagerly."""
    dynamo = torch._dynamo.config
    dynamo.recompile_limit = max(dynamo.recompile_limit, count)
    dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, count)


def compile_blocks(unet: torch.nn.Module) -> None:
    """Compile the denoiser's repeated blocks in place, shapes static, each making its tensor inputs contiguous
    first."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache()
    unet.compile_repeated_blocks(dynamic=False)  # diffusers' ModelMixin: block.compile() on each
    for block in compiled_blocks(unet):
        # Traced into the block's graph at its first call. A compiled block handed a non-contiguous view with a
        # batch of 1 (an SD1 UNet's blocks get proj_in's output permuted and reshaped) returned an input
        # gradient 12 % off.
        block.register_forward_pre_hook(_contiguous_inputs, with_kwargs=True)


def _contiguous_inputs(block: torch.nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    return (tuple(value.contiguous() if torch.is_tensor(value) else value for value in args),
            {name: value.contiguous() if torch.is_tensor(value) else value for name, value in kwargs.items()})


def compile_encoder(vae: torch.nn.Module) -> bool:
    """Compile the VAE's image encoder in place, shapes static, where it is diffusers' 2D `Encoder` (a video
    VAE's causal 3D encoder stays eager). True when compiled."""
    from diffusers.models.autoencoders.vae import Encoder

    encoder = getattr(vae, "encoder", None)
    if not isinstance(encoder, Encoder):
        return False
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache()
    encoder.compile(dynamic=False)
    return True


def compiled_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules of model that run compiled."""
    return [module for module in model.modules() if getattr(module, "_compiled_call_impl", None) is not None]


class CompileClock:
    """The seconds Dynamo and Inductor spend compiling (a lazily compiled backward included) while it is
    open; `take` returns those since the last take. Compilation callbacks are process-wide: one clock at a
    time."""

    def __init__(self):
        self.total = 0.0
        self.taken = 0.0
        self.started: Optional[float] = None

    def _start(self, args) -> None:
        self.started = time.perf_counter()

    def _end(self, args) -> None:
        if self.started is not None:
            self.total += time.perf_counter() - self.started
            self.started = None

    def __enter__(self) -> CompileClock:
        handler = torch._dynamo.callback_handler
        handler.register_start_callback(self._start)
        handler.register_end_callback(self._end)
        return self

    def __exit__(self, *exc) -> None:
        handler = torch._dynamo.callback_handler
        handler.remove_start_callback(self._start)
        handler.remove_end_callback(self._end)

    def take(self) -> float:
        seconds, self.taken = self.total - self.taken, self.total
        return seconds
