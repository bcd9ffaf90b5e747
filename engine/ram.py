"""System RAM of a run, estimated before it starts, beside the GPU estimate (`vram`).

Two moments hold the most host memory:
- loading: every component is read from disk into system memory, in the dtype it is loaded in
  (`load_dtype`), before any of them moves to the GPU;
- training: what stays in system memory while the steps run: the models that wait off the GPU because
  their outputs come from caches, EMA weights kept on the CPU, the pinned copies of the denoiser's blocks
  that wait on the CPU (`memory.blocks_on_cpu`) and the offloaded activations of a step
  (`memory.offload_activations`).
Both add the process's own memory (Python, PyTorch and the libraries, `PROCESS_GIB`). On a CPU-only run
nothing leaves system memory, so the training figure also holds the models and the step itself (the GPU
estimate's peak).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .config import Config
from .plan import RunPlan

GIB = 2**30
# Peak RSS of the engine's process after importing torch, diffusers, transformers and peft, before any
# model, measured on the CPU build (0.41 GiB); a CUDA build adds its runtime's libraries on top.
PROCESS_GIB = 0.4


@dataclass
class RamEstimate:
    loading: float
    training: float

    @property
    def peak(self) -> float:
        return max(self.loading, self.training)

    def lines(self) -> list[str]:
        return [f"system_ram_loading_gib: {self.loading:.3f}", f"system_ram_training_gib: {self.training:.3f}",
                f"system_ram_peak_gib: {self.peak:.3f}"]


def load_dtype(config: Config, component: str) -> torch.dtype:
    """The dtype a component is read from disk in: bf16 for weights the run keeps in bf16, fp8, int8 or nf4
    (trained models under weights_dtype: bf16, an adapter's base and the frozen text encoders under base_dtype),
    which so never exist in fp32; fp32 for the rest (the VAE always)."""
    if component == "vae":
        return torch.float32
    trained = component == "unet" or component in config.trained_text_encoders
    stored = config.base_dtype != "fp32" and (not trained or config.network.adapter)
    return torch.bfloat16 if stored or (trained and config.weights_dtype == "bf16") else torch.float32


def loading_gib(config: Config, components: dict[str, torch.nn.Module]) -> float:
    """System memory once every component (by name: unet, text_encoder[, text_encoder_2], vae) is read
    from disk, before setup adds adapters or stores weights."""
    total = sum(p.numel() * (load_dtype(config, name).itemsize if p.is_floating_point() else p.element_size())
                for name, module in components.items() for p in (*module.parameters(), *module.buffers()))
    return total / GIB + PROCESS_GIB


def training_gib(config: Config, plan: RunPlan, prepared: dict[str, torch.nn.Module], step_peak_gib: float,
                 features_gib: float = 0.0) -> float:
    """System memory while the steps run. `prepared`: the components as setup left them (stored dtypes,
    adapters); `step_peak_gib`: the step's device peak, which is system memory on a CPU-only run;
    `features_gib`: what the memory features keep there instead of on the GPU (the pinned copies of
    memory.blocks_on_cpu's blocks, a step's offloaded activations)."""
    resting = None if plan.device_type == "cpu" else resting_gib(config, plan, prepared)
    return training_figure(step_peak_gib, resting, features_gib)


def training_figure(step_peak_gib: float, resting: Optional[float], features_gib: float) -> float:
    """training_gib from its parts: `resting` (resting_gib) is None on a CPU-only run."""
    if resting is None:
        return step_peak_gib + PROCESS_GIB
    return resting + features_gib + PROCESS_GIB


def resting_gib(config: Config, plan: RunPlan, prepared: dict[str, torch.nn.Module]) -> float:
    """System memory of the models that wait off the GPU while the steps run, and of EMA weights on the CPU."""
    resting = [name for name in prepared if (name == "vae" and plan.vae_off_device)
               or (name.startswith("text_encoder") and plan.text_encoder_off_device)]
    total = sum(p.numel() * p.element_size() for name in resting
                for p in (*prepared[name].parameters(), *prepared[name].buffers()))
    if config.ema.enabled and config.ema.on_cpu:
        total += sum(p.numel() * 4 for name, model in prepared.items() if name != "vae"
                     for p in model.parameters() if p.requires_grad)
    return total / GIB
