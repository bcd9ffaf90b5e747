"""The memory plan: the settings that fit a run into a card's memory and the system's, found by the estimate.

`STEPS` lists the memory options in the order that costs training speed least: the caches, gradient
checkpointing, smaller storage of the weights, blocks waiting on the CPU (more at each repeat), 4-bit frozen
weights, activations offloaded to the CPU, smaller optimizer states, the optimizer step fused into backward,
and last a smaller batch. Each step keeps the ones before it. Every candidate is estimated on the real
architecture by `vram.estimate` (seconds each, some tens of seconds for Flux.1), and the search stops at the
first that fits both limits. Candidates that differ only in their number of blocks on the CPU share one trace
(`TRACES`), the swap's effect being counted from the blocks' sizes. A step taken while it lowered nothing
above its limit is then dropped again where the fit holds without it. A step that the config refuses in
combination (its validation, or the run plan's rules for the process count) is skipped, never applied.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Union

import yaml

from . import notices
from .config import Config, add_overrides_argument, apply_override, from_dict, optimizer_path, to_dict
from .errors import UserError
from .plan import latents_cacheable, make_plan, text_cacheable
from .vram import ARCHITECTURES, VramEstimate, estimate, estimate_plan, estimated_processes, resolve_architecture

# Device memory the estimate does not count (it counts tensors): the CUDA context, some hundreds of MiB, and
# the caching allocator's slack. Kept free of a card's size when the run trains on CUDA.
CUDA_RESERVE_GIB = 0.75

# The traces of the process's plans (vram.estimate), kept for its later plans: the app's Fit button asks again
# after an edit, and most candidates recur. Each is a few numbers.
TRACES: dict = {}

# A step's proposal: the `--set` keys and values it applies, or why it does not apply to the config.
Proposal = Union[dict, str]


@dataclass(frozen=True)
class Step:
    name: str
    propose: Callable[[Config], Proposal]
    repeat: bool = False  # proposed again, on its own result, until it fits or has nothing left to propose


def _caches(config: Config) -> Proposal:
    settings = {}
    if not config.cache.text_embeddings and text_cacheable(config):
        settings["cache.text_embeddings"] = True
    if not config.cache.latents and latents_cacheable(config):
        settings["cache.latents"] = True
    # caches filled by the first epoch's steps leave that epoch with the models on the device
    if config.cache.fill == "first_epoch" and (settings or config.cache.latents or config.cache.text_embeddings):
        settings["cache.fill"] = "before_training"
    if settings:
        return settings
    reasons = [why for off, why in (
        (not latents_cacheable(config), "latents change every epoch (random crops or augment)"),
        (not text_cacheable(config), "text embeddings change (a trained text encoder, or shuffled or dropped tags)"),
    ) if off]
    return "; ".join(reasons) or "already on"


def _checkpointing(config: Config) -> Proposal:
    return "already on" if config.gradient_checkpointing else {"gradient_checkpointing": True}


# bytes per stored weight, for the storage steps to go only downwards
BASE_BYTES = {"fp32": 4, "bf16": 2, "fp8": 1, "int8": 1, "nf4": 0.5}


def _base_dtype(dtype: str) -> Callable[[Config], Proposal]:
    def propose(config: Config) -> Proposal:
        if BASE_BYTES[config.base_dtype] <= BASE_BYTES[dtype]:
            return f"base_dtype is already {config.base_dtype}"
        if not config.network.adapter and len(config.trained_text_encoders) == 2:
            return "a full fine-tune whose text encoders train has no frozen weights that base_dtype stores"
        return {"base_dtype": dtype}
    return propose


def _weights_dtype(config: Config) -> Proposal:
    if config.network.adapter:
        return "an adapter trains in fp32 over its base, which base_dtype stores"
    return "already bf16" if config.weights_dtype == "bf16" else {"weights_dtype": "bf16"}


# Block swap grows in steps of this share of the denoiser's repeated blocks, from at least MIN_SWAPPED: two
# blocks are on the device at once, so swapping fewer saves nothing.
SWAP_SHARE = 6
MIN_SWAPPED = 3


def repeated_block_count(config: Config) -> int:
    """How many repeated blocks the denoiser has (engine.block_swap.repeated_blocks), from its config."""
    denoiser = resolve_architecture(config).unet
    if "num_single_layers" in denoiser:  # Flux.1: double-stream then single-stream blocks
        return denoiser["num_layers"] + denoiser["num_single_layers"]
    if "n_refiner_layers" in denoiser:  # Z-Image: its main blocks
        return denoiser["n_layers"]
    if "num_layers" in denoiser:  # Qwen-Image: one kind of block
        return denoiser["num_layers"]
    return len(denoiser["down_block_types"]) + len(denoiser["up_block_types"])


def _block_swap(config: Config) -> Proposal:
    total = repeated_block_count(config)
    now = config.memory.blocks_on_cpu
    if now >= total:
        return f"all {total} blocks already wait on the CPU"
    settings = {"memory.blocks_on_cpu": min(total, max(MIN_SWAPPED, now + -(-total // SWAP_SHARE)))}
    if not config.network.adapter and not config.optimizer.fused_backward:
        # a full fine-tune's swapped blocks update inside backward, so no full set of gradients waits
        settings["optimizer.fused_backward"] = True
    return settings


def _offload_activations(config: Config) -> Proposal:
    if config.memory.offload_activations:
        return "already on"
    return {"memory.offload_activations": True} if config.gradient_checkpointing else "needs gradient checkpointing"


# Optimizers swapped for one with less state and the same learning rates: the 8-bit versions of the same
# algorithm, then Adafactor (factored second moments, no first moment) for the Adam family.
EIGHT_BIT = {"torch.optim.AdamW": "adamw8bit", "torch.optim.Adam": "bitsandbytes.optim.Adam8bit",
             "bitsandbytes.optim.AdamW": "adamw8bit", "bitsandbytes.optim.Adam": "bitsandbytes.optim.Adam8bit",
             "bitsandbytes.optim.Lion": "lion8bit"}
ADAM_FAMILY = ("torch.optim.AdamW", "torch.optim.Adam", "bitsandbytes.optim.AdamW", "bitsandbytes.optim.Adam",
               "bitsandbytes.optim.AdamW8bit", "bitsandbytes.optim.Adam8bit")
FACTORED = ("transformers.optimization.Adafactor", "came_pytorch.CAME")


def _eight_bit_optimizer(config: Config) -> Proposal:
    name = optimizer_path(config.optimizer.name)
    if name in EIGHT_BIT:
        return {"optimizer.name": EIGHT_BIT[name]}
    return f"{name} is already 8-bit" if name.endswith("8bit") else f"{name} is kept: it has no 8-bit version"


def _factored_optimizer(config: Config) -> Proposal:
    name = optimizer_path(config.optimizer.name)
    if name in ADAM_FAMILY:
        return {"optimizer.name": "adafactor"}
    return (f"{name} is already factored" if name in FACTORED else
            f"{name} is kept: only an Adam-family optimizer is swapped for Adafactor, which takes its learning rates")


def _fused_backward(config: Config) -> Proposal:
    return "already on" if config.optimizer.fused_backward else {"optimizer.fused_backward": True}


def _smaller_batch(config: Config) -> Proposal:
    return "already 1" if config.batch_size == 1 else {"batch_size": config.batch_size // 2}


STEPS: tuple[Step, ...] = (
    Step("cached latents and text embeddings", _caches),
    Step("gradient checkpointing", _checkpointing),
    Step("frozen weights in bf16", _base_dtype("bf16")),
    Step("trained weights in bf16", _weights_dtype),
    Step("frozen weights in fp8", _base_dtype("fp8")),
    Step("blocks waiting on the CPU", _block_swap, repeat=True),
    Step("frozen weights in nf4", _base_dtype("nf4")),
    Step("activations offloaded to the CPU", _offload_activations),
    Step("8-bit optimizer states", _eight_bit_optimizer),
    Step("factored optimizer states", _factored_optimizer),
    Step("optimizer step fused into backward", _fused_backward),
    Step("half the batch", _smaller_batch, repeat=True),
)


@dataclass
class Tried:
    step: str
    settings: dict                        # what the step set; {} for the config as given and skipped steps
    estimate: Optional[VramEstimate]      # None: skipped
    verdict: str                          # fits, what is too large, or why the step was skipped

    def line(self) -> str:
        shown = f" ({format_settings(self.settings)})" if self.settings else ""
        if self.estimate is None:
            return f"{self.step}: skipped: {self.verdict}"
        return (f"{self.step}{shown}: GPU {self.estimate.peak:.2f} GiB, RAM {self.estimate.ram.peak:.2f} GiB: "
                f"{self.verdict}")


@dataclass
class MemoryPlan:
    vram_gib: float
    ram_gib: float
    reserve_gib: float                    # kept free of vram_gib for what the estimate does not count
    settings: dict = field(default_factory=dict)  # the chosen `--set` keys and values, in the order applied
    estimate: Optional[VramEstimate] = None       # of the config with the settings; None when nothing fits
    tried: list[Tried] = field(default_factory=list)
    reason: str = ""                      # when nothing fits: why, in one line
    notes: list[str] = field(default_factory=list)  # what a chosen setting changes beyond memory and speed

    @property
    def fits(self) -> bool:
        return not self.reason


def format_settings(settings: dict) -> str:
    return ", ".join(f"{key}={_yaml_value(value)}" for key, value in settings.items())


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("\n...").strip()


def with_settings(raw: dict, settings: dict) -> dict:
    """A copy of a raw config dict with the settings (`--set` keys and values) written in."""
    raw = copy.deepcopy(raw)
    for key, value in settings.items():
        apply_override(raw, key, value)
    return raw


def applied(config: Config, settings: dict, processes: int = 1) -> Config:
    """The config with settings applied, checked as a run would check it; raises ConfigError if refused."""
    with notices.collect(lambda message: None):  # the config's own notices were given as it loaded
        candidate = from_dict(with_settings(to_dict(config), settings))
        make_plan(candidate, estimate_plan(candidate, processes).device_type, processes)
    return candidate


def _largest_part(result: VramEstimate) -> str:
    parts = {"parameters": result.parameters, "gradients": result.gradients,
             "optimizer state": result.optimizer_state, "activations": result.activations, "other": result.other}
    name = max(parts, key=parts.get)
    return f"{name} {parts[name]:.2f} GiB"


def reserve_gib(config: Config) -> float:
    """What the plan keeps free of the card's memory: CUDA_RESERVE_GIB on a CUDA run, nothing on the CPU."""
    return CUDA_RESERVE_GIB if estimate_plan(config).device_type == "cuda" else 0.0


def plan_memory(config: Config, vram_gib: float, ram_gib: float, processes: Optional[int] = None,
                arch: Optional[str] = None, steps: tuple[Step, ...] = STEPS,
                on_tried: Optional[Callable[[Tried], None]] = None) -> MemoryPlan:
    """The first candidate in `steps` order whose estimate fits vram_gib (less the CUDA reserve on a CUDA run)
    and ram_gib, each step keeping the ones before it. A step that lowered no figure above its limit when it
    was taken (gradient checkpointing while the optimizer's state sets the peak, say) is dropped again at the
    end if the fit holds without it. `on_tried` hears of each candidate as it is estimated or skipped.
    `processes`: the training processes (default: vram.estimated_processes)."""
    processes = estimated_processes(config) if processes is None else processes
    reserve = reserve_gib(config)
    plan = MemoryPlan(vram_gib, ram_gib, reserve)
    gpu_limit = vram_gib - reserve

    def verdict(result: VramEstimate) -> str:
        problems = []
        if result.peak > gpu_limit:
            problems.append(f"GPU above {gpu_limit:.2f} GiB" + (f" ({vram_gib:g} less {reserve:g} reserved)"
                                                                 if reserve else ""))
        if result.ram.peak > ram_gib:
            problems.append(f"RAM above {ram_gib:g} GiB")
        return "; ".join(problems) or "fits"

    def gains(before: VramEstimate, after: VramEstimate) -> bool:
        return ((before.peak > gpu_limit and after.peak < before.peak)
                or (before.ram.peak > ram_gib and after.ram.peak < before.ram.peak))

    def record(tried: Tried) -> None:
        plan.tried.append(tried)
        if on_tried:
            on_tried(tried)

    taken: list[tuple[str, dict, bool]] = []  # (step, its settings, whether it lowered a figure above its limit)
    current, result = config, estimate(config, arch, TRACES, processes)
    record(Tried("as configured", {}, result, verdict(result)))
    for step in steps:
        proposed = False
        while verdict(result) != "fits":
            proposal = step.propose(current)
            if isinstance(proposal, str):
                if not proposed:  # a repeated step that has run out says nothing
                    record(Tried(step.name, {}, None, proposal))
                break
            proposed = True
            try:
                candidate = applied(current, proposal, processes)
                candidate_result = estimate(candidate, arch, TRACES, processes)
            except UserError as error:  # ConfigError among them: the combination is refused
                record(Tried(step.name, {}, None, f"refused: {error}"))
                break
            gained = gains(result, candidate_result)
            current, result = candidate, candidate_result
            taken.append((step.name, proposal, gained))
            record(Tried(step.name, proposal, result, verdict(result) + ("" if gained else ", no gain yet")))
            if not step.repeat:
                break
    if verdict(result) != "fits":
        plan.reason = _why_nothing_fits(plan, gpu_limit)
        return plan
    for index in reversed(range(len(taken))):
        name, _, gained = taken[index]
        rest = taken[:index] + taken[index + 1:]
        if gained or _merged(rest) == _merged(taken):  # a gain, or settings a later step replaced
            continue
        try:
            candidate = applied(config, _merged(rest), processes)
            candidate_result = estimate(candidate, arch, TRACES, processes)
        except UserError:  # refused without it: the step stays
            continue
        fits = verdict(candidate_result) == "fits"
        record(Tried(f"without {name}", {}, candidate_result, "fits: dropped" if fits else "does not fit: kept"))
        if fits:
            taken, current, result = rest, candidate, candidate_result
    plan.settings, plan.estimate = _merged(taken), result
    if current.batch_size != config.batch_size:
        plan.notes.append(f"batch_size is lowered from {config.batch_size} to {current.batch_size}: each step "
                          "sees fewer images; trainer.accumulate_grad_batches can restore the images per "
                          "optimizer step, at the cost of keeping the gradients between micro-batches")
    return plan


def _merged(taken: list[tuple[str, dict, bool]]) -> dict:
    """The settings of the steps taken, a later step's value of a key replacing an earlier one's."""
    settings: dict = {}
    for _, proposal, _ in taken:
        settings.update(proposal)
    return settings


def _why_nothing_fits(plan: MemoryPlan, gpu_limit: float) -> str:
    estimated = [t for t in plan.tried if t.estimate is not None]
    on_card = [t for t in estimated if t.estimate.peak <= gpu_limit]
    if on_card:
        best = min(on_card, key=lambda t: t.estimate.ram.peak)
        ram = best.estimate.ram
        moment = "while loading" if ram.loading >= ram.training else "while training"
        return (f"the GPU fits ({best.estimate.peak:.2f} GiB after '{best.step}') but system RAM needs at least "
                f"{ram.peak:.2f} GiB {moment}, above the {plan.ram_gib:g} GiB limit")
    best = min(estimated, key=lambda t: t.estimate.peak)
    reserved = f" less {plan.reserve_gib:g} GiB reserved" if plan.reserve_gib else ""
    return (f"the smallest GPU estimate reached is {best.estimate.peak:.2f} GiB (after '{best.step}'), above "
            f"{gpu_limit:.2f} GiB ({plan.vram_gib:g}{reserved}); most of it is {_largest_part(best.estimate)}")


def header(vram_gib: float, ram_gib: float, reserve: float) -> str:
    kept = f" ({reserve:g} of it kept for the CUDA context)" if reserve else ""
    return f"limits: GPU {vram_gib:g} GiB{kept}, system RAM {ram_gib:g} GiB"


def outcome(plan: MemoryPlan) -> list[str]:
    """The chosen settings, notes and estimates; or the one-line reason nothing fits."""
    if not plan.fits:
        return [f"nothing fits: {plan.reason}"]
    lines = ["chosen settings:" if plan.settings else "chosen settings: none, the config fits as it is"]
    lines += [f"  {key}: {_yaml_value(value)}" for key, value in plan.settings.items()]
    lines += [f"note: {note}" for note in plan.notes]
    return lines + plan.estimate.lines()


def check_limit(value: Optional[float], name: str) -> float:
    """A memory limit as given by a user; refused, naming it, unless a finite size above 0."""
    if value is None or not 0 < value < float("inf"):
        raise UserError(f"{name}: a size in GiB above 0, got {value}")
    return float(value)


def cmd_plan_memory(args) -> int:
    from .config import parse_override, read_yaml

    vram_gib, ram_gib = check_limit(args.vram, "--vram"), check_limit(args.ram, "--ram")
    raw = read_yaml(args.config)
    for text in args.set:
        apply_override(raw, *parse_override(text))
    config = from_dict(copy.deepcopy(raw))
    print(header(vram_gib, ram_gib, reserve_gib(config)), "tried:", sep="\n", flush=True)
    plan = plan_memory(config, vram_gib, ram_gib, arch=args.arch,
                       on_tried=lambda tried: print(f"  {tried.line()}", flush=True))
    print("\n".join(outcome(plan)))
    if not plan.fits:
        return 1
    if args.write:
        Path(args.write).write_text(yaml.safe_dump(with_settings(raw, plan.settings), sort_keys=False,
                                                   allow_unicode=True), encoding="utf-8")
        print(f"wrote {args.write}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "plan-memory", help="choose the memory settings that fit a config into a card's GPU memory and the "
                            "system's RAM (no GPU needed)")
    parser.add_argument("--config", required=True, help="YAML config file")
    add_overrides_argument(parser, "batch_size=2")
    parser.add_argument("--vram", type=float, required=True, metavar="GIB", help="the card's memory in GiB")
    parser.add_argument("--ram", type=float, required=True, metavar="GIB", help="the system's memory in GiB")
    parser.add_argument("--arch", choices=ARCHITECTURES,
                        help="architecture when the model is not a diffusers folder (default: from the model's "
                             "name, else sd15)")
    parser.add_argument("--write", metavar="OUT.yaml", help="write the config with the chosen settings applied")
    parser.set_defaults(func=cmd_plan_memory)
