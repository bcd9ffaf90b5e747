"""Convert a training checkpoint or a diffusers model folder to one original-layout Stable Diffusion or
SDXL file (.safetensors or .ckpt) that A1111, ComfyUI and diffusers' single-file loader read.

A training checkpoint holds only what was trained (unet/, maybe text_encoder/, SDXL's text_encoder_2/ and
ema_unet/); the other components come from the run's base model named in its meta.json, and the VAE from
the run's `vae:` when it trained with a separate one. SDXL's two text encoders go in and out together: the
text-encoder options apply to both.

An adapter run's checkpoint (meta.json network: lora, dora, loha or lokr) holds only the adapter's weights,
under peft's names. It converts to one of three files (ADAPTER_OUTPUTS): the kohya/LyCORIS adapter file
(the default), the base model with the adapter merged in as one original-layout file (--merge), or
diffusers' own LoRA layout (--format diffusers). The adapter's layers are rebuilt from the run's
config.yaml (its network settings) over the base model, and its weights loaded into them.

A FLUX.1 or Chroma run (its base model recognised as `family.family_for` recognises it) converts to its
transformer alone in Black Forest Labs' layout (`keymap_flux`), the file ComfyUI's diffusion_models/ folder
and Forge load beside the text-encoder (CLIP-L and T5-XXL; Chroma: T5-XXL) and autoencoder files users
already have; the trainer keeps the transformer in the checkpoint's unet/ folder. A Z-Image run likewise
converts to its transformer alone in the original layout (`keymap_zimage`), with its diffusers config
recorded in the file's metadata; a Qwen-Image run to its transformer alone, whose diffusers keys are already
those of ComfyUI's Qwen-Image files.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from .. import checkpoints, events, paths
from ..config import Config
from ..ema import EMA_FOLDER
from ..errors import UserError
from .sd import is_diffusers_folder
from . import keymap_flux, keymap_flux2, keymap_sdxl, keymap_zimage
from .chroma import is_chroma_transformer
from .flux import is_flux_transformer
from .flux2_klein import is_flux2_klein, is_klein_transformer
from .zimage import is_zimage_transformer
from .qwen_image import ARCH as QWEN_IMAGE_ARCH
from .qwen_image import file_state, is_qwen_image, is_qwen_image_transformer, load_transformer_file, recorded_config
from .keymap import KEY_MAPS, check_complete, to_original
from .single_file import CONFIGS_KEY, model_configs
from ..run_dir import RunDir

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = {".safetensors": "safetensors", ".ckpt": "ckpt"}
COMPONENTS = ("unet", "vae", "text_encoder")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
ADAPTED = ("unet", "text_encoder", "text_encoder_2")  # the components an adapter run can train

# What an adapter run's checkpoint converts to, and the command-line flag that asks for each.
ADAPTER_OUTPUTS = {
    "kohya": "the adapter as one kohya/LyCORIS .safetensors file (A1111, ComfyUI, diffusers' load_lora_weights)",
    "merged": "the base model with the adapter merged in, as one original-layout .safetensors/.ckpt file",
    "diffusers": "diffusers' own LoRA layout: a folder with pytorch_lora_weights.safetensors",
}
ADAPTER_FLAGS = {"kohya": "(the default)", "merged": "--merge", "diffusers": "--format diffusers"}
DIFFUSERS_WEIGHTS = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights gives the file
# diffusers builds LoRA (and DoRA) layers from its own layout's files; it has no LoHa or LoKr text-encoder path.
DIFFUSERS_NETWORKS = ("lora", "dora")
# The LoraConfig fields written into a diffusers LoRA file: what this trainer sets. The full config of the
# installed peft would carry fields that older peft versions (and so older diffusers setups) refuse.
DIFFUSERS_CONFIG_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "lora_dropout",
                           "use_dora")


def _config(model) -> Mapping:
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else config


def build_key_maps(models: Mapping[str, torch.nn.Module]) -> dict:
    """Component -> {diffusers key: Target}; raises UserError for an architecture without an original layout."""
    key_maps = keymap_sdxl.KEY_MAPS if keymap_sdxl.is_sdxl_models(models) else KEY_MAPS
    maps = {name: key_maps[name](_config(model), model.state_dict().keys()) for name, model in models.items()}
    check_complete(maps)
    return maps


def estimate_output_bytes(models: Mapping[str, torch.nn.Module], dtypes: Mapping[str, torch.dtype]) -> int:
    """Tensor bytes the converter writes for these models (works on the meta device); the file adds a header."""
    total = 0
    for name, mapping in build_key_maps(models).items():
        state = models[name].state_dict()
        for key in mapping:
            tensor = state[key]
            size = dtypes[name].itemsize if tensor.is_floating_point() else tensor.element_size()
            total += tensor.numel() * size
    return total


def format_size(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


@dataclass
class AdapterRun:
    """An adapter run's checkpoint: which components carry an adapter, and the run's config (its network)."""
    checkpoint: Path
    config: Config
    trained: tuple[str, ...]
    meta: dict

    @property
    def network(self):
        return self.config.network


@dataclass
class Source:
    models: dict = field(default_factory=dict)
    name: str = "model"
    prediction_type: str = "epsilon"
    adapter: Optional[AdapterRun] = None
    config_folder: Optional[Path] = None  # the diffusers configs of the base model


def _prediction_type(base: Path) -> str:
    scheduler = base / "scheduler" / "scheduler_config.json"
    if scheduler.is_file():
        return json.loads(scheduler.read_text(encoding="utf-8")).get("prediction_type", "epsilon")
    return "epsilon"


def _run_vae(run_dir: Path) -> Optional[Path]:
    from ..config import read_yaml

    config = RunDir(run_dir).config
    vae = read_yaml(config).get("vae") if config.is_file() else None
    return Path(paths.resolve(vae)) if vae else None


def _load_model(name: str, folder: Path):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if not folder.is_dir():
        raise UserError(f"{folder}: not found (needed for the {name})")
    # fp32 whatever the files hold, as training loads them: an adapter is merged at full precision, and
    # every component is cast to its output dtype when written.
    if name == "unet" and (transformer := _transformer_class(folder)):
        import diffusers

        return getattr(diffusers, transformer).from_pretrained(folder, torch_dtype=torch.float32)
    if name in TEXT_ENCODERS:
        loader = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        return loader.from_pretrained(folder, dtype=torch.float32)
    loader = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}[name]
    return loader.from_pretrained(folder, torch_dtype=torch.float32)


def _transformer_class(folder: Path) -> Optional[str]:
    """The class of the transformer in folder (a model's transformer/, a checkpoint's unet/): FLUX.1's, Chroma's,
    Z-Image's, FLUX.2's or Qwen-Image's; None for a UNet."""
    if is_flux_transformer(folder):
        return "FluxTransformer2DModel"
    if is_chroma_transformer(folder):
        return "ChromaTransformer2DModel"
    if is_zimage_transformer(folder):
        return "ZImageTransformer2DModel"
    if is_klein_transformer(folder):
        return "Flux2Transformer2DModel"
    return "QwenImageTransformer2DModel" if is_qwen_image_transformer(folder) else None


def _component_folder(base: Path, component: str) -> Path:
    """A component's folder in a diffusers model folder: a transformer model's denoiser is transformer/."""
    if component == "unet" and _transformer_class(base / "transformer"):
        return base / "transformer"
    return base / component


def checkpoint_path(source: str | Path) -> Path:
    """The path SOURCE names; a run folder stands for its newest checkpoint."""
    path = Path(paths.resolve(str(source)))
    if not path.exists():
        raise UserError(f"{source}: not found")
    if not (path / checkpoints.META_FILE).is_file() and RunDir(path).checkpoints.is_dir():
        path = checkpoints.latest_checkpoint(path) or path
    return path


def _base_model(path: Path) -> Optional[Path]:
    """The model a checkpoint's weights go with (meta.json base_model), or the model folder itself."""
    if (path / checkpoints.META_FILE).is_file():
        base_name = checkpoints.read_meta(path).get("base_model")
        return Path(paths.resolve(base_name)) if base_name else None
    return path if is_diffusers_folder(path) else None


def is_sdxl_source(source: str | Path) -> bool:
    """Whether SOURCE (a checkpoint, run folder or model folder) is of an SDXL model."""
    from .sdxl import is_sdxl_folder
    from .single_file import detect_family, read_shapes

    base = _base_model(checkpoint_path(source))
    if base is None or not base.exists():
        return False  # load_source says what is wrong with it
    return is_sdxl_folder(base) if base.is_dir() else detect_family(read_shapes(base)) == "sdxl"


def is_flux_source(source: str | Path) -> bool:
    """Whether SOURCE (a checkpoint, run folder or model folder) is of a model of Flux's blocks: FLUX.1, Chroma
    (whose transformers convert alike) or FLUX.2 [klein]."""
    from .chroma import is_chroma
    from .flux import is_flux

    base = _base_model(checkpoint_path(source))
    return base is not None and base.exists() and any(
        is_family(str(base)) for is_family in (is_flux, is_chroma, is_flux2_klein))


def is_zimage_source(source: str | Path) -> bool:
    """Whether SOURCE (a checkpoint, run folder or model folder) is of a Z-Image model."""
    from .zimage import is_zimage

    base = _base_model(checkpoint_path(source))
    return base is not None and base.exists() and is_zimage(str(base))


def is_qwen_image_source(source: str | Path) -> bool:
    """Whether SOURCE (a checkpoint, run folder or model folder) is of a Qwen-Image model."""
    base = _base_model(checkpoint_path(source))
    return base is not None and base.exists() and is_qwen_image(str(base))


def _with_text_encoders(components: tuple[str, ...], sdxl: bool) -> tuple[str, ...]:
    """SDXL's second text encoder goes wherever the first one does."""
    if not sdxl or "text_encoder" not in components:
        return components
    index = components.index("text_encoder") + 1
    return components[:index] + ("text_encoder_2",) + components[index:]


def checkpoint_name(checkpoint: Path) -> str:
    """RUN-step-N: the name of the files converted from a training checkpoint."""
    return f"{checkpoint.parent.parent.name}-{checkpoint.name}"


def _adapter_run(path: Path, meta: dict) -> Optional[AdapterRun]:
    """The adapter run a checkpoint belongs to, or None for a full fine-tune's checkpoint."""
    from ..config import load as load_config

    network = meta.get("network", "full")
    if network == "full":
        return None
    config_file = RunDir(path.parent.parent).config
    if not config_file.is_file():
        raise UserError(f"{path}: a {network} adapter checkpoint needs its run's {config_file} (the network "
                        "settings rebuild the adapter's layers); not found")
    config = load_config(config_file)
    if config.network.type != network:
        raise UserError(f"config key 'network.type': {config_file} says {config.network.type}, but "
                        f"{path.name} was trained as {network} (meta.json network)")
    trained = tuple(c for c in ADAPTED if c in meta.get("trained", ()))
    return AdapterRun(checkpoint=path, config=config, trained=trained, meta=meta)


def find_adapter_run(source: str | Path) -> Optional[AdapterRun]:
    """The adapter run of SOURCE (a checkpoint or a run folder), or None for anything else."""
    path = checkpoint_path(source)
    if not (path / checkpoints.META_FILE).is_file():
        return None
    return _adapter_run(path, checkpoints.read_meta(path))


def _adapt(model: torch.nn.Module, component: str, adapter: AdapterRun, merge: bool,
           ema: bool = False) -> torch.nn.Module:
    """The base model with the checkpoint's adapter (or, ema, the UNet adapter's average) on it, or merged
    into its weights as the run stored them (base_dtype)."""
    from ..ema import averaged_parameters, load_ema
    from .adapters import add_adapter, load_adapter_folder, merge_adapter

    add_adapter(model, component, adapter.network, 0)  # the initial weights are replaced by the checkpoint's
    load_adapter_folder(model, adapter.checkpoint / component, "network")
    if ema and component == "unet":
        load_ema(adapter.checkpoint, adapter.config.ema, "cpu", model).copy_to(averaged_parameters(model))
    model.eval()  # adapter dropout off: what is converted is the adapter as it applies at inference
    if not merge:
        return model
    if adapter.config.base_dtype != "fp32":
        from ..base_weights import STORAGE, store_frozen

        # the base as the run stored it, which merge_adapter dequantizes: what the adapter trained over
        store_frozen(model, STORAGE[adapter.config.base_dtype])
    return merge_adapter(model)


def load_source(source: str | Path, wanted: tuple[str, ...], ema: bool = False,
                on_loaded: Optional[Callable[[str], None]] = None, merge_adapters: bool = True) -> Source:
    """Load the wanted components of a training checkpoint, a run folder (its newest checkpoint) or a
    diffusers folder. An adapter checkpoint's components are the base model's with the adapter merged in,
    or, with merge_adapters false, with the adapter's layers on them."""
    path = checkpoint_path(source)
    # Components that replace the base model's: what the run trained, and the VAE the run used.
    own: dict[str, Path] = {}
    trained_as = None
    adapter = None
    if (path / checkpoints.META_FILE).is_file():
        meta = checkpoints.read_meta(path)
        trained_as = meta.get("prediction_type")
        base_name = meta.get("base_model")
        if not base_name:
            raise UserError(f"{path / checkpoints.META_FILE}: no base_model recorded")
        base = Path(paths.resolve(base_name))
        if not base.exists():
            raise UserError(f"{path}: its base model {base} (meta.json base_model) is not found")
        adapter = _adapter_run(path, meta)
        if ema and not (path / EMA_FOLDER).is_dir():
            raise UserError(f"--ema: {path} has no ema_unet/ (the run did not keep an EMA)")
        # An adapter run's trained components are the base model's, with the adapter added once loaded.
        if adapter is None:
            own["unet"] = path / (EMA_FOLDER if ema else "unet")
            for encoder in TEXT_ENCODERS:
                if (path / encoder).is_dir():
                    own[encoder] = path / encoder
        run_vae = _run_vae(path.parent.parent)
        if run_vae is not None:
            own["vae"] = run_vae
        name = checkpoint_name(path)
    elif is_diffusers_folder(path):
        if ema:
            raise UserError(f"--ema: {path} is a diffusers model folder; only training checkpoints have ema_unet/")
        base, name = path, path.name
    else:
        raise UserError(f"{source}: neither a training checkpoint (no meta.json) nor a diffusers model folder "
                        "(no model_index.json)")

    result = Source(name=name, adapter=adapter)
    base_components = None
    from .chroma import CONFIGS as CHROMA_CONFIGS, is_chroma
    from .flux import is_flux
    from .zimage_files import is_zimage_file

    if base.is_file() and is_flux(str(base)):
        from .single_file import flux_config_folder, load_flux_transformer

        result.config_folder = flux_config_folder(base)
        if "unet" in wanted and "unet" not in own:
            base_components = {"unet": load_flux_transformer(base)}
    elif base.is_file() and is_zimage_file(base):
        from .single_file import BUILTIN_CONFIGS
        from .zimage_files import load_zimage_transformer

        result.config_folder = BUILTIN_CONFIGS / "z-image"
        if "unet" in wanted and "unet" not in own:
            base_components = {"unet": load_zimage_transformer(base)}
    elif base.is_file() and is_chroma(str(base)):
        from .single_file import load_chroma_transformer

        result.config_folder = CHROMA_CONFIGS
        if "unet" in wanted and "unet" not in own:
            base_components = {"unet": load_chroma_transformer(base)}
    elif base.is_file() and is_flux2_klein(str(base)):
        from .flux2_klein_files import ARCH as KLEIN_ARCH
        from .flux2_klein_files import load_klein_transformer
        from .single_file import BUILTIN_CONFIGS

        result.config_folder = BUILTIN_CONFIGS / KLEIN_ARCH
        if "unet" in wanted and "unet" not in own:
            base_components = {"unet": load_klein_transformer(base)}
    elif base.is_file() and is_qwen_image(str(base)):
        from .single_file import BUILTIN_CONFIGS

        result.config_folder = BUILTIN_CONFIGS / QWEN_IMAGE_ARCH
        if "unet" in wanted and "unet" not in own:
            base_components = {"unet": load_transformer_file(base, torch.float32)}
    elif base.is_file():
        from .family import text_encoder_parts
        from .single_file import config_folder, load_single_file_components, read_shapes

        result.config_folder = config_folder(base, read_shapes(base))
        if any(component not in own for component in wanted):
            vae = str(own["vae"]) if "vae" in own else None
            loaded = load_single_file_components(base, vae=vae)
            base_components = {"unet": loaded.unet, "vae": loaded.vae, **text_encoder_parts(loaded.text_encoder)}
    else:
        result.config_folder = base
    # the run may have trained it as another
    result.prediction_type = trained_as or _prediction_type(result.config_folder)
    for component in wanted:
        if component in own:
            result.models[component] = _load_model(component, own[component])
        elif base_components is not None:
            result.models[component] = base_components[component]
        else:
            result.models[component] = _load_model(component, _component_folder(base, component))
        if adapter is not None and component in adapter.trained:
            result.models[component] = _adapt(result.models[component], component, adapter, merge_adapters, ema)
        if on_loaded:
            on_loaded(component)
    return result


def output_path(out: str | Path, name: str, fmt: Optional[str]) -> tuple[Path, str]:
    """A .safetensors/.ckpt path is the file; anything else is a folder that gets NAME.<format>."""
    if fmt is not None and fmt not in FORMATS.values():
        raise UserError(f"--format: expected safetensors or ckpt, got {fmt!r}")
    out = Path(out).expanduser()
    named = FORMATS.get(out.suffix.lower())
    if named is None and out.is_file():
        raise UserError(f"{out}: expected a .safetensors or .ckpt file name, or a folder")
    if named is None or out.is_dir():
        fmt = fmt or "safetensors"
        return out / f"{name}.{fmt}", fmt
    if fmt is not None and fmt != named:
        raise UserError(f"--format {fmt} does not match the output file name {out.name}")
    return out, named


def adapter_output_path(out: str | Path, name: str, kind: str, network: str) -> Path:
    """Where an adapter file goes: a .safetensors OUT is the file; a folder gets NAME-NETWORK.safetensors, or
    for diffusers' layout a folder NAME-NETWORK-diffusers/ holding pytorch_lora_weights.safetensors, the file
    load_lora_weights looks for in a folder. The names differ from the merged file's (NAME.safetensors), so
    every kind converts into the same folder."""
    out = Path(out).expanduser()
    suffix = out.suffix.lower()
    if suffix in FORMATS and not out.is_dir():
        if suffix != ".safetensors":
            raise UserError(f"{out.name}: an adapter file is .safetensors; a .ckpt is written only with --merge")
        return out
    if out.is_file():
        raise UserError(f"{out}: expected a .safetensors file name, or a folder")
    if kind == "diffusers":
        return out / f"{name}-{network}-diffusers" / DIFFUSERS_WEIGHTS
    return out / f"{name}-{network}.safetensors"


def _write(state: dict, path: Path, fmt: str, metadata: Optional[dict[str, str]] = None) -> None:
    # Written beside the target and renamed, so an interrupted conversion never leaves a truncated file.
    temp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            # safetensors creates its files owner-only; give the file the mode the umask gives a new file.
            temp.touch()
            mode = temp.stat().st_mode
            save_file(state, str(temp), metadata={"format": "pt"} if metadata is None else metadata)
            os.chmod(temp, mode)
        else:
            torch.save({"state_dict": state}, temp)
        os.replace(temp, path)
    except OSError as error:  # a folder made read-only or removed since the checks, a full disk
        raise UserError(f"{path}: cannot be written: {error.strerror or error}") from None
    finally:
        temp.unlink(missing_ok=True)


def _check_output_folder(target: Path) -> None:
    """Refuse, before the minutes of loading, an output that could not be written: a path that runs through a
    file, or a folder this user cannot write to (os.access also sees a read-only mount)."""
    folder = target.parent
    existing = next(p for p in (folder, *folder.parents) if p.exists())  # the folder, or what would hold it
    if not existing.is_dir():
        raise UserError(f"{target}: cannot be written: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{target}: cannot be written: {existing} is not writable (choose another output path)")


def _make_output_folder(target: Path) -> None:
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # changed since _check_output_folder
        raise UserError(f"{target}: cannot create its folder: {error.strerror or error}") from None


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists (pass --overwrite to replace it)")


def _dtype(option: str, value: str) -> torch.dtype:
    if value not in DTYPES:
        raise UserError(f"{option}: expected one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


def _check_adapter_options(source, adapter: Optional[AdapterRun], kind: str, fmt: Optional[str], ema: bool,
                           vae_dtype: str) -> None:
    """Refuse, before any loading, what cannot be written for this source: one line naming the flag."""
    if kind not in ADAPTER_OUTPUTS:
        raise UserError(f"adapter output: expected one of {', '.join(ADAPTER_OUTPUTS)}, got {kind!r}")
    if adapter is None:
        if kind != "kohya":
            raise UserError(f"{ADAPTER_FLAGS[kind]}: {source} is not an adapter run's checkpoint (its network is "
                            "full, or it is a model folder); only a LoRA-family adapter has "
                            + ("weights to merge" if kind == "merged" else "a diffusers LoRA layout"))
        return
    if kind == "merged":
        return
    if fmt == "ckpt":
        raise UserError("--format ckpt: an adapter file is .safetensors; a .ckpt is written only with --merge")
    if vae_dtype != "fp32":
        raise UserError("--vae-dtype: an adapter file holds no VAE; the option applies with --merge")
    if kind == "diffusers" and adapter.network.type not in DIFFUSERS_NETWORKS:
        raise UserError(f"--format diffusers: diffusers' LoRA layout is written for "
                        f"{' and '.join(DIFFUSERS_NETWORKS)} adapters (diffusers builds no LoHa layers, nor LoKr "
                        f"ones in a text encoder), not network.type {adapter.network.type}; write the "
                        "kohya/LyCORIS file (without --format diffusers) instead")


def _kohya_file(loaded: Source, dtypes: Mapping[str, torch.dtype]) -> tuple[dict, dict[str, str]]:
    """The kohya/LyCORIS tensors of the loaded adapters and the metadata the training run wrote."""
    from . import kohya

    adapter = loaded.adapter
    state = kohya.to_kohya(loaded.models, adapter.config)
    for component in loaded.models:
        prefix = kohya.component_prefixes(loaded.models, component)
        for key in [k for k in state if k.startswith(prefix)]:
            state[key] = state[key].to(dtypes[component])
    written = adapter.checkpoint / kohya.ADAPTER_EXPORT
    if written.is_file():
        from safetensors import safe_open

        with safe_open(str(written), "pt") as handle:
            metadata = dict(handle.metadata() or {})  # the record of the training run, kept as it was
    else:
        meta = adapter.meta
        metadata = kohya.metadata(adapter.config, loaded.models, meta.get("step", 0), meta.get("epoch", 0), 0)
        metadata.pop("ss_num_train_images")  # not recorded in the checkpoint: better absent than wrong
    # what this file is, whichever version of the trainer wrote the checkpoint's copy
    metadata["ss_training_comment"] = kohya.training_comment(adapter.network.type)
    return state, metadata


def _diffusers_file(loaded: Source, dtypes: Mapping[str, torch.dtype]) -> tuple[dict, dict[str, str]]:
    """The adapters in diffusers' LoRA layout: peft's names behind `unet.`/`text_encoder.`, as
    save_lora_weights writes them, with each component's LoraConfig under lora_adapter_metadata (without
    it the loader would take alpha = rank, and not the network's scale alpha / rank)."""
    from .adapters import adapter_state, peft_config
    from .kohya import is_flux, is_qwen_image, is_zimage

    network = loaded.adapter.network
    state: dict[str, torch.Tensor] = {}
    configs: dict[str, object] = {}
    for component, model in loaded.models.items():
        # diffusers' transformer pipelines name their denoiser transformer; the trainer keeps it as the unet
        name_in_file = "transformer" if is_flux(model) or is_zimage(model) or is_qwen_image(model) else component
        for key, tensor in adapter_state(model).items():
            if component in TEXT_ENCODERS:
                # The names as CLIPTextModel nested them before transformers 5: diffusers strips the
                # text_model. prefix for a flat model, and older versions need it.
                key = "text_model." + key.removeprefix("text_model.")
                if key.endswith(".lora_magnitude_vector"):
                    # transformers 5 loads a text encoder's adapter by parameter name, and DoRA's magnitude
                    # is the .weight of a module; peft's own loader (UNet, older transformers) reads both.
                    key += ".weight"
            state[f"{name_in_file}.{key}"] = tensor.to(dtypes[component]).contiguous()
        # Target modules match by name suffix, so the text encoder's flat names fit either nesting.
        config = peft_config(model, component, network).to_dict()
        for name in DIFFUSERS_CONFIG_FIELDS:
            value = config[name]
            configs[f"{name_in_file}.{name}"] = sorted(value) if isinstance(value, (set, list, tuple)) else value
    return state, {"format": "pt", "lora_adapter_metadata": json.dumps(configs, indent=2, sort_keys=True)}


class ProgressSteps:
    """Counts a conversion's steps: each one a log line and a progress event."""

    def __init__(self, emit: Callable[[events.Event], None], total: int):
        self.emit, self.total, self.done = emit, total, 0

    def __call__(self, message: str) -> None:
        self.done += 1
        self.emit(events.Log(message=message))
        self.emit(events.Progress(done=self.done, total=self.total))


def _convert_adapter(adapter: AdapterRun, out, kind: str, wanted: tuple[str, ...],
                     dtypes: Mapping[str, torch.dtype], overwrite: bool, ema: bool,
                     emit: Callable[[events.Event], None]) -> Path:
    """Write an adapter checkpoint's adapter as a kohya/LyCORIS or diffusers LoRA file."""
    # The target is known from the checkpoint's name: an existing file is refused before any loading.
    target = adapter_output_path(out, checkpoint_name(adapter.checkpoint), kind, adapter.network.type)
    _check_output_folder(target)
    _refuse_existing(target, overwrite)
    step = ProgressSteps(emit, total=len(wanted) + 2)  # load each adapted component, convert, write

    loaded = load_source(adapter.checkpoint, wanted, on_loaded=lambda c: step(f"loaded the {c} with its adapter"),
                         merge_adapters=False, ema=ema)
    state, metadata = (_diffusers_file if kind == "diffusers" else _kohya_file)(loaded, dtypes)
    loaded.models.clear()
    step(f"converted the adapter to the {'diffusers LoRA' if kind == 'diffusers' else 'kohya/LyCORIS'} layout")
    _make_output_folder(target)
    expected = sum(t.numel() * t.element_size() for t in state.values())
    free = shutil.disk_usage(target.parent).free
    if free < expected:
        raise UserError(f"not enough free space in {target.parent}: the file needs about {format_size(expected)}, "
                        f"{format_size(free)} free")
    _write(state, target, "safetensors", metadata)
    step(f"wrote {target} ({format_size(target.stat().st_size)})")
    if kind == "kohya" and adapter.network.type == "dora":
        from .kohya import DORA_NOTE

        emit(events.Log(level="warning", message=DORA_NOTE))
    return target


def convert_checkpoint(source: str | Path, out: str | Path, *, text_encoder: bool = True, vae: bool = True,
                       unet_dtype: str = "fp32", vae_dtype: str = "fp32", text_encoder_dtype: str = "fp32",
                       ema: bool = False, fmt: Optional[str] = None, adapter_output: str = "kohya",
                       overwrite: bool = False,
                       on_event: Optional[Callable[[events.Event], None]] = None) -> Path:
    """Write SOURCE as one original-layout file and return its path; emits Progress and Log events.

    An adapter run's checkpoint is written as adapter_output says (ADAPTER_OUTPUTS): the kohya/LyCORIS
    adapter file, the merged model, or diffusers' LoRA layout (also asked for with fmt="diffusers"). The
    dtype options apply to the adapter's weights of each component; the text_encoder option leaves the text
    encoder's adapter out. For SDXL the text-encoder options apply to both text encoders.
    """
    emit = on_event or (lambda event: None)
    text_dtype = _dtype("--text-encoder-dtype", text_encoder_dtype)
    dtypes = {"unet": _dtype("--unet-dtype", unet_dtype), "vae": _dtype("--vae-dtype", vae_dtype),
              "text_encoder": text_dtype, "text_encoder_2": text_dtype}
    if fmt == "diffusers":
        if adapter_output == "merged":
            raise UserError("--merge: a merged model is an original-layout file; it cannot be written with "
                            "--format diffusers (an adapter layout)")
        fmt, adapter_output = None, "diffusers"
    adapter = find_adapter_run(source)
    _check_adapter_options(source, adapter, adapter_output, fmt, ema, vae_dtype)
    if adapter is not None and adapter_output != "merged":
        wanted = tuple(c for c in adapter.trained if text_encoder or c not in TEXT_ENCODERS)
        return _convert_adapter(adapter, out, adapter_output, wanted, dtypes, overwrite, ema, emit)

    flux = is_flux_source(source)
    zimage = not flux and is_zimage_source(source)
    qwen_image = not (flux or zimage) and is_qwen_image_source(source)
    sdxl = not (flux or zimage or qwen_image) and is_sdxl_source(source)
    wanted = ("unet",) if flux or zimage or qwen_image else _with_text_encoders(
        tuple(c for c, keep in zip(COMPONENTS, (True, vae, text_encoder)) if keep), sdxl)
    step = ProgressSteps(emit, total=2 * len(wanted) + 1)  # load and convert each component, then write

    # A named output file is checked before minutes of loading; a folder's file name needs the source.
    target, _ = output_path(out, "", fmt)
    _check_output_folder(target)
    if target == Path(out).expanduser():
        _refuse_existing(target, overwrite)
    def loaded_one(component: str) -> None:
        adapted = adapter is not None and component in adapter.trained
        step(f"loaded the {component}" + (" and merged its adapter in" if adapted else ""))

    loaded = load_source(source, wanted, ema=ema, on_loaded=loaded_one)
    target, fmt = output_path(out, loaded.name, fmt)
    _refuse_existing(target, overwrite)
    _make_output_folder(target)
    if flux:
        from diffusers import ChromaTransformer2DModel, Flux2Transformer2DModel

        transformer = loaded.models.pop("unet")
        klein = isinstance(transformer, Flux2Transformer2DModel)
        note = (FLUX2_KLEIN_NOTE if klein else CHROMA_NOTE if isinstance(transformer, ChromaTransformer2DModel)
                else FLUX_NOTE)
        state = keymap_flux.to_original(transformer.state_dict(), keymap_flux2.LAYOUT if klein else keymap_flux.FLUX1)
        return _write_transformer(state, target, fmt, dtypes["unet"], step, emit, note)
    if zimage:
        transformer = loaded.models.pop("unet")
        # the architecture only: the library's bookkeeping (`_name_or_path`…) names this machine's folders
        config = {k: v for k, v in transformer.config.items() if not k.startswith("_")}
        return _write_transformer(keymap_zimage.to_original(transformer.state_dict()), target, fmt, dtypes["unet"],
                                  step, emit, ZIMAGE_NOTE,
                                  {CONFIGS_KEY: json.dumps({"transformer": config}, sort_keys=True)})
    if qwen_image:
        from .qwen_image_edit import ARCH as EDIT_ARCH
        from .qwen_image_edit import PIPELINE_CLASS, is_qwen_image_edit

        transformer = loaded.models.pop("unet")
        path = checkpoint_path(source)
        # the edit model's file says so, its layout being Qwen-Image's: an edit model's base, or a run trained as one
        trained_as = checkpoints.read_meta(path).get("family") if (path / checkpoints.META_FILE).is_file() else None
        edit = PIPELINE_CLASS if trained_as == EDIT_ARCH or is_qwen_image_edit(str(_base_model(path))) else None
        return _write_transformer(file_state(transformer), target, fmt, dtypes["unet"], step, emit,
                                  QWEN_IMAGE_NOTE, {CONFIGS_KEY: json.dumps(recorded_config(transformer, edit))})

    expected = estimate_output_bytes(loaded.models, dtypes)
    free = shutil.disk_usage(target.parent).free
    if free < expected:
        raise UserError(f"not enough free space in {target.parent}: the file needs about {format_size(expected)}, "
                        f"{format_size(free)} free")
    key_maps = build_key_maps(loaded.models)
    state: dict[str, torch.Tensor] = {}
    for component in wanted:
        model = loaded.models.pop(component)  # release each source model once converted
        state.update(to_original(model.state_dict(), key_maps[component], dtypes[component]))
        del model
        step(f"converted the {component} to {str(dtypes[component]).removeprefix('torch.')}")
    if loaded.prediction_type == "v_prediction":
        advice = ("load it with the UI's v-prediction setting" if sdxl else
                  "A1111 needs a v-prediction config (v2-inference-v.yaml) saved beside it as "
                  f"{target.with_suffix('.yaml').name}")
        emit(events.Log(level="warning",
                        message=f"this is a v-prediction model and only this app reads that from the file: {advice}"))
    _write(state, target, fmt, {"format": "pt", CONFIGS_KEY: json.dumps(
        model_configs(loaded.config_folder, loaded.prediction_type), sort_keys=True)})
    step(f"wrote {target} ({format_size(target.stat().st_size)})")
    return target


FLUX_NOTE = ("FLUX.1: the file holds the transformer only (ComfyUI's diffusion_models/ folder); load CLIP-L, "
             "T5-XXL and the autoencoder (ae.safetensors) beside it")
CHROMA_NOTE = ("Chroma: the file holds the transformer only (ComfyUI's diffusion_models/ folder); load T5-XXL and "
               "the autoencoder (ae.safetensors) beside it")
FLUX2_KLEIN_NOTE = ("FLUX.2 [klein]: the file holds the transformer only (ComfyUI's diffusion_models/ folder); load "
                    "its Qwen3 text encoder and FLUX.2's autoencoder beside it")
ZIMAGE_NOTE = ("Z-Image: the file holds the transformer only (ComfyUI's diffusion_models/ folder); load Qwen3-4B "
               "(qwen_3_4b.safetensors) and Flux.1's autoencoder (ae.safetensors) beside it")
QWEN_IMAGE_NOTE = ("Qwen-Image: the file holds the transformer only (ComfyUI's diffusion_models/ folder); load "
                   "Qwen2.5-VL-7B and the Qwen-Image autoencoder beside it")


def _write_transformer(state: dict, target: Path, fmt: str, dtype: torch.dtype, step: "ProgressSteps",
                       emit: Callable[[events.Event], None], note: str, metadata: Optional[dict] = None) -> Path:
    """A transformer's state (in the file's layout) as one file without prefix: what ComfyUI's
    diffusion_models/ folder loads (its text encoders and autoencoder are separate files there); metadata is
    added to a .safetensors file's."""
    state = {key: tensor.to(dtype) if tensor.is_floating_point() else tensor for key, tensor in state.items()}
    expected = sum(t.numel() * t.element_size() for t in state.values())
    free = shutil.disk_usage(target.parent).free
    if free < expected:
        raise UserError(f"not enough free space in {target.parent}: the file needs about {format_size(expected)}, "
                        f"{format_size(free)} free")
    step(f"converted the transformer to {str(dtype).removeprefix('torch.')}")
    _write(state, target, fmt, {"format": "pt", **(metadata or {})})
    step(f"wrote {target} ({format_size(target.stat().st_size)})")
    emit(events.Log(message=note))
    return target


def cmd_convert(args) -> int:
    import sys

    def show(event: events.Event) -> None:
        # Loading SD-sized models takes a while: each step is reported as it finishes.
        if isinstance(event, events.Log):
            prefix = "" if event.level == "info" else f"{event.level}: "
            print(prefix + event.message, file=sys.stderr)

    path = convert_checkpoint(
        args.checkpoint, args.out, text_encoder=not args.no_text_encoder, vae=not args.no_vae,
        unet_dtype=args.unet_dtype, vae_dtype=args.vae_dtype, text_encoder_dtype=args.text_encoder_dtype,
        ema=args.ema, fmt=args.format, adapter_output="merged" if args.merge else "kohya",
        overwrite=args.overwrite, on_event=show)
    print(f"{path} ({format_size(path.stat().st_size)})")
    return 0


def register(subparsers) -> None:
    import argparse

    parser = subparsers.add_parser(
        "convert", help="write a checkpoint or diffusers folder as one .safetensors/.ckpt file (A1111, ComfyUI); "
                        "an adapter run's checkpoint as its LoRA file, or merged into its base model",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="A full fine-tune's checkpoint (or a diffusers folder) becomes one original-layout model file.\n"
                    "An adapter run's checkpoint (network.type lora, dora, loha, lokr) becomes, by default, its\n"
                    "kohya/LyCORIS adapter file OUT or OUT/NAME-NETWORK.safetensors (A1111, ComfyUI, diffusers'\n"
                    "load_lora_weights); with --merge the base model with the adapter merged in, as one model\n"
                    "file; with --format diffusers diffusers' own LoRA layout, a folder\n"
                    f"OUT/NAME-NETWORK-diffusers/ holding {DIFFUSERS_WEIGHTS} (or the .safetensors file OUT).\n"
                    "For an adapter file --unet-dtype and --text-encoder-dtype set the adapter's weight types and\n"
                    "--no-text-encoder leaves the text encoder's adapter out. SDXL's two text encoders go in\n"
                    "and out together; --text-encoder-dtype applies to both.")
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="training checkpoint (run/checkpoints/step-N), run folder or diffusers folder")
    parser.add_argument("out", metavar="OUT",
                        help="output .safetensors/.ckpt file, or a folder for a file named after the checkpoint")
    parser.add_argument("--no-text-encoder", action="store_true",
                        help="leave the text encoder (SDXL: both) out (of an adapter file: its text-encoder "
                             "adapter)")
    parser.add_argument("--no-vae", action="store_true", help="leave the VAE out")
    for component in ("unet", "vae", "text-encoder"):
        parser.add_argument(f"--{component}-dtype", choices=list(DTYPES), default="fp32",
                            help=f"{component.replace('-', ' ')} weight type (default fp32)"
                                 + ("" if component == "vae" else "; of an adapter file, its adapter's"))
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA UNet (ema_unet/)")
    parser.add_argument("--merge", action="store_true",
                        help="adapter runs: write the base model with the adapter merged in, as one "
                             ".safetensors/.ckpt model file (default: the kohya/LyCORIS adapter file)")
    parser.add_argument("--format", choices=[*FORMATS.values(), "diffusers"],
                        help="file format when OUT is a folder (default safetensors; a file's extension decides); "
                             "diffusers: an adapter run's LoRA in diffusers' layout (not with --merge)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=cmd_convert)
