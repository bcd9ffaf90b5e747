"""Optimizers and learning-rate schedules from the config's names (the seed's class paths or short names)."""
from __future__ import annotations

import importlib
import math

import torch

from .config import Optimizer as OptimizerConfig
from .errors import UserError

OPTIMIZER_ALIASES = {
    "adamw": "torch.optim.AdamW",
    "adam": "torch.optim.Adam",
    "sgd": "torch.optim.SGD",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "adamw_8bit": "bitsandbytes.optim.AdamW8bit",
    "bnb.optim.adamw8bit": "bitsandbytes.optim.AdamW8bit",
}
DIFFUSERS_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                       "constant_with_warmup")


def _import_class(path: str, key: str):
    module_name, _, class_name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"config key '{key}': cannot import {path!r}") from None


def scaled_lr(config: OptimizerConfig, effective_batch: int) -> float:
    lr = config.params.lr
    if not config.lr_scale.enabled:
        return lr
    if config.lr_scale.method == "linear":
        return lr * effective_batch
    return lr * math.sqrt(effective_batch)


def build_optimizer(config: OptimizerConfig, params, lr: float) -> torch.optim.Optimizer:
    path = OPTIMIZER_ALIASES.get(config.name.lower(), config.name)
    cls = _import_class(path, "optimizer.name")
    p = config.params
    kwargs = {"lr": lr, "weight_decay": p.weight_decay}
    if cls is not torch.optim.SGD:
        kwargs.update(betas=(p.beta1, p.beta2), eps=p.eps)
    try:
        return cls(params, **kwargs)
    except TypeError as error:
        raise UserError(f"config key 'optimizer.params': {path} does not accept these parameters: {error}") from None


def build_scheduler(config: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """Diffusers' named schedules take warmup directly; torch scheduler classes get a warmup prepended.

    Schedules advance once per optimizer step, so step counts in scheduler params are optimizer steps.
    """
    sched = config.lr_scheduler
    warmup_steps = sched.warmup.steps if sched.warmup.enabled else 0
    name = sched.name
    if name in DIFFUSERS_SCHEDULES:
        from diffusers.optimization import get_scheduler

        if warmup_steps and name == "constant":
            name = "constant_with_warmup"
        kwargs = dict(sched.params)
        if name == "cosine_with_restarts" and "num_cycles" in kwargs:
            kwargs["num_cycles"] = int(kwargs["num_cycles"])
        try:
            return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps,
                                 num_training_steps=total_steps, **kwargs)
        except TypeError as error:
            raise UserError(f"config key 'optimizer.lr_scheduler.params': {error}") from None
    if "." not in name:
        raise UserError(f"config key 'optimizer.lr_scheduler.name': expected one of "
                        f"{', '.join(DIFFUSERS_SCHEDULES)} or a torch scheduler class path, got {name!r}")
    cls = _import_class(name, "optimizer.lr_scheduler.name")
    params = dict(sched.params)
    params.pop("last_epoch", None)  # the seed's templates carried it; resuming restores the state instead
    if cls is torch.optim.lr_scheduler.CosineAnnealingLR:
        params.setdefault("T_max", max(1, total_steps - warmup_steps))
    for key in ("eta_min", "gamma", "start_factor", "end_factor", "factor"):
        if isinstance(params.get(key), str):
            params[key] = float(params[key])
    try:
        main = cls(optimizer, **params)
    except TypeError as error:
        raise UserError(f"config key 'optimizer.lr_scheduler.params': {error}") from None
    if not warmup_steps:
        return main
    base_lr = optimizer.param_groups[0]["initial_lr"]
    start_factor = max(sched.warmup.init_lr / base_lr, 1e-12)
    if sched.warmup.strategy == "constant":
        warmup = torch.optim.lr_scheduler.ConstantLR(optimizer, factor=start_factor, total_iters=warmup_steps)
    else:
        warmup = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=start_factor, end_factor=1.0,
                                                   total_iters=warmup_steps)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
