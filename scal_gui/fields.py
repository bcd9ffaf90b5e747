"""Form fields bound to config keys.

A field names a key path of engine.config's schema; its type, default and choices are read from the
dataclasses there, so the form never holds a second copy of a default. Forms edit a raw config dict
(the YAML as written), which keeps keys the form does not show and stays as compact as a preset.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal, Union

from engine import config as schema

_MISSING = object()  # the key, a mapping or a list item on its path is absent (or null)
_BLOCKED = object()  # a value on the key's path holds no keys: the form cannot write past it


class FormError(ValueError):
    """A form value that cannot become its config key's type."""


def _parts(key: str) -> list:
    """`a.b[0].c` -> ["a", "b", 0, "c"], with the engine's own key syntax."""
    return schema.key_parts(key)


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        optional = len(args) < len(typing.get_args(tp))
        return (args[0] if len(args) == 1 else Union[tuple(args)]), optional
    return tp, False


def _field_default(cls: type, name: str) -> Any:
    for f in dataclasses.fields(cls):
        if f.name == name:
            if f.default is not dataclasses.MISSING:
                return f.default
            return f.default_factory()
    raise KeyError(name)


def describe(key: str) -> tuple[Any, bool, Any]:
    """(type, optional, default) of a config key path such as `data.concepts[0].instance_set.path`."""
    cls: Any = schema.Config
    parts = _parts(key)
    tp, optional, default = cls, False, None
    for position, part in enumerate(parts):
        if isinstance(part, int):
            (cls,) = typing.get_args(tp)
            continue
        hints = typing.get_type_hints(cls)
        if part not in hints:
            raise KeyError(f"{key}: the config schema has no key {part!r}")
        tp, optional = _unwrap_optional(hints[part])
        default = _field_default(cls, part)
        if position < len(parts) - 1 and dataclasses.is_dataclass(tp):
            cls = tp
    return tp, optional, default


@dataclass(frozen=True)
class Field:
    key: str
    label: str
    info: str = ""
    form_kind: str = ""  # overrides the kind read from a schema type wider than what the form edits
    # A choice among these names where the schema takes any string: other values stay allowed.
    suggestions: tuple[str, ...] = ()

    @property
    def type(self) -> Any:
        return describe(self.key)[0]

    @property
    def optional(self) -> bool:
        return describe(self.key)[1]

    @property
    def default(self) -> Any:
        return describe(self.key)[2]

    @property
    def kind(self) -> str:
        """How the form shows it: bool, int, float, choice or text."""
        if self.form_kind:
            return self.form_kind
        tp = self.type
        if self.choices:
            return "choice"
        return {bool: "bool", int: "int", float: "float"}.get(tp, "text")

    @property
    def typed_as_text(self) -> bool:
        """An optional number is edited in a text box, where empty means None: gradio's number input shows
        an empty value as 0 and sends that 0 back, which would switch an option such as Min-SNR on (or make
        the config invalid) as soon as the field is drawn."""
        return self.optional and self.kind in ("int", "float")

    @property
    def choices(self) -> tuple[str, ...]:
        if self.suggestions:
            return self.suggestions
        tp = self.type
        if typing.get_origin(tp) is Literal:
            return tuple(str(a) for a in typing.get_args(tp))
        if self.key == "trainer.precision":
            # The schema types precision as int-or-str; the accepted spellings live in PRECISIONS.
            return tuple(schema.PRECISIONS)
        return ()

    def fits(self, value: Any) -> bool:
        """Whether a config value can be shown in this field (the schema would accept its type)."""
        kind = self.kind
        if value is None:
            return self.optional
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "int":
            return isinstance(value, int) and not isinstance(value, bool)
        if kind == "float":
            if isinstance(value, bool):
                return False
            try:
                float(value)  # YAML reads 1e-6 as a string; the schema accepts it
            except (TypeError, ValueError):
                return False
            return True
        if kind == "choice":
            return str(value) in self.choices or (bool(self.suggestions) and isinstance(value, str))
        return isinstance(value, str)

    def to_form(self, value: Any) -> Any:
        if value is None:
            return "" if self.kind == "text" or self.typed_as_text else None
        if self.kind == "choice":
            return str(value)
        if self.kind == "float":
            value = float(value)
        return str(value) if self.typed_as_text else value

    def from_form(self, value: Any) -> Any:
        """The config value for a form value; raises FormError naming the key."""
        kind = self.kind
        if value is None or (isinstance(value, str) and value.strip() == "" and kind != "text"):
            if self.optional:
                return None
            raise FormError(f"config key '{self.key}': a value is required")
        if kind == "text":
            return None if (value == "" and self.optional) else str(value)
        if kind == "bool":
            return bool(value)
        if kind == "choice":
            text = str(value)
            return int(text) if text.isdigit() else text
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise FormError(f"config key '{self.key}': expected a number, got {value!r}") from None
        if kind == "int":
            if not number.is_integer():
                raise FormError(f"config key '{self.key}': expected an integer, got {value!r}")
            return int(number)
        return number


def _lookup(raw: dict, key: str) -> Any:
    node: Any = raw
    for part in _parts(key):
        if node is None:
            return _MISSING
        if not isinstance(node, list if isinstance(part, int) else dict):
            return _BLOCKED
        if part not in (range(len(node)) if isinstance(part, int) else node):
            return _MISSING
        node = node[part]
    return node


def get_value(raw: dict, key: str) -> Any:
    """The value at key in a raw config dict, or the schema default when the key is absent.

    Where the path runs into a value that holds no keys (`data: 5`), a marker that fits no field is returned,
    so that misfits names the key.
    """
    _, optional, default = describe(key)
    value = _lookup(raw, key)
    if value is _MISSING or (value is None and not optional):
        return default
    return value


def set_value(raw: dict, key: str, value: Any) -> None:
    """Set key in a raw config dict with the engine's override, adding the list items the key addresses.

    The override creates absent mappings but, like `--set`, refuses list items that are not there yet;
    the form adds them, because its first concept is where a new config's folders go.
    """
    parts = _parts(key)
    for depth, index in enumerate(parts):
        if not isinstance(index, int):
            continue
        prefix = schema.format_key(parts[:depth])
        items = _lookup(raw, prefix)
        items = list(items) if isinstance(items, list) else []
        if index < len(items) and items[index] is not None:
            continue
        items += [{} for _ in range(index + 1 - len(items))]
        items[index] = {}
        schema.apply_override(raw, prefix, items)
    schema.apply_override(raw, key, value)


def misfits(raw: dict, fields: typing.Sequence[Field]) -> list[str]:
    """Keys whose value in raw has a type its field cannot show."""
    return [f.key for f in fields if not f.fits(get_value(raw, f.key))]


def form_values(raw: dict, fields: typing.Sequence[Field]) -> list:
    # An absent key shows the field's default, which for the sample table is a row to type into.
    return [f.to_form(f.default if _lookup(raw, f.key) is _MISSING else get_value(raw, f.key)) for f in fields]


def apply_form(raw: dict, fields: typing.Sequence[Field], values: typing.Sequence) -> dict:
    """A copy of raw with the form's values written in; raw must have no misfits.

    Only changes are written: a value the key already holds keeps its spelling (`lr: 1e-6` stays a
    string), and a schema default is not added where the key is absent, so a field the user left alone
    adds nothing (for instance no class set to a native fine-tuning config).
    Changes are judged against raw, not the copy being written: two fields may show the same key (the
    first sample prompt is also the sample table's first row), and only the one the user edited writes it.
    """
    result = copy.deepcopy(raw)
    for f, value in zip(fields, values, strict=True):
        converted = f.from_form(value)
        existing = _lookup(raw, f.key)
        if existing is _MISSING:
            # The default as the form shows and returns it: the sample table reads an absent list as one row.
            if converted != f.from_form(f.to_form(f.default)):
                set_value(result, f.key, converted)
        elif not (f.fits(existing) and f.from_form(f.to_form(existing)) == converted):
            set_value(result, f.key, converted)
    return result


def blank(cell: Any) -> bool:
    """An empty table cell: the page sends "" or null, and NaN where a number cell was cleared."""
    return cell is None or (isinstance(cell, str) and not cell.strip()) or (isinstance(cell, float) and cell != cell)


@dataclass(frozen=True)
class SampleTable(Field):
    """The whole list `sampling.concepts` as a table, one row per sample prompt, a column per key.

    Each cell is converted by the Field of its own key (`sampling.concepts[1].steps`), so an error names the
    row and the column. A blank cell leaves its key out (the schema default); a row left wholly blank, as a
    newly added one is, is no prompt.
    """
    form_kind: str = "table"

    COLUMNS = tuple(f.name for f in dataclasses.fields(schema.SamplePrompt))

    @staticmethod
    def column(index: int, name: str) -> Field:
        return Field(f"sampling.concepts[{index}].{name}", name)

    @property
    def default(self) -> Any:
        # An absent list shows one row of defaults, to type a first prompt into.
        return [dataclasses.asdict(schema.SamplePrompt())]

    def fits(self, value: Any) -> bool:
        return isinstance(value, list) and all(
            isinstance(item, dict) and set(item) <= set(self.COLUMNS)
            and all(self.column(0, name).fits(cell) for name, cell in item.items()) for item in value)

    def to_form(self, value: Any) -> list:
        rows = []
        for item in value:
            row = []
            for name in self.COLUMNS:
                cell = item.get(name, self.column(0, name).default)
                # Optional numbers show empty for None; the others as their column shows them.
                row.append("" if cell is None else self.column(0, name).to_form(cell))
            rows.append(row)
        return rows

    def from_form(self, value: Any) -> list:
        items: list[dict] = []
        for row in value or []:
            cells = list(row)[:len(self.COLUMNS)]
            cells += [None] * (len(self.COLUMNS) - len(cells))
            if all(blank(cell) for cell in cells):
                continue
            item: dict = {"prompt": "" if blank(cells[0]) else str(cells[0])}
            for name, cell in zip(self.COLUMNS[1:], cells[1:]):
                if blank(cell):
                    continue
                column = self.column(len(items), name)
                converted = column.from_form(cell)
                if converted != column.default:
                    item[name] = converted
            items.append(item)
        return items


SAMPLES = (SampleTable("sampling.concepts", "Sample prompts",
                       "one row per prompt; blank cells take the defaults, seed and size blank = random and "
                       "the training resolution; the first prompt is also the Sample prompt above"),)

_CONCEPT = "data.concepts[0]"
_AUTO = f"{_CONCEPT}.class_set.auto_generate"

DATASET = (
    Field("prior_preservation.enabled", "DreamBooth with prior preservation",
          "off = native fine-tuning on the captioned folder below"),
    Field(f"{_CONCEPT}.instance_set.path", "Instance folder (or captioned fine-tune folder)",
          "a folder path or demo:sample-data/instance, demo:sample-data/finetune"),
    Field(f"{_CONCEPT}.instance_set.prompt", "Instance prompt", "{TXT_PROMPT} is replaced by each image's caption"),
    Field(f"{_CONCEPT}.instance_set.repeats", "Repeats", "times each image is seen per epoch"),
    Field("masked_loss.enabled", "Masked loss", "each image's mask (name.mask.png) weights its loss: white trains"),
    Field("masked_loss.unmasked_weight", "Weight outside the mask", "0 = black mask pixels are ignored, 1 = trained"),
    Field(f"{_CONCEPT}.instance_set.mask_path", "Mask folder", "masks named name.png; empty = name.mask.png beside"),
    Field(f"{_CONCEPT}.instance_set.control_path", "Control folder",
          "an edit model's control images named name.png; empty = name.control.png beside"),
    Field(f"{_CONCEPT}.class_set.path", "Class folder", "regularization images for prior preservation"),
    Field("data.resolution", "Resolution", "pixels, a multiple of 8"),
    Field("data.center_crop", "Centre crop", "off = random crop position"),
    Field("aspect_ratio_bucket.enabled", "Aspect-ratio buckets"),
    Field("aspect_ratio_bucket.c_size", "Max bucket area", "× resolution²"),
    Field("aspect_ratio_bucket.c_dim", "Side range", "sides within resolution ÷ and × this"),
    Field("aspect_ratio_bucket.c_div", "Side step divisor", "side step = resolution ÷ this"),
    Field("aspect_ratio_bucket.max_aspect_error", "Max aspect error", "images at or above it are skipped"),
)

CLASS_IMAGES = (
    Field(f"{_CONCEPT}.class_set.prompt", "Class prompt"),
    Field(f"{_AUTO}.negative_prompt", "Negative prompt"),
    Field(f"{_AUTO}.steps", "Steps"),
    Field(f"{_AUTO}.cfg_scale", "Guidance scale (CFG)"),
    Field(f"{_AUTO}.num_target", "Images wanted", "total in the class folder; existing ones count"),
)

TRAIN = (
    Field("model", "Base model", "diffusers folder, .safetensors/.ckpt file or demo:tiny-sd"),
    Field("vae", "VAE", "a separate VAE (Flux.1, Chroma and Z-Image single files: ae.safetensors; Qwen-Image: "
                        "qwen_image_vae.safetensors; FLUX.2 [klein]: flux2-vae.safetensors); empty = the model's own"),
    Field("text_encoder", "Text encoder file", "Flux.1 single files: clip_l.safetensors; Chroma: "
                                               "t5xxl_fp16.safetensors; Z-Image and FLUX.2 [klein]: "
                                               "qwen_3_4b.safetensors; Qwen-Image: qwen_2.5_vl_7b.safetensors; "
                                               "ComfyUI's fp8-scaled ones too; empty = the model's own"),
    Field("text_encoder_2", "Second text encoder file", "Flux.1 single files: t5xxl_fp16.safetensors or "
                                                        "t5xxl_fp8_e4m3fn_scaled.safetensors"),
    Field("output_dir", "Output folder"),
    Field("project", "Project"),
    Field("seed", "Seed", "empty = random, recorded in the run"),
    Field("batch_size", "Batch size"),
    Field("trainer.max_steps", "Max steps", "empty = no step limit"),
    Field("trainer.max_epochs", "Max epochs", "empty = no epoch limit"),
    Field("trainer.accumulate_grad_batches", "Gradient accumulation"),
    Field("trainer.precision", "Precision"),
    Field("trainer.accelerator", "Device"),
    # The schema also takes Lightning's device lists and strings; the app runs a number of processes.
    Field("trainer.devices", "Devices", "processes (GPUs); 2 or more train through torchrun, -1 = every GPU",
          form_kind="int"),
    Field("optimizer.name", "Optimizer", "a short name (README, Optimizers) or a class path such as torch.optim.AdamW",
          suggestions=schema.OPTIMIZER_NAMES),
    Field("optimizer.params.lr", "Learning rate"),
    Field("optimizer.lr_scheduler.name", "LR schedule", "constant, linear, cosine, … or a class path"),
    Field("optimizer.lr_scheduler.warmup.enabled", "Warmup"),
    Field("optimizer.lr_scheduler.warmup.steps", "Warmup steps"),
    Field("train_text_encoder", "Train the text encoder"),
    Field("gradient_checkpointing", "Gradient checkpointing"),
    Field("ema.enabled", "EMA of the UNet"),
    Field("prior_preservation.prior_loss_weight", "Prior loss weight"),
    Field("sampling.interval_steps", "Sample every N steps", "0 = never"),
    Field("sampling.concepts[0].prompt", "Sample prompt"),
    Field("validation.every_n_steps", "Validation loss every N steps", "0 = never; needs a split or a folder"),
    Field("validation.split", "Validation split", "fraction of the instance images held out, e.g. 0.1"),
    Field("validation.path", "Validation folder", "held-out images instead of a split"),
    Field("checkpoint.every_n_train_steps", "Checkpoint every N steps", "empty = every N epochs"),
    Field("checkpoint.save_top_k", "Checkpoints kept", "-1 keeps all"),
)

ADVANCED = (
    Field("clip_stop_at_layer", "CLIP skip", "1 = last layer, 2 = penultimate"),
    Field("ema.decay", "EMA decay"),
    Field("ema.use_for_samples", "Samples use the EMA weights"),
    Field("noise_offset", "Noise offset", "e.g. 0.05; 0 = off"),
    Field("min_snr_gamma", "Min-SNR γ", "e.g. 5; empty = off"),
    Field("min_timestep", "Min timestep", "train only timesteps from this one on"),
    Field("max_timestep", "Max timestep", "train only timesteps below this one; empty = all"),
    Field("prediction_type", "Prediction type", "empty = the model's own"),
    Field("zero_terminal_snr", "Zero terminal SNR", "use with v_prediction"),
    Field("uncond.enabled", "Caption dropout"),
    Field("uncond.p", "Caption dropout probability"),
    Field("uncond.cond", "Dropped caption becomes"),
    Field("captions.shuffle_tags", "Shuffle caption tags"),
    Field("captions.keep_tokens", "Tags kept in place"),
    Field("captions.tag_dropout", "Tag dropout"),
    Field("custom_embeddings.enabled", "Custom embeddings"),
    Field("custom_embeddings.path", "Embeddings file or folder"),
    Field("cache.latents", "Cache latents", "needs centre crop and no augmentation"),
    Field("cache.text_embeddings", "Cache text embeddings", "text encoder frozen, captions not shuffled"),
    Field("cache.fill", "Fill the caches", "first_epoch: training starts at once, the VAE stays on the GPU "
          "for that epoch"),
    Field("optimizer.fused_backward", "Optimizer step in backward", "saves gradient memory; no clipping"),
    Field("optimizer.params.relative_step", "Adafactor relative step", "its own step size; lr is not used"),
    Field("optimizer.params.warmup_init", "Adafactor relative-step warmup", "with relative step: grows from 0"),
    Field("weights_dtype", "Weights dtype", "bf16 = less memory (RTX 30xx or newer)"),
    Field("base_dtype", "Frozen weights stored as", "an adapter's base and frozen text encoders; bf16, fp8, int8 "
          "or nf4 = less memory (int8 and nf4: adapters only)"),
    Field("memory.offload_activations", "Offload checkpointed activations",
          "with gradient checkpointing: blocks' inputs wait in system memory; slower"),
    Field("memory.blocks_on_cpu", "Denoiser blocks on the CPU",
          "the last N blocks wait in system memory, moved in as they run; slower (full: fused backward)"),
    Field("flow.timestep_sampling", "Timestep sampling",
          "flow-matching models (Flux.1, Chroma, Z-Image, Qwen-Image): how σ is drawn"),
    Field("flow.logit_mean", "Logit-normal mean"),
    Field("flow.logit_std", "Logit-normal std"),
    Field("flow.sigmoid_scale", "Sigmoid scale"),
    Field("flow.shift", "Timestep shift", "empty = the model's own (Flux.1-dev: by image size; Z-Image: 3)"),
    Field("flow.weighting", "Loss weighting by σ"),
    Field("flow.guidance", "Guidance while training", "Flux.1-dev's guidance input; empty = 1.0"),
    Field("xformers", "xformers attention", "used only when installed and on CUDA"),
    Field("compile", "Compile the denoiser's blocks", "torch.compile of its repeated blocks: faster steps after "
          "the first step of each image size compiles; not with blocks on the CPU or fsdp"),
    # beside the memory switches: on one GPU per process, what lets a full fine-tune fit several
    Field("trainer.strategy", "Multi-device strategy", "ddp: each device holds the whole model; fsdp: a full "
          "fine-tune's weights, gradients and optimizer states are split over the devices (README, Several GPUs)"),
)

NETWORK = (
    Field("network.type", "Network", "full = every weight trains; lora, dora, loha, lokr train an adapter file"),
    Field("network.rank", "Rank", "the adapter's dimension (kohya's network_dim)"),
    Field("network.alpha", "Alpha", "the adapter's update is scaled by alpha ÷ rank"),
    Field("network.conv_rank", "Conv rank", "> 0 also adapts the 3×3 convolutions (LoCon); 0 = off"),
    Field("network.conv_alpha", "Conv alpha", "scale of the convolutions' adapter: conv alpha ÷ conv rank"),
    Field("network.dropout", "Adapter dropout"),
    Field("network.modulation", "Adapt modulation layers", "Flux.1: also each block's modulation (as kohya's); "
                                                              "Z-Image: each block's adaLN"),
    Field("network.text_encoder_lr", "Text encoder learning rate",
          "empty = the learning rate; with Train the text encoder"),
    Field("network.init_from", "Continue from adapter file", "a kohya/LyCORIS .safetensors; empty = a new adapter"),
)

# The sample table comes before the Sample prompt box: while the user types in the box, the table's first row
# is redrawn a moment later, and the box, written last, wins over a table still showing the previous text.
ALL = DATASET + CLASS_IMAGES + SAMPLES + TRAIN + ADVANCED + NETWORK
