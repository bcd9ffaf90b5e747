"""The run plan: what a config trains, how and where, decided once from the config and the topology.

The trainer, the caches, the VRAM estimator and the app read the plan; none of them re-derives a rule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from . import notices
from .config import PRECISIONS, Config, ConfigError, optimizer_path


@dataclass(frozen=True)
class RunPlan:
    device_type: str                   # "cuda" or "cpu"
    processes: int                     # training processes (torchrun ranks)
    autocast: Optional[torch.dtype]    # None: fp32 compute
    grad_scaler: bool                  # fp16 autocast needs loss scaling
    weights: torch.dtype               # of the trained models (an adapter's base); frozen ones stay in fp32
    rounded_weights: bool              # trained weights kept in bf16, written back with stochastic rounding
    adapter: str                       # "full" fine-tuning, or the LoRA-family network trained over it
    trained_text_encoders: tuple       # by diffusers name: text_encoder, and SDXL's text_encoder_2
    per_parameter: bool                # one optimizer per parameter (optim.PerParameterOptimizer)
    fused_backward: bool               # parameters step inside backward
    cache_latents: bool
    cache_text: bool
    fill_first_epoch: bool             # the caches are written by the first epoch's steps, read after it
    sharded: bool = False              # trainer.strategy fsdp: the denoiser sharded over the processes (FSDP2)

    @property
    def train_text_encoder(self) -> bool:
        return bool(self.trained_text_encoders)

    # A model whose outputs all come from a cache waits off the GPU (on a CPU there is no gain).
    @property
    def vae_off_device(self) -> bool:
        return self.cache_latents and self.device_type != "cpu"

    @property
    def text_encoder_off_device(self) -> bool:
        return self.cache_text and self.device_type != "cpu"


def latents_cacheable(config: Config) -> bool:
    # Random crops and augmentations give different pixels every epoch.
    return config.data.center_crop and not config.augment


def text_cacheable(config: Config) -> bool:
    # A trained encoder or captions that change every step give different embeddings every time.
    captions = config.captions
    return not config.trains_text_encoder and not captions.shuffle_tags and captions.tag_dropout == 0


def precision(config: Config, device_type: str) -> tuple[Optional[torch.dtype], bool]:
    """(autocast dtype or None, use a grad scaler) for training on device_type."""
    name = PRECISIONS[str(config.trainer.precision)]
    if config.weights_dtype == "bf16":
        name = "bfloat16"  # bf16 weights need bf16 compute
    if name is None:
        return None, False
    if device_type != "cuda" and name == "float16":
        notices.warn("fp16 mixed precision needs CUDA: training in fp32 on the CPU")
        return None, False
    dtype = getattr(torch, name)
    return dtype, dtype == torch.float16


# The optimizers whose step runs on FSDP's sharded parameters (DTensors): torch's own and those written in
# plain tensor operations. bitsandbytes' kernels, Adafactor's and CAME's factored states mix in plain tensors.
SHARDABLE_OPTIMIZERS = ("torch.optim.AdamW", "torch.optim.Adam", "torch.optim.SGD", "prodigyopt.Prodigy",
                        "schedulefree.AdamWScheduleFree")


def refuse_for_fsdp(config: Config, processes: int) -> None:
    """What trainer.strategy fsdp cannot shard, named by its key."""
    def refuse(key: str, why: str) -> None:
        raise ConfigError(f"config key '{key}': {why} with 'trainer.strategy: fsdp'; use strategy ddp")

    if processes < 2:
        refuse("trainer.strategy", f"fsdp shards over several training processes ({processes} was started); with "
                                   "one there is nothing to shard, start it through torchrun with 2 or more")
    if config.network.adapter:
        refuse("network.type", "fsdp shards a full fine-tune's weights, gradients and optimizer states; an "
                               "adapter's are small and its frozen base is what DDP with base_dtype saves")
    if config.trains_text_encoder:
        refuse("train_text_encoder", "fsdp shards the denoiser alone; the text encoder cannot train")
    if config.compile:
        refuse("compile", "fully_shard makes each transformer block a class of its own, which regional "
                          "compilation does not find; set it to false")
    if config.ema.enabled:
        refuse("ema.enabled", "the main process keeps the average from whole weights, which no process holds; "
                              "EMA cannot be kept")
    if config.weights_dtype == "bf16":
        refuse("weights_dtype", "bf16 weights step one whole parameter at a time; they cannot train")
    if optimizer_path(config.optimizer.name) not in SHARDABLE_OPTIMIZERS:
        refuse("optimizer.name", f"{config.optimizer.name} cannot step sharded parameters (these can: "
                                 f"{', '.join(name.rpartition('.')[2] for name in SHARDABLE_OPTIMIZERS)})")


def refuse_for_processes(config: Config, processes: int) -> None:
    """Rules that depend on how many processes train; the engine checks them against the real topology."""
    if processes > 1 and config.optimizer.fused_backward:
        raise ConfigError(f"config key 'optimizer.fused_backward': works in one training process only ({processes} "
                        "were started): each process would step on its own gradients, never averaged; set it "
                        "to false or train on one device")
    if processes > 1 and config.memory.blocks_on_cpu:
        raise ConfigError(f"config key 'memory.blocks_on_cpu': works in one training process only ({processes} "
                          "were started): DDP and FSDP keep each parameter on its device; set it to 0 or train on one "
                          "device")
    if config.trainer.strategy == "fsdp":
        refuse_for_fsdp(config, processes)


def make_plan(config: Config, device_type: str, processes: int = 1) -> RunPlan:
    refuse_for_processes(config, processes)
    autocast, scaler = precision(config, device_type)
    bf16 = config.weights_dtype == "bf16"
    rounded = bf16 and not config.network.adapter  # an adapter trains in fp32 over a frozen bf16 base
    return RunPlan(
        device_type=device_type, processes=processes, autocast=autocast, grad_scaler=scaler,
        weights=torch.bfloat16 if bf16 else torch.float32, rounded_weights=rounded,
        adapter=config.network.type,
        trained_text_encoders=config.trained_text_encoders,
        # bf16 weights that train need stochastic rounding, one parameter at a time
        per_parameter=config.optimizer.fused_backward or rounded,
        fused_backward=config.optimizer.fused_backward,
        cache_latents=config.cache.latents and latents_cacheable(config),
        cache_text=config.cache.text_embeddings and text_cacheable(config),
        fill_first_epoch=config.cache.fill == "first_epoch", sharded=config.trainer.strategy == "fsdp")
