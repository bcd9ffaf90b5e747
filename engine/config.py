"""The one typed config schema. YAML files, presets, the CLI and the GUI all read their defaults from here.

Key names follow the YAML of SCAL-SDT's earlier command-line trainer (built on PyTorch Lightning),
so configs written for it load unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from . import notices
from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key path and what was expected."""


def _number(x: float) -> str:
    return str(x) if isinstance(x, int) else f"{x:g}"


@dataclass(frozen=True)
class Range:
    """The values a numeric key takes, written on its field as `Annotated[int, Range(1)]`: loading refuses any
    other (and NaN and infinity) naming the key, and the README's config table shows it.

    A bound of None is open-ended; `say` replaces the generated words where a value has a meaning of its own.
    """
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    say: str = ""

    def __contains__(self, value: float) -> bool:
        # ints are exact (and may exceed a float's range); NaN and infinity are never a setting
        return ((isinstance(value, int) or math.isfinite(value))
                and (self.low is None or (value > self.low if self.low_open else value >= self.low))
                and (self.high is None or (value < self.high if self.high_open else value <= self.high)))

    def __str__(self) -> str:
        if self.say:
            return self.say
        if self.low is not None and self.high is not None:
            return (f"within {'(' if self.low_open else '['}{_number(self.low)}, {_number(self.high)}"
                    f"{')' if self.high_open else ']'}")
        if self.low is None:
            return f"{'below' if self.high_open else 'at most'} {_number(self.high)}"
        if self.low == 0 and self.low_open:
            return "positive"
        return f"{'above' if self.low_open else 'at least'} {_number(self.low)}"

    def check(self, value: Any, path: str) -> None:
        # Only numbers: a key that also takes a list (`base_res`) bounds its number alone.
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value not in self:
            raise ConfigError(f"config key '{path}': must be {self}, got {value!r}")


# Seeds: what numpy and Lightning's seed_everything take (unsigned 32 bits); a null seed is replaced by one.
SEED = Range(0, 2**32 - 1)
UNIT = Range(0, 1)  # probabilities, and weights from none to full
FRACTION = Range(0, 1, high_open=True)  # Adam's betas, dropout, a held-out share: at 1 nothing would be left
NOT_NEGATIVE = Range(0)
AT_LEAST_1 = Range(1)
POSITIVE = Range(0, low_open=True)
WHOLE_AT_LEAST_1 = Range(1, say="a whole number of at least 1")
# Image sides in pixels: far beyond any model's training size, short of sizes that cannot fit any memory.
SIDE = Range(8, 16384)


@dataclass(frozen=True)
class PathKey:
    """Marks a key whose value names a file or folder, as `Annotated[str, PATH]`: `path_values` lists them, so
    whoever limits where the app reads and writes sees every one. model: the key also takes a Hugging Face Hub
    id or a URL (engine.hub), which are not paths."""
    model: bool = False


PATH = PathKey()
MODEL_PATH = PathKey(model=True)


@dataclass
class AutoGenerate:
    enabled: bool = False
    negative_prompt: str = ""
    steps: Annotated[int, AT_LEAST_1] = 28
    cfg_scale: Annotated[float, NOT_NEGATIVE] = 7.5
    num_target: Annotated[int, NOT_NEGATIVE] = 100
    batch_size: Annotated[int, AT_LEAST_1] = 1


@dataclass
class InstanceSet:
    path: Annotated[str, PATH] = ""
    prompt: str = ""
    # each image is this many samples of an epoch, so a small concept is not outweighed
    repeats: Annotated[int, WHOLE_AT_LEAST_1] = 1
    mask_path: Annotated[str, PATH] = ""  # a folder of loss masks named <image stem>.png; empty = <stem>.mask.png beside each image
    # an edit model's control images: a folder of <image stem>.<ext>; empty = <stem>.control.<ext> (then
    # .control2, .control3) beside each image
    control_path: Annotated[str, PATH] = ""


@dataclass
class ClassSet:
    path: Annotated[str, PATH] = ""
    prompt: str = ""
    auto_generate: AutoGenerate = field(default_factory=AutoGenerate)


@dataclass
class Concept:
    instance_set: InstanceSet = field(default_factory=InstanceSet)
    class_set: Optional[ClassSet] = None


@dataclass
class Data:
    resolution: Annotated[int, SIDE] = 512
    center_crop: bool = False
    concepts: list[Concept] = field(default_factory=list)


@dataclass
class SamplePrompt:
    prompt: str = ""
    negative_prompt: str = ""
    steps: Annotated[int, AT_LEAST_1] = 28
    cfg_scale: Annotated[float, NOT_NEGATIVE] = 7.5
    num_samples: Annotated[int, NOT_NEGATIVE] = 1
    seed: Annotated[Optional[int], SEED] = None
    width: Annotated[Optional[int], SIDE] = None
    height: Annotated[Optional[int], SIDE] = None
    control_image: Annotated[str, PATH] = ""  # the image an edit model edits for this prompt


@dataclass
class Sampling:
    interval_steps: Annotated[int, NOT_NEGATIVE] = 0  # 0 = no sampling during training
    batch_size: Annotated[int, AT_LEAST_1] = 1
    concepts: list[SamplePrompt] = field(default_factory=list)


@dataclass
class Validation:
    """The loss on held-out images at fixed timesteps with fixed noise, comparable across steps and runs."""
    every_n_steps: Annotated[int, Range(0, say="0 (off) or more")] = 0
    path: Annotated[str, PATH] = ""  # a folder of held-out images, scanned like an instance set
    prompt: str = "{TXT_PROMPT}"  # the caption of each image of path
    split: Annotated[float, FRACTION] = 0.0  # or: this fraction of each concept's instance images, held out of training
    timesteps: list[Annotated[int, NOT_NEGATIVE]] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    seed: Annotated[int, SEED] = 0  # picks the split's images and the noise of every image


@dataclass
class Checkpoint:
    every_n_epochs: Annotated[Optional[int], AT_LEAST_1] = 1
    every_n_train_steps: Annotated[Optional[int], AT_LEAST_1] = None
    save_top_k: Annotated[int, Range(-1, say="-1 (keep all) or more")] = 3  # keep the k newest


@dataclass
class Trainer:
    # Lightning spellings are accepted: 32, 16, "16-mixed", "bf16", "bf16-mixed".
    precision: Union[int, str] = 32
    max_epochs: Annotated[Optional[int], AT_LEAST_1] = 100
    max_steps: Annotated[Optional[int], AT_LEAST_1] = None
    accelerator: Literal["auto", "gpu", "cuda", "cpu"] = "auto"
    devices: Union[int, str, list] = 1
    # how several processes share the work: ddp keeps the whole model, its gradients and optimizer states on
    # every process; fsdp shards a full fine-tune's denoiser, its gradients and optimizer states over them
    strategy: Literal["ddp", "fsdp"] = "ddp"
    log_every_n_steps: Annotated[int, AT_LEAST_1] = 1
    accumulate_grad_batches: Annotated[int, AT_LEAST_1] = 1
    # 0 or null: no clipping, as in Lightning; a negative norm would not clip but flip the step
    gradient_clip_val: Annotated[Optional[float], NOT_NEGATIVE] = None


@dataclass
class PriorPreservation:
    enabled: bool = True
    prior_loss_weight: Annotated[float, NOT_NEGATIVE] = 1.0


@dataclass
class MaskedLoss:
    """Weights each latent pixel's loss by the image's mask (see data.masks): white trains, black does not."""
    enabled: bool = False
    unmasked_weight: Annotated[float, UNIT] = 0.0  # the weight of black mask pixels: 0 = ignored, 1 = trained fully


@dataclass
class ManualBuckets:
    base_res: Annotated[Union[int, list], SIDE] = 512  # a side, or [width, height] as earlier configs wrote it
    # largest bucket area in pixels (768 x 512); at least one 8 x 8 block, a latent pixel
    max_size: Annotated[int, Range(64)] = 393216
    dim_range: list = field(default_factory=lambda: [256, 1024])
    divisor: Annotated[int, SIDE] = 64


@dataclass
class AspectRatioBucket:
    enabled: bool = False
    c_size: Annotated[float, POSITIVE] = 1.5
    c_dim: Annotated[float, Range(1)] = 2.0  # sides within [resolution / c_dim, resolution * c_dim]
    c_div: Annotated[int, AT_LEAST_1] = 8
    max_aspect_error: Annotated[float, POSITIVE] = 0.5
    debug: bool = False
    manual: Optional[ManualBuckets] = None


@dataclass
class Cache:
    latents: bool = False
    text_embeddings: bool = False
    dir: Annotated[Optional[str], PATH] = None  # null = the app's cache folder
    # before_training: encode everything at the start, so the models leave the device from the first step;
    # first_epoch: the first epoch's steps write what they encode anyway, so a large dataset starts at once
    fill: Literal["before_training", "first_epoch"] = "before_training"


@dataclass
class Loggers:
    wandb: Optional[dict] = None
    tensorboard: Optional[dict] = None


@dataclass
class OptimizerParams:
    lr: Annotated[float, POSITIVE] = 1e-6
    beta1: Annotated[float, FRACTION] = 0.9
    beta2: Annotated[float, FRACTION] = 0.999
    weight_decay: Annotated[float, NOT_NEGATIVE] = 1e-2
    eps: Annotated[float, NOT_NEGATIVE] = 1e-8
    # Adafactor only: its own step size from the step count and each weight's scale, instead of lr
    relative_step: bool = False
    warmup_init: bool = False  # with relative_step: that step size grows from 0 over the first steps


@dataclass
class LrScale:
    enabled: bool = False
    method: Literal["sqrt", "linear"] = "sqrt"


@dataclass
class Warmup:
    enabled: bool = False
    init_lr: Annotated[float, NOT_NEGATIVE] = 0.0
    steps: Annotated[int, NOT_NEGATIVE] = 0
    strategy: Literal["linear", "constant"] = "linear"


@dataclass
class LrScheduler:
    name: str = "constant"
    params: dict = field(default_factory=dict)
    warmup: Warmup = field(default_factory=Warmup)


@dataclass
class Optimizer:
    name: str = "torch.optim.AdamW"
    params: OptimizerParams = field(default_factory=OptimizerParams)
    lr_scale: LrScale = field(default_factory=LrScale)
    lr_scheduler: LrScheduler = field(default_factory=LrScheduler)
    # Step each parameter inside backward as soon as its gradient is ready, so that whole-model gradients
    # never exist at once.
    fused_backward: bool = False


# Short names of optimizer.name (case-insensitive); any other name is a class path.
OPTIMIZER_ALIASES = {
    "adamw": "torch.optim.AdamW",
    "adam": "torch.optim.Adam",
    "sgd": "torch.optim.SGD",
    "adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "adamw_8bit": "bitsandbytes.optim.AdamW8bit",
    "bnb.optim.adamw8bit": "bitsandbytes.optim.AdamW8bit",
    "lion": "bitsandbytes.optim.Lion",
    "lion8bit": "bitsandbytes.optim.Lion8bit",
    "prodigy": "prodigyopt.Prodigy",
    "adafactor": "transformers.optimization.Adafactor",
    "adamw_schedulefree": "schedulefree.AdamWScheduleFree",
    "came": "came_pytorch.CAME",
}
# One short name per optimizer, as the app lists them.
OPTIMIZER_NAMES = ("adamw", "adam", "sgd", "adamw8bit", "lion", "lion8bit", "prodigy", "adafactor",
                   "adamw_schedulefree", "came")


def optimizer_path(name: str) -> str:
    """The class path that an optimizer.name stands for."""
    return OPTIMIZER_ALIASES.get(name.lower(), name)


@dataclass
class Ema:
    enabled: bool = False
    decay: Annotated[float, UNIT] = 0.9999
    on_cpu: bool = False
    use_for_samples: bool = False


@dataclass
class Uncond:
    enabled: bool = False
    p: Annotated[float, UNIT] = 0.1
    cond: Literal["zeros", "bos", "eos"] = "zeros"


@dataclass
class Captions:
    """For comma-separated tag captions (booru style)."""
    shuffle_tags: bool = False
    keep_tokens: Annotated[int, NOT_NEGATIVE] = 0  # the first N tags stay in place when shuffling
    tag_dropout: Annotated[float, UNIT] = 0.0  # probability of dropping each tag (never the kept ones)


@dataclass
class AugmentStep:
    name: Literal["hflip", "rotate", "color_jitter"] = "hflip"
    p: Annotated[float, UNIT] = 0.5  # probability the step is applied to an image
    degrees: Annotated[float, Range(0, 180)] = 5.0  # rotate: largest angle either way
    # color_jitter: largest relative change of each; beyond 1 the factor could turn negative
    brightness: Annotated[float, UNIT] = 0.1
    contrast: Annotated[float, UNIT] = 0.1
    saturation: Annotated[float, UNIT] = 0.1


@dataclass
class CustomEmbeddings:
    enabled: bool = False
    path: Annotated[str, PATH] = ""  # a textual-inversion file (.pt / .safetensors) or a folder of them


NETWORK_TYPES = ("full", "lora", "dora", "loha", "lokr")


@dataclass
class Network:
    """What trains: the full weights, or a LoRA-family adapter over frozen base weights."""
    type: Literal["full", "lora", "dora", "loha", "lokr"] = "full"
    rank: Annotated[int, WHOLE_AT_LEAST_1] = 16
    alpha: Annotated[float, POSITIVE] = 16.0  # the adapter's output is scaled by alpha / rank
    conv_rank: Annotated[int, Range(0, say="0 (no LoCon) or more")] = 0  # > 0 also adapts the 3x3 convolutions
    conv_alpha: Annotated[float, NOT_NEGATIVE] = 0.0
    dropout: Annotated[float, FRACTION] = 0.0
    # Flux.1: also adapt each block's modulation layer (the double blocks' img_mod/txt_mod, the single blocks'
    # modulation), as kohya's sd-scripts adapts every Linear of a block; Z-Image: each main block's adaLN
    modulation: bool = False
    init_from: Annotated[Optional[str], PATH] = None  # an adapter .safetensors to continue training from
    text_encoder_lr: Annotated[Optional[float], POSITIVE] = None  # null = optimizer.params.lr

    @property
    def adapter(self) -> bool:
        return self.type != "full"


@dataclass
class Flow:
    """Rectified-flow training, for the flow-matching transformers (Flux.1 and the families after it); DDPM models
    (SD1.x, SD2.x, SDXL) refuse a changed value. Timesteps are sigma x 1000, so min_timestep, max_timestep and
    validation.timesteps keep their meaning of a share of the way from the image to pure noise."""
    # how sigma is drawn before the shift: uniform in [0, 1], sigmoid(N(logit_mean, logit_std)), or
    # sigmoid(sigmoid_scale x N(0, 1))
    timestep_sampling: Literal["uniform", "logit_normal", "sigmoid"] = "logit_normal"
    logit_mean: Annotated[float, Range(-10, 10)] = 0.0
    logit_std: Annotated[float, Range(0, 10, low_open=True)] = 1.0
    sigmoid_scale: Annotated[float, Range(0, 10, low_open=True)] = 1.0
    # sigma -> shift x sigma / (1 + (shift - 1) x sigma); null = the model's own (Flux.1-dev's depends on
    # the image's size, schnell's is 1)
    shift: Annotated[Optional[float], Range(0, 100, low_open=True)] = None
    weighting: Literal["none", "sigma_sqrt", "cosmap"] = "none"  # each sample's loss weight by its sigma
    # the guidance embedding's input while training (Flux.1-dev); null = 1.0 where the model has one
    guidance: Annotated[Optional[float], Range(0, 100)] = None


@dataclass
class MemoryFit:
    """The memory a run must fit in; the memory plan (engine.memory_plan) picks the settings that do."""
    vram_gib: Annotated[Optional[float], POSITIVE] = None  # the card's memory
    ram_gib: Annotated[Optional[float], POSITIVE] = None  # the system's memory


@dataclass
class Memory:
    """Ways to fit a large model on a small card that trade time for device memory (README: How much GPU memory
    a config needs)."""
    # with gradient_checkpointing: the checkpointed denoiser blocks' inputs wait in (pinned) system memory
    # between the forward and the backward pass
    offload_activations: bool = False
    # the denoiser's last N repeated blocks (Flux.1: its transformer blocks, the single ones last; SD/SDXL:
    # the UNet's down and up blocks) wait in pinned system memory and visit the device one at a time
    blocks_on_cpu: Annotated[int, NOT_NEGATIVE] = 0
    # null = train with the config's own settings; set: before setup the trainer applies the memory plan's
    # settings, or refuses to start when none fit
    fit: Optional[MemoryFit] = None


@dataclass
class Config:
    model: Annotated[str, MODEL_PATH] = ""
    # the SHA-256 (64 hex digits) a single-file model (a URL, a Hub file, a local file) must have; null = unchecked
    model_sha256: Optional[str] = None
    vae: Annotated[Optional[str], PATH] = None
    tokenizer: Annotated[Optional[str], PATH] = None
    # separate text-encoder files for single-file models (Flux.1: CLIP-L and T5-XXL); null = the model's own
    text_encoder: Annotated[Optional[str], PATH] = None
    text_encoder_2: Annotated[Optional[str], PATH] = None
    output_dir: Annotated[str, PATH] = "output"
    project: str = "SCAL-SDT"
    description: str = ""  # one line shown by the GUI next to a preset
    batch_size: Annotated[int, AT_LEAST_1] = 1
    seed: Annotated[Optional[int], SEED] = None
    num_workers: Annotated[Optional[int], NOT_NEGATIVE] = 0
    train_text_encoder: bool = False
    # SDXL's second text encoder; null = as train_text_encoder (false with true trains only the first).
    # Flux.1's second (T5-XXL) never trains: true is refused.
    train_text_encoder_2: Optional[bool] = None
    gradient_checkpointing: bool = False
    memory: Memory = field(default_factory=Memory)
    xformers: bool = False
    # torch.compile of the denoiser's repeated blocks (regional compilation) and, where the step encodes its
    # images, the VAE's encoder, once per image size; the kernels are cached on disk
    compile: bool = False
    # 1 = the last layer; at most the depth of the shallowest text encoder (CLIP ViT-L: SD1.x, SDXL's first)
    clip_stop_at_layer: Annotated[int, Range(1, 12)] = 1
    pad_tokens: bool = True
    # bf16 stores trained weights (and so their gradients) in bf16, updated with stochastic rounding.
    weights_dtype: Literal["fp32", "bf16"] = "fp32"
    # How the weights that do not train are stored: an adapter run's base and the frozen text encoders (the
    # VAE stays fp32). fp8 is float8_e4m3fn with a scale per output channel; int8 (a scale per output
    # channel) and nf4 (4-bit NormalFloat, a scale per 64 weights) are bitsandbytes' quantizations, for an
    # adapter run only; each layer computes in the step's precision. Trained weights and adapters keep
    # weights_dtype.
    base_dtype: Literal["fp32", "bf16", "fp8", "int8", "nf4"] = "fp32"
    data: Data = field(default_factory=Data)
    sampling: Sampling = field(default_factory=Sampling)
    validation: Validation = field(default_factory=Validation)
    checkpoint: Checkpoint = field(default_factory=Checkpoint)
    trainer: Trainer = field(default_factory=Trainer)
    prior_preservation: PriorPreservation = field(default_factory=PriorPreservation)
    masked_loss: MaskedLoss = field(default_factory=MaskedLoss)
    aspect_ratio_bucket: AspectRatioBucket = field(default_factory=AspectRatioBucket)
    cache: Cache = field(default_factory=Cache)
    loggers: Loggers = field(default_factory=Loggers)
    optimizer: Optimizer = field(default_factory=Optimizer)
    ema: Ema = field(default_factory=Ema)
    uncond: Uncond = field(default_factory=Uncond)
    captions: Captions = field(default_factory=Captions)
    augment: list[AugmentStep] = field(default_factory=list)
    custom_embeddings: CustomEmbeddings = field(default_factory=CustomEmbeddings)
    network: Network = field(default_factory=Network)
    noise_offset: Annotated[float, UNIT] = 0.0  # usual values are 0.05 to 0.1; 1 is already as large as the noise
    # train only timesteps in [min_timestep, max_timestep) of the noise schedule
    min_timestep: Annotated[int, NOT_NEGATIVE] = 0
    max_timestep: Annotated[Optional[int], AT_LEAST_1] = None  # null = the schedule's length
    # 0 or null: off; a negative gamma would turn the loss weights negative (gradient ascent)
    min_snr_gamma: Annotated[Optional[float], NOT_NEGATIVE] = None
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None  # null = the model's scheduler config
    zero_terminal_snr: bool = False
    flow: Flow = field(default_factory=Flow)

    @property
    def trained_text_encoders(self) -> tuple[str, ...]:
        """The text encoders that train, by diffusers name (SDXL has two; other models ignore the second)."""
        second = self.train_text_encoder if self.train_text_encoder_2 is None else self.train_text_encoder_2
        return tuple(name for name, on in (("text_encoder", self.train_text_encoder), ("text_encoder_2", second))
                     if on)

    @property
    def trains_text_encoder(self) -> bool:
        return bool(self.trained_text_encoders)


# Seed keys that only meant something to PyTorch Lightning: accepted with a warning so old configs load.
IGNORED_KEYS = {
    "trainer.auto_select_gpus", "trainer.benchmark", "trainer.num_nodes",
    "checkpoint.filename", "checkpoint.monitor", "checkpoint.mode", "checkpoint.auto_insert_metric_name",
    "checkpoint.save_last", "checkpoint.dirpath",
}


class ConfigWarning(UserWarning):
    pass


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    if origin is list or tp is list:
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    """Check value against the annotation tp and return it in that type, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        inner, *marks = typing.get_args(tp)
        value = _convert(value, inner, path)
        for mark in marks:
            if isinstance(mark, Range):
                mark.check(value, path)
        return value
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        given = [arg for arg in args if arg is not type(None)]
        if len(given) == 1 and dataclasses.is_dataclass(given[0]):
            return _convert(value, given[0], path)  # an optional section: its message names the key inside it
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{path}': expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{path}': expected {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}': expected a mapping, got {value!r}")
        return _build(tp, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}': expected a list, got {value!r}")
        (item_type,) = typing.get_args(tp)
        return [_convert(item, item_type, f"{path}[{i}]") for i, item in enumerate(value)]
    if tp is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{path}': expected a list, got {value!r}")
        return value
    if tp is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{path}': expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}': expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{path}': expected an integer, got {value!r}")
    if tp is float:
        # YAML 1.1 reads 2e-6 as a string; users write learning rates that way.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"config key '{path}': expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{path}': expected a string, got {value!r}")
    raise ConfigError(f"config key '{path}': unsupported type {tp}")


def _build(cls: type, values: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls, include_extras=True)
    kwargs = {}
    for key, value in values.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if key not in hints:
            if _is_ignored(path):
                notices.warn(f"config key '{path}' has no effect in SCAL-SDT and is ignored", ConfigWarning)
                continue
            allowed = ", ".join(hints)
            raise ConfigError(f"unknown config key '{path}' (allowed here: {allowed})")
        kwargs[key] = _convert(value, hints[key], path)
    return cls(**kwargs)


def check_fields(instance: Any, prefix: str) -> None:
    """Check a dataclass in this schema's style that is not part of Config (a job's options) in place: each
    field converted to its annotated type and held to its Range, a wrong one refused naming `prefix.field`."""
    hints = typing.get_type_hints(type(instance), include_extras=True)
    for f in dataclasses.fields(instance):
        setattr(instance, f.name, _convert(getattr(instance, f.name), hints[f.name], f"{prefix}.{f.name}"))


def _is_ignored(path: str) -> bool:
    generic = path.split("[")[0]
    return generic in IGNORED_KEYS or generic.startswith("loggers.")


def from_dict(values: dict) -> Config:
    if not isinstance(values, dict):
        raise ConfigError("the config file must be a mapping of keys to values")
    config = _build(Config, values, "")
    validate(config)
    return config


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def default_dict() -> dict:
    return to_dict(Config())


def parse_override(text: str) -> tuple[str, Any]:
    """Parse a `--set key.path=value` override; the value is read as YAML (numbers, booleans, lists)."""
    if "=" not in text:
        raise ConfigError(f"--set expects key.path=value, got {text!r}")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = _load_yaml(raw, key=key) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key, value


_KEY_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)((?:\[\d+\])*)")


def key_parts(key: str) -> list:
    """`a.b[0].c` -> ['a', 'b', 0, 'c']; raises ConfigError for anything else."""
    parts: list = []
    for piece in key.split("."):
        match = _KEY_PART.fullmatch(piece)
        if not match:
            raise ConfigError(f"--set: '{key}' is not a key path like data.concepts[0].instance_set.path")
        parts.append(match.group(1))
        parts += [int(i) for i in re.findall(r"\[(\d+)\]", match.group(2))]
    return parts


def apply_override(values: dict, key: str, value: Any) -> None:
    """Set values[key.path] = value; `a.b[0].c` addresses list items."""
    parts = key_parts(key)
    node: Any = values
    for depth, part in enumerate(parts):
        parent = format_key(parts[:depth])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                raise ConfigError(f"config key '{key}': '{parent}' has no list item {part}")
        elif not isinstance(node, dict):
            raise ConfigError(f"config key '{key}': '{parent}' is not a mapping")
        if depth == len(parts) - 1:
            node[part] = value
            return
        if isinstance(part, str) and node.get(part) is None:
            node[part] = [] if isinstance(parts[depth + 1], int) else {}
        node = node[part]


def format_key(parts: list) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(parts))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file") from None
    return parse_yaml(text, f"{path}: ")


# A config is a few levels deep; this bound stops a crafted text long before Python's recursion limit.
MAX_YAML_DEPTH = 64
# Far more digits than any setting has; Python refuses to read an integer of thousands of digits (ValueError).
MAX_INT_DIGITS = 100


def _at(mark: Any) -> str:
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing as each node is reached, before anything is built from it:

    - aliases: an alias shares its anchor's value, so a few nested ones stand for billions of values as soon
      as anything walks the tree (a deep copy, the run's config.yaml), and a config has no use for them;
    - nesting deeper than MAX_YAML_DEPTH: the composer recurses once per level, so a text nested thousands
      deep would end in RecursionError;
    - integers longer than MAX_INT_DIGITS, which Python refuses to read from some thousands of digits on.
    """

    def __init__(self, text: str, where: str, key: str):
        super().__init__(text)
        self.where = where
        self.path: list = [key] if key else []  # the key path of the node being composed

    def compose_node(self, parent: Any, index: Any) -> Any:
        # index: the key node of a mapping's value, a sequence item's position, None for keys and the document
        self.path.append(index.value if isinstance(index, yaml.ScalarNode) else index)
        try:
            event = self.peek_event()
            if isinstance(event, yaml.AliasEvent):
                raise ConfigError(f"config key '{self._key()}': YAML aliases (*{event.anchor}) are not "
                                  f"accepted in a config{_at(event.start_mark)}; write the value out")
            if len(self.path) > MAX_YAML_DEPTH:
                raise ConfigError(f"{self.where}YAML nested more than {MAX_YAML_DEPTH} levels deep"
                                  f"{_at(event.start_mark)}; a config is a few levels deep")
            node = super().compose_node(parent, index)
            if node.tag == "tag:yaml.org,2002:int" and len(node.value) > MAX_INT_DIGITS:
                raise ConfigError(f"config key '{self._key()}': an integer of more than "
                                  f"{MAX_INT_DIGITS} digits{_at(node.start_mark)}")
            return node
        finally:
            self.path.pop()

    def _key(self) -> str:
        return format_key([part for part in self.path if part is not None])


def _load_yaml(text: str, where: str = "", key: str = "") -> Any:
    """The value of a YAML text that holds config values under the key path `key`; raises ConfigError for what
    _ConfigLoader refuses, yaml.YAMLError for syntax."""
    loader = _ConfigLoader(text, where, key)
    try:
        return loader.get_single_data()
    finally:
        loader.dispose()


def parse_yaml(text: str, where: str = "") -> dict:
    """The raw values of a YAML text (a file's, or the app's editor's); `where` prefixes error messages."""
    try:
        values = _load_yaml(text, where)
    except yaml.YAMLError as error:
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}YAML syntax error{_at(getattr(error, 'problem_mark', None))}: {problem}") from None
    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}the config must be a mapping of keys to values")
    return values


def add_overrides_argument(parser, example: str = "") -> None:
    """The `--set KEY=VALUE` option of a command that loads a config: the overrides `load` applies."""
    shown = f", e.g. --set {example}" if example else ""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config key{shown} (repeatable)")


def load(path: str | Path | None = None, overrides: list[str] | None = None,
         base: dict | None = None) -> Config:
    """Load a YAML config (or a dict), apply `--set` overrides, validate; raises ConfigError."""
    values = copy.deepcopy(base) if base is not None else (read_yaml(path) if path else {})
    for text in overrides or []:
        key, value = parse_override(text)
        apply_override(values, key, value)
    return from_dict(values)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(config: Config) -> None:
    """Value checks that types and ranges (checked as the config is built) cannot express; each message names
    its key."""
    _require(config.data.resolution % 8 == 0,
             f"config key 'data.resolution': must be a positive multiple of 8, got {config.data.resolution}")
    # the run folder is output_dir/project/run_id: a path here would put it elsewhere
    _require(config.project not in ("", ".", "..") and not any(sep in config.project for sep in "/\\"),
             f"config key 'project': a name for the runs' folder, without / or \\ and not . or .., "
             f"got {config.project!r}")
    _require(config.trainer.max_epochs is not None or config.trainer.max_steps is not None,
             "config keys 'trainer.max_epochs' and 'trainer.max_steps': set at least one")
    precision = str(config.trainer.precision)
    _require(precision in PRECISIONS,
             f"config key 'trainer.precision': expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    if config.optimizer.fused_backward:
        _require(not config.trainer.gradient_clip_val,
                 "config key 'optimizer.fused_backward': cannot be combined with 'trainer.gradient_clip_val' "
                 "(clipping the global norm needs every gradient at once); set one of them off")
    if config.optimizer.fused_backward or config.weights_dtype == "bf16":
        _require(PRECISIONS[str(config.trainer.precision)] != "float16",
                 "config key 'trainer.precision': fp16 with a grad scaler cannot be combined with "
                 "'optimizer.fused_backward' or 'weights_dtype: bf16'; use precision bf16")
    _require(config.max_timestep is None or config.max_timestep > config.min_timestep,
             f"config keys 'min_timestep' and 'max_timestep': need 0 <= min_timestep < max_timestep, got "
             f"{config.min_timestep} and {config.max_timestep}")
    _validate_validation(config.validation)
    _validate_memory(config)
    _validate_optimizer(config)
    fit = config.memory.fit
    _require(fit is None or (fit.vram_gib is not None and fit.ram_gib is not None),
             "config key 'memory.fit': set both vram_gib and ram_gib (GiB of the card and of system memory), "
             "or leave memory.fit null")
    _require(config.network.adapter or not config.network.modulation,
             "config key 'network.modulation': chooses what an adapter adapts; a full fine-tune (network.type: "
             "full) trains the modulation layers already, so set it to false")
    _require(not (config.base_dtype in ("fp8", "int8", "nf4") and config.network.type == "dora"),
             f"config key 'base_dtype': DoRA rescales by the norm of the base weight, which {config.base_dtype} "
             "storage does not give it; use bf16 or fp32 with network.type dora")
    _require(config.network.adapter or config.base_dtype not in ("int8", "nf4"),
             f"config key 'base_dtype': {config.base_dtype} quantizes an adapter's frozen base, and a full "
             "fine-tune (network.type: full) trains its weights; use an adapter network, or bf16/fp8 for the "
             "frozen text encoders")
    _require(not config.network.adapter or config.network.conv_rank == 0 or config.network.conv_alpha > 0,
             "config key 'network.conv_alpha': must be positive when network.conv_rank is set")
    for i, sample in enumerate(config.sampling.concepts):
        for name in ("width", "height"):
            size = getattr(sample, name)
            # the pipeline needs whole latents: the VAE halves the size three times
            _require(size is None or size % 8 == 0,
                     f"config key 'sampling.concepts[{i}].{name}': must be a positive multiple of 8 (or null for "
                     f"data.resolution), got {size}")
    for i, concept in enumerate(config.data.concepts):
        _require(bool(concept.instance_set.path),
                 f"config key 'data.concepts[{i}].instance_set.path': a folder of training images is required")
        if config.prior_preservation.enabled:
            _require(concept.class_set is not None and bool(concept.class_set.path),
                     f"config key 'data.concepts[{i}].class_set.path': required while "
                     "'prior_preservation.enabled' is true (set it to false for native fine-tuning)")


def _validate_memory(config: Config) -> None:
    memory = config.memory
    _require(config.gradient_checkpointing or not memory.offload_activations,
             "config key 'memory.offload_activations': offloads what gradient checkpointing keeps of each block; "
             "set 'gradient_checkpointing: true' too, or set it to false")
    # a compiled block runs its own forward hooks traced, and block swap's moves of its weights do not take
    # effect there: the block would compute with its weights off the device
    _require(not (config.compile and memory.blocks_on_cpu),
             "config key 'compile': cannot be combined with 'memory.blocks_on_cpu' (block swap moves a block's "
             "weights in hooks that a compiled block does not run as written); set one of them off")
    if memory.blocks_on_cpu:
        _require(config.network.adapter or config.optimizer.fused_backward,
                 "config key 'memory.blocks_on_cpu': a full fine-tune (network.type: full) with blocks on the CPU "
                 "needs 'optimizer.fused_backward: true', so that no full set of gradients waits on the device")


def _validate_validation(validation: Validation) -> None:
    _require(not (validation.path and validation.split > 0),
             "config keys 'validation.path' and 'validation.split': set one of them (a folder of held-out images, "
             "or a fraction of the instance images to hold out), not both")
    _require(validation.split == 0 or validation.every_n_steps > 0,
             "config key 'validation.split': holds images out of training for a validation that is off; set "
             "'validation.every_n_steps' too, or set validation.split to 0")
    _require(validation.every_n_steps == 0 or bool(validation.path) or validation.split > 0,
             "config key 'validation.every_n_steps': validation needs images; set 'validation.path' (a folder) "
             "or 'validation.split' (a fraction of the instance images to hold out)")
    timesteps = validation.timesteps
    _require(bool(timesteps) and len(set(timesteps)) == len(timesteps),
             f"config key 'validation.timesteps': expected a list of distinct timesteps of the noise schedule, "
             f"got {timesteps}")


def _validate_optimizer(config: Config) -> None:
    """What the optimizer named by optimizer.name cannot combine with (see README, Optimizers)."""
    optimizer, network = config.optimizer, config.network
    params, schedule = optimizer.params, optimizer.lr_scheduler
    name = optimizer_path(optimizer.name).rpartition(".")[2]
    if name == "Prodigy":
        # the same rule as the run plan's: fused backward, or bf16 weights that are not an adapter's base
        per_parameter = optimizer.fused_backward or (config.weights_dtype == "bf16" and not network.adapter)
        _require(not per_parameter,
                 "config key 'optimizer.name': Prodigy estimates one step size from all parameters together, "
                 "which one optimizer per parameter (optimizer.fused_backward: true, or weights_dtype: bf16 "
                 "without an adapter) would split; turn those off or pick another optimizer")
        _require(network.text_encoder_lr is None or network.text_encoder_lr == params.lr,
                 "config key 'network.text_encoder_lr': Prodigy takes one learning rate for all parameters; "
                 "leave it null")
        if params.lr < 0.1:
            notices.warn(f"config key 'optimizer.params.lr' is {params.lr:g}: Prodigy multiplies the step size "
                         "it estimates by it, so 1.0 is its usual setting", ConfigWarning)
    if "ScheduleFree" in name:
        _require(schedule.name == "constant",
                 f"config key 'optimizer.lr_scheduler.name': a schedule-free optimizer takes the place of the "
                 f"schedule; use constant (warmup still applies), got {schedule.name!r}")
        warmup = schedule.warmup
        _require(not warmup.enabled or (warmup.strategy == "linear" and warmup.init_lr == 0),
                 "config key 'optimizer.lr_scheduler.warmup': a schedule-free optimizer warms up linearly from "
                 "0 by itself; use strategy linear and init_lr 0")
    _require(name == "Adafactor" or not (params.relative_step or params.warmup_init),
             "config key 'optimizer.params.relative_step': only Adafactor (optimizer.name: adafactor) has a "
             "relative step; set relative_step and warmup_init to false")
    _require(params.relative_step or not params.warmup_init,
             "config key 'optimizer.params.warmup_init': warms up Adafactor's relative step; set "
             "optimizer.params.relative_step to true as well, or warmup_init to false")
    if params.relative_step:
        _require(schedule.name == "constant",
                 f"config key 'optimizer.lr_scheduler.name': Adafactor's relative step sets its own step size "
                 f"and ignores a schedule; use constant, got {schedule.name!r}")
        _require(not schedule.warmup.enabled,
                 "config key 'optimizer.lr_scheduler.warmup.enabled': Adafactor's relative step ignores it; "
                 "set it to false (optimizer.params.warmup_init warms the relative step up)")


# Lightning spellings -> (autocast dtype name or None, use grad scaler)
PRECISIONS = {"32": None, "32-true": None, "16": "float16", "16-mixed": "float16",
              "bf16": "bfloat16", "bf16-mixed": "bfloat16"}


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False, allow_unicode=True)


def _leaves(cls: type = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """(key path, annotation with its Range) of every value the schema holds, sections and lists opened."""
    leaves = []
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        bare = typing.get_args(tp)[0] if typing.get_origin(tp) is Annotated else tp
        inner = [a for a in typing.get_args(bare) if dataclasses.is_dataclass(a)]
        if typing.get_origin(bare) is list and inner:
            leaves += _leaves(inner[0], path + "[]")
        elif dataclasses.is_dataclass(bare):
            leaves += _leaves(bare, path)
        elif inner:
            leaves += _leaves(inner[0], path)
        else:
            leaves.append((path, tp))
    return leaves


def iter_keys() -> list[str]:
    """Every documented key path of the schema, for the README and the GUI."""
    return [path for path, _ in _leaves()]


def ranges() -> dict[str, Range]:
    """The Range of every numeric key path (of each item, for a list of numbers), as the README shows it."""
    found = {}
    for path, tp in _leaves():
        if typing.get_origin(tp) is list:
            (tp,) = typing.get_args(tp)
        if typing.get_origin(tp) is Annotated:
            found.update((path, mark) for mark in typing.get_args(tp)[1:] if isinstance(mark, Range))
    return found


def path_keys() -> dict[str, PathKey]:
    """The PathKey of every key path that names a file or folder (`[]` for each item of a list)."""
    return {path: mark for path, tp in _leaves() if typing.get_origin(tp) is Annotated
            for mark in typing.get_args(tp)[1:] if isinstance(mark, PathKey)}


def path_values(config: Config) -> list[tuple[str, str, PathKey]]:
    """(key path with its list indexes, value, PathKey) of every path the config names; empty ones left out."""
    found = []
    for key, mark in path_keys().items():
        nodes = [("", config)]
        for part in key.split("."):
            name, step = part.removesuffix("[]"), []
            for shown, node in nodes:
                value = None if node is None else getattr(node, name)
                where = f"{shown}.{name}" if shown else name
                if part.endswith("[]"):
                    step += [(f"{where}[{index}]", item) for index, item in enumerate(value or [])]
                else:
                    step.append((where, value))
            nodes = step
        found += [(shown, value, mark) for shown, value in nodes if value]
    return found
