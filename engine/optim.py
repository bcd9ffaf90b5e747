"""Optimizers and learning-rate schedules from the config's names (class paths or short names)."""
from __future__ import annotations

import contextlib
import importlib
import math
from typing import Iterator, Optional

import torch

from .config import Optimizer as OptimizerConfig
from .config import optimizer_path
from .errors import UserError

DIFFUSERS_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                       "constant_with_warmup")


def _import_class(path: str, key: str, kind: type):
    """The class at path, refused unless it is a `kind`: a config, perhaps from a shared page, names the class
    the trainer calls, so it must not reach any other callable."""
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError, ValueError):
        raise UserError(f"config key '{key}': cannot import {path!r}") from None
    if not (isinstance(cls, type) and issubclass(cls, kind)):
        raise UserError(f"config key '{key}': {path} is not a {kind.__module__}.{kind.__qualname__}")
    return cls


def scaled_lr(config: OptimizerConfig, effective_batch: int) -> float:
    lr = config.params.lr
    if not config.lr_scale.enabled:
        return lr
    if config.lr_scale.method == "linear":
        return lr * effective_batch
    return lr * math.sqrt(effective_batch)


def _hyperparameters(config: OptimizerConfig, name: str, lr: float) -> dict:
    """The arguments optimizer.params give the optimizer class `name` (README, Optimizers, lists them)."""
    p = config.params
    if name == "SGD":
        return {"lr": lr, "weight_decay": p.weight_decay}
    if "Lion" in name:  # Lion divides by nothing: no eps
        return {"lr": lr, "betas": (p.beta1, p.beta2), "weight_decay": p.weight_decay}
    if name == "Adafactor":
        # without a first moment (beta1) and with its own eps pair: Adafactor's memory-saving defaults
        if p.relative_step:
            return {"lr": None, "relative_step": True, "scale_parameter": True, "warmup_init": p.warmup_init,
                    "weight_decay": p.weight_decay}
        return {"lr": lr, "relative_step": False, "scale_parameter": False, "warmup_init": False,
                "weight_decay": p.weight_decay}
    if name == "CAME":  # its third beta (of the instability average) and eps pair keep their defaults
        return {"lr": lr, "betas": (p.beta1, p.beta2, 0.9999), "weight_decay": p.weight_decay}
    kwargs = {"lr": lr, "betas": (p.beta1, p.beta2), "eps": p.eps, "weight_decay": p.weight_decay}
    if name == "Prodigy":
        # the settings Prodigy's authors give for diffusion models
        kwargs.update(use_bias_correction=True, safeguard_warmup=True)
    elif "ScheduleFree" in name:
        # the configured warmup happens inside the optimizer, which replaces the schedule
        warmup = config.lr_scheduler.warmup
        kwargs["warmup_steps"] = warmup.steps if warmup.enabled else 0
    return kwargs


def _fusable(cls: type, params) -> bool:
    """Whether cls has torch's fused kernel (the whole update of a parameter in one pass over it, instead of
    a pass per operation; the same update to within float rounding) for every device the parameters are on."""
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if cls not in (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD):
        return False
    tensors = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return all(p.device.type in _get_fused_kernels_supported_devices() and p.is_floating_point() for p in tensors)


def build_optimizer(config: OptimizerConfig, params, lr: float) -> torch.optim.Optimizer:
    path = optimizer_path(config.name)
    cls = _import_class(path, "optimizer.name", torch.optim.Optimizer)
    params = list(params)
    kwargs = _hyperparameters(config, cls.__name__, lr)
    if _fusable(cls, params):
        kwargs["fused"] = True
    try:
        optimizer = cls(params, **kwargs)
    except TypeError as error:
        raise UserError(f"config key 'optimizer.params': {path} does not accept these parameters: {error}") from None
    if kwargs["lr"] is None:
        # Adafactor's relative step reads no learning rate; schedules and the per-parameter proxy need one
        for group in optimizer.param_groups:
            group["lr"] = lr
    return optimizer


def build_scheduler(config: OptimizerConfig, optimizer: torch.optim.Optimizer, total_steps: int):
    """The schedule named by optimizer.lr_scheduler (one of diffusers' named schedules or a torch scheduler
    class), after the configured warmup when there is one: warmup.steps from warmup.init_lr, held there
    (strategy constant) or rising linearly to the rate (linear), then the schedule over the remaining steps.

    Schedules advance once per optimizer step, so step counts in scheduler params are optimizer steps.
    """
    sched = config.lr_scheduler
    # a schedule-free optimizer warms up by itself (_hyperparameters)
    schedule_free = "ScheduleFree" in optimizer_path(config.name)
    warmup_steps = sched.warmup.steps if sched.warmup.enabled and not schedule_free else 0
    main = _main_schedule(sched, optimizer, max(1, total_steps - warmup_steps))
    if not warmup_steps:
        return main
    start = sched.warmup.init_lr / optimizer.param_groups[0]["initial_lr"]
    if sched.warmup.strategy == "constant":
        def factor(step: int) -> float:
            return start
    else:
        def factor(step: int) -> float:
            return start + (1 - start) * step / warmup_steps
    warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return torch.optim.lr_scheduler.SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])


def _main_schedule(sched, optimizer: torch.optim.Optimizer, steps: int):
    """The schedule itself, without warmup, over `steps` optimizer steps."""
    name = sched.name
    if name in DIFFUSERS_SCHEDULES:
        from diffusers.optimization import get_scheduler

        kwargs = dict(sched.params)
        if name == "cosine_with_restarts" and "num_cycles" in kwargs:
            kwargs["num_cycles"] = int(kwargs["num_cycles"])
        try:
            # the configured warmup comes before (build_scheduler): constant_with_warmup is constant here
            return get_scheduler(name, optimizer, num_warmup_steps=0, num_training_steps=steps, **kwargs)
        except TypeError as error:
            raise UserError(f"config key 'optimizer.lr_scheduler.params': {error}") from None
    if "." not in name:
        raise UserError(f"config key 'optimizer.lr_scheduler.name': expected one of "
                        f"{', '.join(DIFFUSERS_SCHEDULES)} or a torch scheduler class path, got {name!r}")
    cls = _import_class(name, "optimizer.lr_scheduler.name", torch.optim.lr_scheduler.LRScheduler)
    params = dict(sched.params)
    params.pop("last_epoch", None)  # earlier templates carried it; resuming restores the state instead
    if cls is torch.optim.lr_scheduler.CosineAnnealingLR:
        params.setdefault("T_max", steps)
    for key in ("eta_min", "gamma", "start_factor", "end_factor", "factor"):
        if isinstance(params.get(key), str):
            params[key] = float(params[key])
    try:
        return cls(optimizer, **params)
    except TypeError as error:
        raise UserError(f"config key 'optimizer.lr_scheduler.params': {error}") from None


def stochastic_round_to_bf16(values: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Round fp32 to bf16 up or down with probability proportional to the distance, so that small updates
    survive on average instead of being rounded away. bf16 is fp32 with the low 16 bits dropped: adding a
    uniform random 16-bit integer before dropping them rounds stochastically."""
    bits = values.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class PerParameterOptimizer:
    """One optimizer per parameter, so a parameter can be stepped on its own.

    fused=True steps each parameter from its post-accumulate-grad hook during backward and frees its
    gradient at once, so the full set of gradients never exists at the same time. The hooks step only
    while `armed` (the last micro-batch of an accumulation group); earlier micro-batches accumulate as
    usual, and `step()` has nothing left to do. Global-norm clipping needs every gradient at once and is
    not available in this mode; otherwise `step()` clips to clip_norm first.

    bf16_weights=True keeps the weights in bf16: each step runs on an fp32 copy of one parameter, which
    stands in for it in its optimizer (so the optimizer state is fp32 or 8-bit), and writes the result back
    into the parameter with stochastic rounding. The parameter itself stays the same bf16 tensor, so autograd
    and DDP keep the gradient accumulator they hooked.

    The learning rate lives on `proxy`, a placeholder optimizer that the usual LR schedulers drive.
    """

    def __init__(self, config: OptimizerConfig, groups: list[dict], fused: bool, bf16_weights: bool,
                 seed: int = 0, clip_norm: Optional[float] = None):
        lr = groups[0]["lr"]
        self.params = [p for group in groups for p in group["params"]]
        # each parameter's rate relative to the schedule's (a text encoder may train at its own)
        self.lr_ratios = [group["lr"] / lr if lr else 1.0 for group in groups for _ in group["params"]]
        self.proxy = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
        self.optimizers = [build_optimizer(config, [p], lr) for p in self.params]
        self.bf16_weights = bf16_weights
        self.fused = fused
        self.clip_norm = clip_norm
        self.armed = not fused
        self.rounding = torch.Generator().manual_seed(seed)
        if fused:
            for param, optimizer, ratio in zip(self.params, self.optimizers, self.lr_ratios):
                param.register_post_accumulate_grad_hook(self._hook(optimizer, ratio))

    def _hook(self, optimizer, ratio: float):
        def step_when_armed(param: torch.Tensor) -> None:
            if self.armed:
                self._step_one(param, optimizer, ratio)
        return step_when_armed

    @property
    def param_groups(self) -> list:
        return self.proxy.param_groups

    @staticmethod
    @contextlib.contextmanager
    def _standing_in(param: torch.Tensor, optimizer, stand_in: torch.Tensor) -> Iterator[None]:
        """stand_in takes param's place in its optimizer, with param's state, for the block."""
        optimizer.param_groups[0]["params"][0] = stand_in
        if param in optimizer.state:
            optimizer.state[stand_in] = optimizer.state.pop(param)
        try:
            yield
        finally:
            # read again: loading a state dict replaces the groups and the state
            optimizer.param_groups[0]["params"][0] = param
            if stand_in in optimizer.state:
                optimizer.state[param] = optimizer.state.pop(stand_in)

    @torch.no_grad()
    def _step_one(self, param: torch.Tensor, optimizer, ratio: float) -> None:
        optimizer.param_groups[0]["lr"] = self.proxy.param_groups[0]["lr"] * ratio
        if self.bf16_weights:
            working = param.detach().float()
            working.grad = param.grad.float()
            with self._standing_in(param, optimizer, working):
                optimizer.step()
            rounding = self.rounding if param.device.type == "cpu" else None
            param.copy_(stochastic_round_to_bf16(working, rounding))
        else:
            optimizer.step()
        param.grad = None

    def step(self) -> None:
        """Step every parameter that has a gradient; fused into backward, they have all stepped already."""
        self.proxy.step()  # moves nothing; tells the LR schedule that a step was taken
        if self.fused:
            return
        if self.clip_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.params if p.grad is not None], self.clip_norm)
        for param, optimizer, ratio in zip(self.params, self.optimizers, self.lr_ratios):
            if param.grad is not None:
                self._step_one(param, optimizer, ratio)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def train(self) -> None:
        self._switch("train")

    def eval(self) -> None:
        self._switch("eval")

    @torch.no_grad()
    def _switch(self, mode: str) -> None:
        """Move each parameter between a schedule-free optimizer's training and evaluation points."""
        for param, optimizer in zip(self.params, self.optimizers):
            if not self.bf16_weights:
                getattr(optimizer, mode)()
                continue
            # The optimizer's state is fp32, as in a step; the move is rounded to nearest.
            working = param.detach().float()
            with self._standing_in(param, optimizer, working):
                getattr(optimizer, mode)()
            param.copy_(working)

    def state_dict(self) -> dict:
        return {"proxy": self.proxy.state_dict(), "parameters": [o.state_dict() for o in self.optimizers],
                "rounding": self.rounding.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.proxy.load_state_dict(state["proxy"])
        self.rounding.set_state(state["rounding"])
        for param, optimizer, saved in zip(self.params, self.optimizers, state["parameters"]):
            if not self.bf16_weights:
                optimizer.load_state_dict(saved)
                continue
            # torch and bitsandbytes cast a loaded state to its parameter's dtype: an fp32 tensor stands in
            # while loading, so that the state stays that of the fp32 copies each step works on
            with self._standing_in(param, optimizer, torch.empty_like(param, dtype=torch.float32)):
                optimizer.load_state_dict(saved)


def has_train_mode(optimizer) -> bool:
    """Whether the optimizer trains at one point and evaluates at another (an average of its steps), as the
    schedule-free ones do."""
    inner = getattr(optimizer, "optimizers", [optimizer])
    return all(hasattr(each, "train") and hasattr(each, "eval") for each in inner)


def train_mode(optimizer) -> None:
    """Put the weights at the optimizer's training point: before the first step, and after a resume (a
    checkpoint holds the evaluation weights). Other optimizers have one point only."""
    if has_train_mode(optimizer):
        optimizer.train()


def _trained_params(optimizer) -> list:
    if isinstance(optimizer, PerParameterOptimizer):
        return optimizer.params
    return [param for group in optimizer.param_groups for param in group["params"]]


@contextlib.contextmanager
def eval_weights(optimizer) -> Iterator[None]:
    """The optimizer's evaluation weights for the block (what samples show and validation scores), then
    exactly the training weights again. A move there and back in floating point does not always land where it
    started (in bf16, a few weights in a hundred end a bf16 step away), so the training weights wait on the
    CPU, where they take no device memory while samples render, and are copied back."""
    if not has_train_mode(optimizer):
        yield
        return
    params = _trained_params(optimizer)
    training = [param.detach().to("cpu", copy=True) for param in params]
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
        with torch.no_grad():
            for param, weights in zip(params, training):
                param.copy_(weights)


@contextlib.contextmanager
def checkpoint_weights(optimizer) -> Iterator[None]:
    """The optimizer's evaluation weights for the block (what a checkpoint holds), then the training point
    computed back from them, as a resume from that checkpoint computes it: the run goes on from the weights
    its resume would start from. The move back is deterministic, so every process of a run makes it at each
    checkpoint and the processes stay equal."""
    if not has_train_mode(optimizer):
        yield
        return
    optimizer.eval()
    try:
        yield
    finally:
        optimizer.train()
