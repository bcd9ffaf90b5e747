"""Pre-flight VRAM estimate: one training step of the config's real architecture, on fake tensors.

The UNet, text encoder and VAE are built from their diffusers and transformers configs under
FakeTensorMode: shapes and dtypes are real, no weight is read and no memory is used. One steady-state step
then runs under a memory tracker that records every storage it allocates: the configured rows (DreamBooth
doubles the batch: instance + class rows) at the largest training size, autocast precision, weights dtype,
optimizer (its state already there, as after the first step; with gradient accumulation, the gradients
too), gradient checkpointing, cached latents/embeddings, EMA and the optimizer step fused into backward.
For an edit model (a tokenizer that `reads_controls`) each row has one control image of the training size.
The figures are the tensor bytes alive at the step's peak; the CUDA context and allocator fragmentation
come on top of them.

The model's own unet/config.json is used when the config's model is a diffusers folder; otherwise the
shipped SD1.5, SD2.1 or SDXL configs in engine/models/configs/pipelines/, picked by name or by `--arch`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import paths
from .block_swap import block_bytes, check_count, device_bytes_saved, repeated_blocks
from .config import Config, add_overrides_argument, to_dict
from .distributed import process_count
from .errors import UserError
from .models.family import family_named, text_encoder_parts
from .models.single_file import BUILTIN_CONFIGS
from .plan import RunPlan, make_plan
from .ram import RamEstimate, loading_gib, resting_gib, training_figure
from .setup import (build_optimizer, frozen_models, offloaded_checkpoint, parameter_groups, prepare_models,
                    trained_models)
from .step import StepModels, backward, compute_loss, optimizer_step

GIB = 2**30
ARCHITECTURES = ("sd15", "sd21", "sdxl", "flux1-dev", "flux1-schnell", "chroma", "z-image", "qwen-image",
                 "qwen-image-edit", "flux2-klein-4b", "flux2-klein-9b")
# bitsandbytes keeps fp32 states for parameters smaller than this (its min_8bit_size) and one fp32 absmax
# per block of this many elements for the others (its blockwise quantization).
BNB_MIN_8BIT_SIZE = 4096
BNB_BLOCK_SIZE = 256


@dataclass
class VramEstimate:
    """Device memory at the step's peak, in GiB, by what holds it; the parts add up to the peak."""
    parameters: float
    gradients: float
    optimizer_state: float
    activations: float  # forward activations, their gradients and other temporaries of the step
    other: float        # buffers, the batch and the EMA weights
    peak: float
    ram: Optional[RamEstimate] = None  # the run's system memory (engine.ram)

    def lines(self) -> list[str]:
        names = ("parameters", "gradients", "optimizer_state", "activations", "other", "peak")
        return [f"{name}_gib: {getattr(self, name):.3f}" for name in names] + (self.ram.lines() if self.ram else [])


def memory_tracker():
    """A torch MemTracker that follows only the overall peak; its `peak()` is the breakdown at that moment."""
    return _peak_tracker_class()()


@functools.cache
def _peak_tracker_class():
    # Imported on first use: torch.distributed's tools take a second to import, which every CLI command
    # would pay otherwise.
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY, MemTracker

    class PeakMemTracker(MemTracker):
        """MemTracker that follows only the overall peak and its breakdown.

        The stock tracker also refreshes the peak of every open module after every operator, which makes an
        SD1.5 step take minutes on a CPU instead of seconds; the overall figures are the same.
        """

        def _pre_fw_hook(self, module, inputs) -> None:
            # Only overall figures are kept, so a module may run again outside backward, as the VAE does
            # once per batch while latents are cached; the stock tracker takes that for a second iteration.
            if module in self.memory_tracking and not self._mod_tracker.is_bw:
                return
            super()._pre_fw_hook(module, inputs)

        def _track_module_params_and_buffers(self, module, install_grad_hooks: bool = True):
            # The stock tracker puts a gradient hook on every parameter of a module that runs, which the
            # parameters of a frozen VAE or text encoder refuse.
            install_grad_hooks = install_grad_hooks and all(param.requires_grad for param in module.parameters())
            return super()._track_module_params_and_buffers(module, install_grad_hooks)

        def _update_peak_stats(self, peak_state) -> None:
            for device, snapshot in self._curr_mem_snap.items():
                if snapshot[_TOTAL_KEY] > self._peak_mem.get(device, 0):
                    self._peak_mem[device] = snapshot[_TOTAL_KEY]
                    self._peak_mem_snap[device] = dict(snapshot)

        def peak(self) -> VramEstimate:
            totals: Counter = Counter()
            for device, snapshot in self.get_tracker_snapshot("peak").items():
                if device.type == "meta":  # diffusers builds models there before loading weights: no memory
                    continue
                for kind, size in snapshot.items():
                    totals[getattr(kind, "value", kind)] += size
            return VramEstimate(
                parameters=totals["Parameter"] / GIB, gradients=totals["Gradient"] / GIB,
                optimizer_state=totals["Optstate"] / GIB, activations=(totals["Activation"] + totals["Temp"]) / GIB,
                other=(totals["Buffer"] + totals["Other"]) / GIB, peak=totals[_TOTAL_KEY] / GIB)

    return PeakMemTracker


@dataclass
class Architecture:
    source: str  # the model folder, or the shipped config folder it was recognised as
    unet: dict
    text_encoder: dict
    vae: dict
    scheduler: dict  # the training noise schedule, which sets the prediction target
    text_encoder_2: Optional[dict] = None  # SDXL's second text encoder, Flux.1's T5
    pipeline: Optional[str] = None  # model_index.json's pipeline class, where the folder has one

    @property
    def family(self) -> str:
        denoiser = self.unet.get("_class_name")  # `unet` holds the denoising model's config
        if denoiser == "FluxTransformer2DModel":
            return "flux1"
        if denoiser == "ChromaTransformer2DModel":
            return "chroma"
        if denoiser == "ZImageTransformer2DModel":
            return "z-image"
        if denoiser == "QwenImageTransformer2DModel":  # the edit model's transformer is the same class
            return "qwen-image-edit" if self.pipeline == "QwenImageEditPlusPipeline" else "qwen-image"
        if denoiser == "Flux2Transformer2DModel":
            return "flux2-klein"
        return "sdxl" if self.text_encoder_2 is not None else "sd"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read the model config ({error})") from None


def guess_architecture(model: str) -> str:
    """chroma, z-image, flux1-dev, flux1-schnell, qwen-image-edit or qwen-image when the model's name says so
    ("Chroma1-HD", "z_image_turbo_bf16", "Qwen-Image-Edit-2509", "qwen_image_bf16"), sdxl when it does
    ("sd_xl_base_1.0", "sdxl"), sd21 when it says SD2.x ("stable-diffusion-2-1", "v2-1_768", "sd21"), else sd15."""
    name = Path(model).name.lower() if model else ""
    if "chroma" in name:
        return "chroma"
    if re.search(r"z[-_]?image", name):
        return "z-image"
    if "klein" in name:
        return "flux2-klein-9b" if "9b" in name else "flux2-klein-4b"
    if "flux" in name:
        return "flux1-schnell" if "schnell" in name else "flux1-dev"
    if "qwen" in name:
        return "qwen-image-edit" if "edit" in name else "qwen-image"
    if re.search(r"xl", name):
        return "sdxl"
    return "sd21" if re.search(r"(?<![0-9.])2[-._]?[01](?![0-9])|v2|sd2(?!x)", name) else "sd15"


def _denoiser_config(folder: Path) -> Optional[Path]:
    """The denoising model's config in a diffusers folder: SD's UNet or Flux.1's transformer."""
    return next((path for name in ("unet", "transformer") if (path := folder / name / "config.json").is_file()), None)


def resolve_architecture(config: Config, arch: Optional[str] = None) -> Architecture:
    """The config's model folder's own configs when it has them, else the shipped SD1.5/SD2.1/SDXL/Flux.1 ones."""
    if arch is not None and arch not in ARCHITECTURES:
        raise UserError(f"--arch: expected one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    folder = Path(paths.resolve(config.model)) if config.model else None
    vae_dir = None
    if folder is None or _denoiser_config(folder) is None:
        # A single file or a hub name: the same shipped configs the single-file loader uses.
        folder = BUILTIN_CONFIGS / (arch or guess_architecture(config.model))
    elif config.vae and (Path(paths.resolve(config.vae)) / "config.json").is_file():
        vae_dir = Path(paths.resolve(config.vae))
    vae_dir = vae_dir or folder / "vae"
    scheduler = folder / "scheduler" / "scheduler_config.json"
    index = folder / "model_index.json"
    return Architecture(folder.name if folder.parent == BUILTIN_CONFIGS else str(folder),
                        _read_json(_denoiser_config(folder)),
                        _read_json(folder / "text_encoder" / "config.json"), _read_json(vae_dir / "config.json"),
                        _read_json(scheduler) if scheduler.is_file() else {},
                        _read_json(second / "config.json") if (second := folder / "text_encoder_2").is_dir() else None,
                        _read_json(index).get("_class_name") if index.is_file() else None)


@dataclass(frozen=True)
class StepShape:
    """The batch of the step that sets the peak: the configured rows (DreamBooth adds a class row per
    instance row) at the largest training size."""
    rows: int
    width: int
    height: int


def step_shape(config: Config) -> StepShape:
    from .data.buckets import bucket_sizes

    width, height = max(bucket_sizes(config), key=lambda size: size[0] * size[1])
    return StepShape(config.batch_size * (2 if config.prior_preservation.enabled else 1), width, height)


def estimated_processes(config: Config) -> int:
    """The process count the estimate is for: under fsdp each process holds a share of the denoiser, so
    trainer.devices' count; under ddp each holds what one process would."""
    return process_count(config.trainer.devices) if config.trainer.strategy == "fsdp" else 1


def estimate_plan(config: Config, processes: Optional[int] = None) -> RunPlan:
    """The run plan of the estimated device (the GPU unless the config pins the CPU) in its heaviest epoch:
    caches filled during the first epoch leave that epoch with the VAE and text encoder on the device.
    `processes`: the training processes (default: estimated_processes)."""
    processes = estimated_processes(config) if processes is None else processes
    plan = make_plan(config, "cpu" if config.trainer.accelerator == "cpu" else "cuda", processes)
    if plan.fill_first_epoch:
        plan = dataclasses.replace(plan, cache_latents=False, cache_text=False)
    return plan


def describe(config: Config, plan: RunPlan, shape: StepShape) -> str:
    from .config import optimizer_path

    optimizer = optimizer_path(config.optimizer.name)
    features = [f"{shape.rows} rows of {shape.width}x{shape.height}",
                f"{str(plan.autocast).removeprefix('torch.')} autocast" if plan.autocast else "no autocast",
                f"{str(plan.weights).removeprefix('torch.')} weights", optimizer.rpartition(".")[2]]
    if plan.adapter != "full":
        network = config.network
        features.append(f"{plan.adapter} rank {network.rank}"
                        + (f" (conv rank {network.conv_rank})" if network.conv_rank else "") + " over a frozen "
                        + (f"{config.base_dtype} " if config.base_dtype != "fp32" else "") + "base")
    if config.base_dtype != "fp32":
        features.append(f"frozen text encoders in {config.base_dtype}")
    features += [name for name, on in (("text encoder trained", plan.train_text_encoder),
                                       ("gradient checkpointing", config.gradient_checkpointing),
                                       ("offloaded activations", config.memory.offload_activations),
                                       (f"{config.memory.blocks_on_cpu} blocks on the CPU",
                                        config.memory.blocks_on_cpu > 0),
                                       ("fused backward", plan.fused_backward),
                                       ("gradient accumulation", config.trainer.accumulate_grad_batches > 1),
                                       ("cached latents", plan.cache_latents),
                                       ("cached text embeddings", plan.cache_text),
                                       ("VAE off the device", plan.vae_off_device),
                                       ("text encoder off the device", plan.text_encoder_off_device),
                                       ("EMA", config.ema.enabled and not config.ema.on_cpu)) if on]
    if plan.sharded:
        features.append(f"fsdp over {plan.processes} processes (figures per process)")
    return ", ".join(features)


class BitsandbytesState(torch.optim.Optimizer):
    """Stand-in for bitsandbytes' 8-bit Adam and AdamW: their state, allocated the way they allocate it.

    Their update kernels cannot run on fake tensors, so training's optimizer is built with this stand-in in
    their place. For each parameter of BNB_MIN_8BIT_SIZE elements or more the 8-bit versions keep one uint8
    byte per element per state plus one fp32 absmax per BNB_BLOCK_SIZE elements per state, and each
    optimizer one 256-entry fp32 quantization map per state; smaller parameters, and the 32-bit versions,
    keep fp32 states. Adam-family optimizers have two states, Lion one. The CUDA kernels update these
    buffers in place, so a step that changes nothing leaves every byte as it is. (bitsandbytes' CPU
    fallback does allocate temporaries while it steps; the estimate is for the GPU.)
    """
    eight_bit, num_states = True, 2

    def __init__(self, params, **hyperparameters):  # learning rate, betas and the rest change no byte
        super().__init__(params, {})
        quantization_maps = None  # one pair of 256-entry tables per optimizer, shared by its parameters
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                eight_bit = self.eight_bit and param.numel() >= BNB_MIN_8BIT_SIZE
                if eight_bit and quantization_maps is None:
                    quantization_maps = [torch.zeros(256, device=param.device) for _ in range(self.num_states)]
                for index in range(1, self.num_states + 1):
                    if eight_bit:
                        blocks = -(-param.numel() // BNB_BLOCK_SIZE)
                        state[f"state{index}"] = torch.zeros_like(param, dtype=torch.uint8)
                        state[f"qmap{index}"] = quantization_maps[index - 1]
                        state[f"absmax{index}"] = torch.zeros(blocks, dtype=torch.float32, device=param.device)
                    else:
                        state[f"state{index}"] = torch.zeros_like(param, dtype=torch.float32)

    def step(self, closure=None):
        return None


class Bitsandbytes32bitState(BitsandbytesState):
    eight_bit = False


class BitsandbytesLion8bitState(BitsandbytesState):
    num_states = 1


class BitsandbytesLionState(BitsandbytesState):
    eight_bit, num_states = False, 1


class ProdigyState(torch.optim.Optimizer):
    """Stand-in for Prodigy, whose step reads values (for its step-size estimate) that fake tensors do not
    have: its state, allocated the way it allocates it. For each parameter, in the parameter's dtype: the
    running sum `s` and the starting point `p0` (every element, at Prodigy's default slice_p of 1) and Adam's
    two moments (the first only with beta1 > 0). For a parameter that starts at all zeros (a LoRA's up
    matrices) Prodigy keeps a one-element `p0` instead, which fake tensors cannot tell: there the estimate
    is high by that parameter's size. The step's temporaries, one parameter's size at a time, are not
    counted."""

    def __init__(self, params, betas=(0.9, 0.999), **hyperparameters):  # the others change no byte
        super().__init__(params, {})
        for group in self.param_groups:
            for param in group["params"]:
                state = self.state[param]
                state["s"] = torch.zeros_like(param).flatten()
                state["p0"] = param.detach().flatten().clone()
                if betas[0] > 0:
                    state["exp_avg"] = torch.zeros_like(param)
                state["exp_avg_sq"] = torch.zeros_like(param)

    def step(self, closure=None):
        return None


def _stand_in(optimizer: str) -> Optional[str]:
    """The class path of the stand-in for an optimizer class path whose step cannot run on fake tensors;
    None for one that can."""
    module, _, name = optimizer.rpartition(".")
    name = name.lower()
    if name == "prodigy":
        cls = ProdigyState
    elif not module.startswith("bitsandbytes"):
        return None
    elif "lion" in name:
        cls = BitsandbytesLion8bitState if "8bit" in name else BitsandbytesLionState
    else:
        cls = BitsandbytesState if "8bit" in name else Bitsandbytes32bitState
    return f"{__name__}.{cls.__name__}"


def steady_state_optimizer(config: Config, plan: RunPlan, groups: list[dict]):
    """Training's optimizer over parameter groups with its state already there, as after the first step.

    Returns it and the torch optimizers inside it (one per parameter for the per-parameter one)."""
    from .config import optimizer_path
    from .optim import train_mode

    options = config.optimizer
    stand_in = _stand_in(optimizer_path(options.name))
    if stand_in:
        options = dataclasses.replace(options, name=stand_in)
    elif options.params.relative_step:
        # Adafactor's relative step size needs the weights' values, which fake tensors do not have; its
        # fixed-rate mode keeps the same state and does the same work.
        options = dataclasses.replace(options, params=dataclasses.replace(options.params, relative_step=False,
                                                                          warmup_init=False))
    optimizer = build_optimizer(dataclasses.replace(config, optimizer=options), plan, groups)
    train_mode(optimizer)  # a schedule-free optimizer steps only in training mode
    params = [p for group in groups for p in group["params"]]
    inner = getattr(optimizer, "optimizers", [optimizer])
    for each in inner:
        for group in each.param_groups:
            # torch picks its multi-tensor implementation for CUDA parameters; its temporaries are as large
            # as all parameters together, so the fake CPU tensors must take the same path.
            if "foreach" in group and plan.device_type == "cuda":
                group["foreach"] = True
    # One step on zero gradients creates the state every later step starts with.
    for param in params:
        param.grad = torch.zeros_like(param)
    armed = getattr(optimizer, "fused", False)
    if armed:
        optimizer.fused = False  # step outside backward this once
    optimizer.step()
    if armed:
        optimizer.fused = True
    optimizer.zero_grad(set_to_none=True)
    return optimizer, inner


@dataclass(frozen=True)
class Trace:
    """One traced step without block swap, and what the swap changes: the swap's moves are left out of the
    trace, whose only device is the CPU, and what they free is counted from the blocks' sizes."""
    step: VramEstimate            # the tracker's peak
    parameters: float             # the parameters on the device, GiB
    offloaded: float              # the step's offloaded activations, GiB of system memory
    loading: float                # system memory while loading (engine.ram.loading_gib)
    resting: Optional[float]      # engine.ram.resting_gib; None on a CPU-only run
    block_sizes: tuple[int, ...]  # the bytes each repeated block moves (engine.block_swap.block_bytes)
    swaps: bool                   # the run's device is a GPU, to and from which blocks move

    def with_blocks_on_cpu(self, count: int) -> VramEstimate:
        """The estimate with the denoiser's last `count` repeated blocks on the CPU; on a GPU run, refuses more
        than it has."""
        swapped, host = 0.0, self.offloaded
        if self.swaps:
            check_count(len(self.block_sizes), count)
            sizes = list(self.block_sizes[len(self.block_sizes) - count:]) if count else []
            swapped, host = device_bytes_saved(sizes) / GIB, host + sum(sizes) / GIB
        ram = RamEstimate(loading=self.loading, training=training_figure(self.step.peak, self.resting, host))
        return dataclasses.replace(self.step, parameters=self.parameters - swapped, peak=self.step.peak - swapped,
                                   activations=self.step.activations + self.step.parameters - self.parameters,
                                   ram=ram)


def estimate(config: Config, arch: Optional[str] = None, traces: Optional[dict] = None,
             processes: Optional[int] = None) -> VramEstimate:
    """Trace one training step of `config` on fake tensors and return its peak device memory (per process, for
    `processes` training processes; default: estimated_processes). `traces` keeps the traces by what they
    depend on (the architecture, the process count and every setting but memory.blocks_on_cpu, whose effect is
    counted, not traced), for estimates of several configs (the memory plan's candidates) to share."""
    processes = estimated_processes(config) if processes is None else processes
    key = None
    if traces is not None:
        unswapped = dataclasses.replace(config, memory=dataclasses.replace(config.memory, blocks_on_cpu=0))
        architecture = dataclasses.asdict(resolve_architecture(config, arch))
        key = json.dumps([to_dict(unswapped), architecture, processes], sort_keys=True, default=str)
        if key in traces:
            return traces[key].with_blocks_on_cpu(config.memory.blocks_on_cpu)
    trace = _trace(config, arch, processes)
    if key is not None:
        traces[key] = trace
    return trace.with_blocks_on_cpu(config.memory.blocks_on_cpu)


def _trace(config: Config, arch: Optional[str], processes: int) -> Trace:
    from torch._subclasses.fake_tensor import FakeTensorMode

    architecture = resolve_architecture(config, arch)
    # With the step fused into backward a gradient is gone by the time the tracker's own
    # post-accumulate hook looks for it, which it reports as a warning and otherwise ignores. A lasting
    # filter, not catch_warnings: that would swap process-wide state under the app's other threads.
    warnings.filterwarnings("ignore", message="Expected a tensor or a traceable wrapper-subclass")
    # Real tensors the step meets (the noise schedule's tables, the batch's sample keys) become fake ones.
    with FakeTensorMode(allow_non_fake_inputs=True):
        return _trace_step(config, architecture, estimate_plan(config, processes), step_shape(config))


class _RealBookkeeping(TorchDispatchMode):
    """Runs each operation none of whose tensors is fake on real tensors (see real_bookkeeping)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily
        from torch.utils._pytree import tree_leaves

        kwargs = kwargs or {}
        if any(isinstance(leaf, FakeTensor) for leaf in tree_leaves((args, kwargs))):
            return func(*args, **kwargs)
        with unset_fake_temporarily():
            return func(*args, **kwargs)


def real_bookkeeping():
    """A context, inside the trace's FakeTensorMode, in which an operation on real tensors alone (or on none)
    gives real ones, still counted by the tracker: a model's bookkeeping on index tensors (a vision tower's
    patch grid, its attention windows, where its image tokens go), which reads values that fake tensors do not
    have, runs on real indices while the weights and activations stay fake."""
    return _RealBookkeeping()


class _FakeTextCache:
    """Stands in for the text-embedding cache: the conditioning arrives with the batch, shaped as the family's
    encoder gives it (run on fake tensors, it costs nothing)."""

    def __init__(self, family, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int):
        with torch.no_grad():
            self.embeddings = family.encode_text(text_encoder, input_ids, clip_stop_at_layer)

    def lookup(self, input_ids: torch.Tensor) -> dict:
        return self.embeddings


def _fake_parameters(model: torch.nn.Module) -> None:
    """Replace the real parameters among the model's fake ones by fake parameters of the same kind."""
    from torch._subclasses.fake_tensor import FakeTensor

    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not isinstance(param, FakeTensor):
                module._parameters[name] = torch.nn.Parameter(torch.empty(param.shape, dtype=param.dtype),
                                                              requires_grad=param.requires_grad)


class _HostOffload:
    """Saved-tensor hooks that stand in for save_on_cpu while tracing (where the "device" is the CPU): what they
    pack goes to the meta device, which the tracker does not count, and its bytes are summed for the system
    memory estimate."""

    def __init__(self):
        self.bytes = 0

    def hooks(self):
        def pack(tensor):
            self.bytes += tensor.numel() * tensor.element_size()
            return tensor.device, tensor.to("meta")

        def unpack(packed):
            device, tensor = packed
            return tensor.to(device)
        return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _trace_step(config: Config, architecture: Architecture, plan: RunPlan, shape: StepShape) -> Trace:
    from .ema import averaged_parameters, create_ema, ema_step

    device = torch.device("cpu")  # fake tensors: the device only names where the bytes are counted
    family = family_named(architecture.family)
    components = family.fake_components(config, architecture)
    loaded = {"unet": components.unet, **text_encoder_parts(components.text_encoder), "vae": components.vae}
    loading = loading_gib(config, loaded)
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    # peft moves each new adapter layer with Module.to(), which fake tensors refuse: the adapter is built of
    # real (small) tensors, then given fake ones of the same shapes
    # The swap's moves are left out of the trace, whose only device is the CPU: what it frees is counted below.
    unswapped = dataclasses.replace(config, memory=dataclasses.replace(config.memory, blocks_on_cpu=0))
    with unset_fake_temporarily():
        prepare_models(family, components, unswapped, plan, device)
    offload = _HostOffload()
    if config.memory.offload_activations and plan.device_type != "cpu":  # (on a CPU nothing moves)
        components.unet.enable_gradient_checkpointing(offloaded_checkpoint(device, offload.hooks))
    for model in trained_models(components, plan):
        _fake_parameters(model)
    trained = trained_models(components, plan)
    frozen = frozen_models(components, plan)
    resting = ([components.vae] if plan.vae_off_device else []) + \
        (list(text_encoder_parts(components.text_encoder).values()) if plan.text_encoder_off_device else [])
    on_device = trained + [model for model in frozen if not any(model is r for r in resting)]
    vae, unet, text_encoder = components.vae, components.unet, components.text_encoder

    # The batch as the data loader delivers it: cached latents come as the VAE's mean and log-variance.
    latent_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    latent_size = (shape.height // latent_scale, shape.width // latent_scale)
    first_encoder = next(iter(text_encoder_parts(text_encoder).values()))
    # the family's own prompt length where its tokenizer has one (Flux.1: CLIP's 77 then T5's)
    tokens = getattr(components.tokenizer, "model_max_length", None) or first_encoder.config.max_position_embeddings
    vocabulary = first_encoder.get_input_embeddings().num_embeddings  # (Qwen2.5-VL's config nests its own)
    batch = {"input_ids": torch.randint(0, vocabulary, (shape.rows, tokens)),
             "captions": ["a caption"] * shape.rows, "sample_keys": list(range(shape.rows)),
             "time_ids": torch.zeros(shape.rows, 6),
             "num_instance": config.batch_size if config.prior_preservation.enabled else shape.rows}
    if plan.cache_latents:
        batch["latent_params"] = torch.randn(shape.rows, 2 * vae.config.latent_channels, *latent_size)
    else:
        batch["pixel_values"] = torch.randn(shape.rows, 3, shape.height, shape.width)
    if getattr(components.tokenizer, "reads_controls", False):  # an edit model: one control image a row
        batch["control_pixel_values"] = torch.randn(shape.rows, 1, 3, shape.height, shape.width)
        if plan.cache_latents:
            batch["control_latent_params"] = torch.randn(shape.rows, 1, 2 * vae.config.latent_channels,
                                                         *latent_size)
    text_cache = (_FakeTextCache(family, text_encoder, batch["input_ids"], config.clip_stop_at_layer)
                  if plan.cache_text else None)
    groups = parameter_groups(components, plan, config, config.optimizer.params.lr)
    params = [p for group in groups for p in group["params"]]
    optimizer, inner = steady_state_optimizer(config, plan, groups)
    ema = create_ema(unet, config.ema) if config.ema.enabled and not config.ema.on_cpu else None
    scaler = torch.amp.GradScaler("cpu", enabled=False)  # loss scaling allocates nothing that matters
    if config.trainer.accumulate_grad_batches > 1:
        # micro-batches after the first start with the gradients of those before
        for param in params:
            param.grad = torch.zeros_like(param)
    tracker = memory_tracker()
    batch_tensors = [value for value in batch.values() if isinstance(value, torch.Tensor)]
    tracker.track_external(*on_device, *inner, *batch_tensors, *(text_cache.embeddings.values() if text_cache else []),
                           *(ema.shadow_params if ema else ()))
    models = StepModels(family=family, unet=unet, text_encoder=text_encoder, vae=vae,
                        objective=family.objective(config, components.noise_scheduler))
    with tracker:
        # The traced micro-batch is the last of its accumulation group, so the fused optimizer steps.
        loss, _ = compute_loss(config, models, batch, device, plan.autocast, text_cache)
        backward(loss, scaler, optimizer, group_size=1, last_of_group=True)
        del loss
        optimizer_step(optimizer, scaler, params, config.trainer.gradient_clip_val)
        if ema is not None:
            ema_step(ema, averaged_parameters(unet), on_cpu=False)
        optimizer.zero_grad(set_to_none=True)
    # A step on bf16 weights gives each parameter new storage, which the tracker books as a temporary;
    # the parameters' own size does not change, so count them directly.
    parameters = sum(p.numel() * p.element_size() for model in on_device for p in model.parameters()) / GIB
    prepared = {"unet": unet, **text_encoder_parts(text_encoder), "vae": vae}
    step = tracker.peak()
    if plan.sharded:  # one process's share (fsdp refuses block swap: no block moves below)
        whole = dataclasses.replace(step, parameters=parameters,
                                    activations=step.activations + step.parameters - parameters)
        step = per_process(whole, unet, plan.processes)
        parameters = step.parameters
    on_gpu = plan.device_type != "cpu"  # (on a CPU nothing moves)
    return Trace(step, parameters, offload.bytes / GIB, loading,
                 resting_gib(config, plan, prepared) if on_gpu else None,
                 tuple(block_bytes(repeated_blocks(unet), stays_trained=plan.adapter != "full")), on_gpu)


def shard_bytes(tensor: torch.Tensor, processes: int) -> int:
    """The bytes of the largest shard (the first process's) FSDP2 cuts a tensor into: whole rows of its first
    dimension, rounded up to a share per process."""
    rows = tensor.shape[0] if tensor.dim() else 1
    return -(-rows // processes) * (tensor.numel() // max(rows, 1)) * tensor.element_size()


def sharded_weight_bytes(unet: torch.nn.Module, processes: int) -> int:
    """The bytes of the denoiser's trained weights each process holds under fsdp (the first one, the most)."""
    return sum(shard_bytes(param, processes) for param in unet.parameters() if param.requires_grad)


def per_process(result: VramEstimate, unet: torch.nn.Module, processes: int) -> VramEstimate:
    """One process's share of a step traced whole, under fsdp: the denoiser's weights, gradients and optimizer
    states divided over the processes, plus what is gathered whole at once: the root's own weights (embeddings,
    output layers, a UNet's mid block) for the whole step, the block that runs and the next one, fetched
    ahead, and one block's whole gradients before they are reduced to shards."""
    whole = sum(param.numel() * param.element_size() for param in unet.parameters() if param.requires_grad)
    share = sharded_weight_bytes(unet, processes) / whole
    blocks = [sum(param.numel() * param.element_size() for param in block.parameters() if param.requires_grad)
              for block in repeated_blocks(unet)]
    root, largest = whole - sum(blocks), max(blocks)
    parameters = result.parameters - whole / GIB * (1 - share) + (root + 2 * largest) / GIB
    gradients = result.gradients * share + largest / GIB
    optimizer_state = result.optimizer_state * share
    peak = (result.peak - result.parameters - result.gradients - result.optimizer_state
            + parameters + gradients + optimizer_state)
    return dataclasses.replace(result, parameters=parameters, gradients=gradients, optimizer_state=optimizer_state,
                               peak=peak)


def format_report(architecture: Architecture, description: str, result: VramEstimate) -> str:
    return "\n".join([f"architecture: {architecture.source}", f"step: {description}", *result.lines()])


def cmd_estimate_vram(args) -> int:
    from .config import load

    config = load(args.config, args.set)
    architecture = resolve_architecture(config, args.arch)
    description = describe(config, estimate_plan(config), step_shape(config))
    print(format_report(architecture, description, estimate(config, args.arch)))
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "estimate-vram", help="estimate the peak GPU memory of a config's training step (no GPU needed)")
    parser.add_argument("--config", required=True, help="YAML config file")
    add_overrides_argument(parser, "batch_size=2")
    parser.add_argument("--arch", choices=ARCHITECTURES,
                        help="architecture when the model is not a diffusers folder (default: from the model's "
                             "name, else sd15)")
    parser.set_defaults(func=cmd_estimate_vram)
