"""The one typed config schema. YAML files, presets, the CLI and the GUI all read their defaults from here.

Key names follow the YAML of SCAL-SDT's earlier command-line trainer (built on PyTorch Lightning),
so configs written for it load unchanged.
"""
from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from . import notices
from .errors import UserError


class ConfigError(UserError, ValueError):
    """A config that cannot run; the message names the key path and what was expected."""


@dataclass
class AutoGenerate:
    enabled: bool = False
    negative_prompt: str = ""
    steps: int = 28
    cfg_scale: float = 7.5
    num_target: int = 100
    batch_size: int = 1


@dataclass
class InstanceSet:
    path: str = ""
    prompt: str = ""
    repeats: int = 1  # each image is this many samples of an epoch, so a small concept is not outweighed
    mask_path: str = ""  # a folder of loss masks named <image stem>.png; empty = <stem>.mask.png beside each image


@dataclass
class ClassSet:
    path: str = ""
    prompt: str = ""
    auto_generate: AutoGenerate = field(default_factory=AutoGenerate)


@dataclass
class Concept:
    instance_set: InstanceSet = field(default_factory=InstanceSet)
    class_set: Optional[ClassSet] = None


@dataclass
class Data:
    resolution: int = 512
    center_crop: bool = False
    concepts: list[Concept] = field(default_factory=list)


@dataclass
class SamplePrompt:
    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 28
    cfg_scale: float = 7.5
    num_samples: int = 1
    seed: Optional[int] = None
    width: Optional[int] = None
    height: Optional[int] = None


@dataclass
class Sampling:
    interval_steps: int = 0  # 0 = no sampling during training
    batch_size: int = 1
    concepts: list[SamplePrompt] = field(default_factory=list)


@dataclass
class Validation:
    """The loss on held-out images at fixed timesteps with fixed noise, comparable across steps and runs."""
    every_n_steps: int = 0  # 0 = off
    path: str = ""  # a folder of held-out images, scanned like an instance set
    prompt: str = "{TXT_PROMPT}"  # the caption of each image of path
    split: float = 0.0  # or: this fraction of each concept's instance images, held out of training
    timesteps: list[int] = field(default_factory=lambda: [100, 300, 500, 700, 900])
    seed: int = 0  # picks the split's images and the noise of every image


@dataclass
class Checkpoint:
    every_n_epochs: Optional[int] = 1
    every_n_train_steps: Optional[int] = None
    save_top_k: int = 3  # keep the k newest; -1 keeps all


@dataclass
class Trainer:
    # Lightning spellings are accepted: 32, 16, "16-mixed", "bf16", "bf16-mixed".
    precision: Union[int, str] = 32
    max_epochs: Optional[int] = 100
    max_steps: Optional[int] = None
    accelerator: Literal["auto", "gpu", "cuda", "cpu"] = "auto"
    devices: Union[int, str, list] = 1
    log_every_n_steps: int = 1
    accumulate_grad_batches: int = 1
    gradient_clip_val: Optional[float] = None


@dataclass
class PriorPreservation:
    enabled: bool = True
    prior_loss_weight: float = 1.0


@dataclass
class MaskedLoss:
    """Weights each latent pixel's loss by the image's mask (see data.masks): white trains, black does not."""
    enabled: bool = False
    unmasked_weight: float = 0.0  # the weight of black mask pixels: 0 = ignored, 1 = trained fully


@dataclass
class ManualBuckets:
    base_res: Union[int, list] = 512  # a side, or [width, height] as earlier configs wrote it
    max_size: int = 393216  # largest bucket area in pixels (768 x 512)
    dim_range: list = field(default_factory=lambda: [256, 1024])
    divisor: int = 64


@dataclass
class AspectRatioBucket:
    enabled: bool = False
    c_size: float = 1.5
    c_dim: float = 2.0
    c_div: int = 8
    max_aspect_error: float = 0.5
    debug: bool = False
    manual: Optional[ManualBuckets] = None


@dataclass
class Cache:
    latents: bool = False
    text_embeddings: bool = False
    dir: Optional[str] = None  # null = the app's cache folder
    # before_training: encode everything at the start, so the models leave the device from the first step;
    # first_epoch: the first epoch's steps write what they encode anyway, so a large dataset starts at once
    fill: Literal["before_training", "first_epoch"] = "before_training"


@dataclass
class Loggers:
    wandb: Optional[dict] = None
    tensorboard: Optional[dict] = None


@dataclass
class OptimizerParams:
    lr: float = 1e-6
    beta1: float = 0.9
    beta2: float = 0.999
    weight_decay: float = 1e-2
    eps: float = 1e-8
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
    init_lr: float = 0.0
    steps: int = 0
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
    decay: float = 0.9999
    on_cpu: bool = False
    use_for_samples: bool = False


@dataclass
class Uncond:
    enabled: bool = False
    p: float = 0.1
    cond: Literal["zeros", "bos", "eos"] = "zeros"


@dataclass
class Captions:
    """For comma-separated tag captions (booru style)."""
    shuffle_tags: bool = False
    keep_tokens: int = 0  # the first N tags stay in place when shuffling
    tag_dropout: float = 0.0  # probability of dropping each tag (never the kept ones)


@dataclass
class AugmentStep:
    name: Literal["hflip", "rotate", "color_jitter"] = "hflip"
    p: float = 0.5  # probability the step is applied to an image
    degrees: float = 5.0  # rotate: largest angle either way
    brightness: float = 0.1  # color_jitter: largest relative change of each
    contrast: float = 0.1
    saturation: float = 0.1


@dataclass
class CustomEmbeddings:
    enabled: bool = False
    path: str = ""  # a textual-inversion file (.pt / .safetensors) or a folder of them


NETWORK_TYPES = ("full", "lora", "dora", "loha", "lokr")


@dataclass
class Network:
    """What trains: the full weights, or a LoRA-family adapter over frozen base weights."""
    type: Literal["full", "lora", "dora", "loha", "lokr"] = "full"
    rank: int = 16
    alpha: float = 16.0  # the adapter's output is scaled by alpha / rank
    conv_rank: int = 0  # > 0 also adapts the 3x3 convolutions (LoCon)
    conv_alpha: float = 0.0
    dropout: float = 0.0
    init_from: Optional[str] = None  # an adapter .safetensors to continue training from
    text_encoder_lr: Optional[float] = None  # null = optimizer.params.lr

    @property
    def adapter(self) -> bool:
        return self.type != "full"


@dataclass
class Config:
    model: str = ""
    vae: Optional[str] = None
    tokenizer: Optional[str] = None
    output_dir: str = "output"
    project: str = "SCAL-SDT"
    description: str = ""  # one line shown by the GUI next to a preset
    batch_size: int = 1
    seed: Optional[int] = None
    num_workers: Optional[int] = 0
    train_text_encoder: bool = False
    # SDXL's second text encoder; null = as train_text_encoder (false with true trains only the first)
    train_text_encoder_2: Optional[bool] = None
    gradient_checkpointing: bool = False
    xformers: bool = False
    clip_stop_at_layer: int = 1
    pad_tokens: bool = True
    # bf16 stores trained weights (and so their gradients) in bf16, updated with stochastic rounding.
    weights_dtype: Literal["fp32", "bf16"] = "fp32"
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
    noise_offset: float = 0.0
    min_timestep: int = 0  # train only timesteps in [min_timestep, max_timestep) of the noise schedule
    max_timestep: Optional[int] = None  # null = the schedule's length
    min_snr_gamma: Optional[float] = None
    prediction_type: Optional[Literal["epsilon", "v_prediction"]] = None  # null = the model's scheduler config
    zero_terminal_snr: bool = False

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
    "trainer.auto_select_gpus", "trainer.strategy", "trainer.benchmark", "trainer.num_nodes",
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
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
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
    hints = typing.get_type_hints(cls)
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
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


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


def parse_yaml(text: str, where: str = "") -> dict:
    """The raw values of a YAML text (a file's, or the app's editor's); `where` prefixes error messages."""
    try:
        values = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        position = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(error, "problem", None) or "invalid YAML"
        raise ConfigError(f"{where}YAML syntax error{position}: {problem}") from None
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
    """Value checks that types alone cannot express; each message names its key."""
    _require(config.batch_size >= 1, f"config key 'batch_size': must be at least 1, got {config.batch_size}")
    _require(config.data.resolution >= 8 and config.data.resolution % 8 == 0,
             f"config key 'data.resolution': must be a positive multiple of 8, got {config.data.resolution}")
    _require(config.clip_stop_at_layer >= 1,
             f"config key 'clip_stop_at_layer': must be 1 (no skip) or more, got {config.clip_stop_at_layer}")
    lr = config.optimizer.params.lr
    _require(lr > 0, f"config key 'optimizer.params.lr': must be positive, got {lr}")
    _require(config.trainer.accumulate_grad_batches >= 1,
             "config key 'trainer.accumulate_grad_batches': must be at least 1")
    _require(config.trainer.max_epochs is not None or config.trainer.max_steps is not None,
             "config keys 'trainer.max_epochs' and 'trainer.max_steps': set at least one")
    precision = str(config.trainer.precision)
    _require(precision in PRECISIONS,
             f"config key 'trainer.precision': expected one of {', '.join(PRECISIONS)}, got {precision!r}")
    _require(0.0 <= config.uncond.p <= 1.0, f"config key 'uncond.p': must be within [0, 1], got {config.uncond.p}")
    _require(config.prior_preservation.prior_loss_weight >= 0,
             "config key 'prior_preservation.prior_loss_weight': must not be negative")
    unmasked = config.masked_loss.unmasked_weight
    _require(0.0 <= unmasked <= 1.0, f"config key 'masked_loss.unmasked_weight': must be within [0, 1] (the loss "
                                     f"weight of black mask pixels), got {unmasked}")
    _require(config.sampling.interval_steps >= 0, "config key 'sampling.interval_steps': must not be negative")
    _require(config.sampling.batch_size >= 1, "config key 'sampling.batch_size': must be at least 1")
    _require(config.trainer.log_every_n_steps >= 1, "config key 'trainer.log_every_n_steps': must be at least 1")
    for key, limit in (("max_epochs", config.trainer.max_epochs), ("max_steps", config.trainer.max_steps)):
        _require(limit is None or limit >= 1, f"config key 'trainer.{key}': must be at least 1 (or null)")
    for key, every in (("every_n_epochs", config.checkpoint.every_n_epochs),
                       ("every_n_train_steps", config.checkpoint.every_n_train_steps)):
        _require(every is None or every >= 1, f"config key 'checkpoint.{key}': must be at least 1 (or null)")
    _require(config.checkpoint.save_top_k >= -1, "config key 'checkpoint.save_top_k': -1 (keep all) or more")
    if config.optimizer.fused_backward:
        _require(not config.trainer.gradient_clip_val,
                 "config key 'optimizer.fused_backward': cannot be combined with 'trainer.gradient_clip_val' "
                 "(clipping the global norm needs every gradient at once); set one of them off")
    if config.optimizer.fused_backward or config.weights_dtype == "bf16":
        _require(PRECISIONS[str(config.trainer.precision)] != "float16",
                 "config key 'trainer.precision': fp16 with a grad scaler cannot be combined with "
                 "'optimizer.fused_backward' or 'weights_dtype: bf16'; use precision bf16")
    _require(config.min_timestep >= 0 and (config.max_timestep is None or config.max_timestep > config.min_timestep),
             f"config keys 'min_timestep' and 'max_timestep': need 0 <= min_timestep < max_timestep, got "
             f"{config.min_timestep} and {config.max_timestep}")
    _validate_validation(config.validation)
    _validate_optimizer(config)
    network = config.network
    if network.adapter:
        _require(network.rank >= 1, f"config key 'network.rank': must be a whole number of at least 1, got "
                                    f"{network.rank}")
        _require(network.alpha > 0, f"config key 'network.alpha': must be positive, got {network.alpha}")
        _require(network.conv_rank >= 0, "config key 'network.conv_rank': must be 0 (no LoCon) or more")
        _require(network.conv_rank == 0 or network.conv_alpha > 0,
                 "config key 'network.conv_alpha': must be positive when network.conv_rank is set")
        _require(0.0 <= network.dropout < 1.0, f"config key 'network.dropout': must be within [0, 1), got "
                                               f"{network.dropout}")
        _require(network.text_encoder_lr is None or network.text_encoder_lr > 0,
                 "config key 'network.text_encoder_lr': must be positive (or null for optimizer.params.lr)")
    for i, sample in enumerate(config.sampling.concepts):
        key = f"sampling.concepts[{i}]"
        for name in ("width", "height"):
            size = getattr(sample, name)
            # the pipeline needs whole latents: the VAE halves the size three times
            _require(size is None or (size >= 8 and size % 8 == 0),
                     f"config key '{key}.{name}': must be a positive multiple of 8 (or null for data.resolution), "
                     f"got {size}")
        _require(sample.steps >= 1, f"config key '{key}.steps': must be at least 1, got {sample.steps}")
        _require(sample.num_samples >= 0, f"config key '{key}.num_samples': must not be negative")
    for i, concept in enumerate(config.data.concepts):
        if concept.class_set is not None:
            generation, key = concept.class_set.auto_generate, f"data.concepts[{i}].class_set.auto_generate"
            _require(generation.steps >= 1, f"config key '{key}.steps': must be at least 1, got {generation.steps}")
            _require(generation.batch_size >= 1,
                     f"config key '{key}.batch_size': must be at least 1, got {generation.batch_size}")
            _require(generation.num_target >= 0, f"config key '{key}.num_target': must not be negative")
        _require(bool(concept.instance_set.path),
                 f"config key 'data.concepts[{i}].instance_set.path': a folder of training images is required")
        _require(concept.instance_set.repeats >= 1,
                 f"config key 'data.concepts[{i}].instance_set.repeats': must be a whole number of at least 1 "
                 f"(samples per image and epoch), got {concept.instance_set.repeats}")
        if config.prior_preservation.enabled:
            _require(concept.class_set is not None and bool(concept.class_set.path),
                     f"config key 'data.concepts[{i}].class_set.path': required while "
                     "'prior_preservation.enabled' is true (set it to false for native fine-tuning)")


def _validate_validation(validation: Validation) -> None:
    _require(validation.every_n_steps >= 0,
             f"config key 'validation.every_n_steps': must be 0 (off) or more, got {validation.every_n_steps}")
    _require(0.0 <= validation.split < 1.0,
             f"config key 'validation.split': must be within [0, 1) (a fraction of each concept's instance "
             f"images), got {validation.split}")
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
    _require(bool(timesteps) and min(timesteps) >= 0 and len(set(timesteps)) == len(timesteps),
             f"config key 'validation.timesteps': expected a list of distinct timesteps of the noise schedule "
             f"(0 or more), got {timesteps}")


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


def iter_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every documented key path of the schema, for the README and the GUI."""
    keys = []
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = typing.get_type_hints(cls)[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if typing.get_origin(tp) is list and inner:
            keys += iter_keys(inner[0], path + "[]")
        elif dataclasses.is_dataclass(tp):
            keys += iter_keys(tp, path)
        elif inner:
            keys += iter_keys(inner[0], path)
        else:
            keys.append(path)
    return keys
