"""Convert a training checkpoint or a diffusers model folder to one original-layout Stable Diffusion file
(.safetensors or .ckpt) that A1111, ComfyUI and diffusers' single-file loader read.

A training checkpoint holds only what was trained (unet/, maybe text_encoder/ and ema_unet/); the other
components come from the run's base model named in its meta.json, and the VAE from the run's `vae:` when
it trained with a separate one.
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
from ..ema import EMA_FOLDER
from ..errors import UserError
from .sd import is_diffusers_folder
from .keymap import KEY_MAPS, check_complete, to_original
from ..run_dir import RunDir

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
FORMATS = {".safetensors": "safetensors", ".ckpt": "ckpt"}
COMPONENTS = ("unet", "vae", "text_encoder")


def _config(model) -> Mapping:
    config = model.config
    return config.to_dict() if hasattr(config, "to_dict") else config


def build_key_maps(models: Mapping[str, torch.nn.Module]) -> dict:
    """Component -> {diffusers key: Target}; raises UserError for an architecture without an original layout."""
    maps = {name: KEY_MAPS[name](_config(model), model.state_dict().keys()) for name, model in models.items()}
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
class Source:
    models: dict = field(default_factory=dict)
    name: str = "model"
    prediction_type: str = "epsilon"


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
    from transformers import CLIPTextModel

    if not folder.is_dir():
        raise UserError(f"{folder}: not found (needed for the {name})")
    loader = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}[name]
    return loader.from_pretrained(folder)


def load_source(source: str | Path, wanted: tuple[str, ...], ema: bool = False,
                on_loaded: Optional[Callable[[str], None]] = None) -> Source:
    """Load the wanted components of a training checkpoint, a run folder (its newest checkpoint) or a
    diffusers folder."""
    path = Path(paths.resolve(str(source)))
    if not path.exists():
        raise UserError(f"{source}: not found")
    if not (path / checkpoints.META_FILE).is_file() and RunDir(path).checkpoints.is_dir():
        path = checkpoints.latest_checkpoint(path) or path
    # Components that replace the base model's: what the run trained, and the VAE the run used.
    own: dict[str, Path] = {}
    trained_as = None
    if (path / checkpoints.META_FILE).is_file():
        meta = checkpoints.read_meta(path)
        trained_as = meta.get("prediction_type")
        base_name = meta.get("base_model")
        if not base_name:
            raise UserError(f"{path / checkpoints.META_FILE}: no base_model recorded")
        base = Path(paths.resolve(base_name))
        if not base.exists():
            raise UserError(f"{path}: its base model {base} (meta.json base_model) is not found")
        unet_folder = path / (EMA_FOLDER if ema else "unet")
        if ema and not unet_folder.is_dir():
            raise UserError(f"--ema: {path} has no ema_unet/ (the run did not keep an EMA)")
        own["unet"] = unet_folder
        if (path / "text_encoder").is_dir():
            own["text_encoder"] = path / "text_encoder"
        run_vae = _run_vae(path.parent.parent)
        if run_vae is not None:
            own["vae"] = run_vae
        name = f"{path.parent.parent.name}-{path.name}"
    elif is_diffusers_folder(path):
        if ema:
            raise UserError(f"--ema: {path} is a diffusers model folder; only training checkpoints have ema_unet/")
        base, name = path, path.name
    else:
        raise UserError(f"{source}: neither a training checkpoint (no meta.json) nor a diffusers model folder "
                        "(no model_index.json)")

    result = Source(name=name)
    base_components = None
    if base.is_file():
        from .single_file import config_folder, load_single_file_components, read_shapes

        result.prediction_type = _prediction_type(config_folder(base, read_shapes(base)))
        if any(component not in own for component in wanted):
            vae = str(own["vae"]) if "vae" in own else None
            base_components = load_single_file_components(base, vae=vae, require_tokenizer=False)
    else:
        result.prediction_type = _prediction_type(base)
    result.prediction_type = trained_as or result.prediction_type  # the run may have trained it as another
    for component in wanted:
        if component in own:
            result.models[component] = _load_model(component, own[component])
        elif base_components is not None:
            result.models[component] = getattr(base_components, component)
        else:
            result.models[component] = _load_model(component, base / component)
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


def _write(state: dict, path: Path, fmt: str) -> None:
    # Written beside the target and renamed, so an interrupted conversion never leaves a truncated file.
    temp = path.with_name(f".{path.name}.tmp")
    try:
        if fmt == "safetensors":
            from safetensors.torch import save_file

            # safetensors creates its files owner-only; give the file the mode the umask gives a new file.
            temp.touch()
            mode = temp.stat().st_mode
            save_file(state, str(temp), metadata={"format": "pt"})
            os.chmod(temp, mode)
        else:
            torch.save({"state_dict": state}, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)


def _refuse_existing(target: Path, overwrite: bool) -> None:
    if target.exists() and not overwrite:
        raise UserError(f"{target} already exists (pass --overwrite to replace it)")


def _dtype(option: str, value: str) -> torch.dtype:
    if value not in DTYPES:
        raise UserError(f"{option}: expected one of {', '.join(DTYPES)}, got {value!r}")
    return DTYPES[value]


def convert_checkpoint(source: str | Path, out: str | Path, *, text_encoder: bool = True, vae: bool = True,
                       unet_dtype: str = "fp32", vae_dtype: str = "fp32", text_encoder_dtype: str = "fp32",
                       ema: bool = False, fmt: Optional[str] = None, overwrite: bool = False,
                       on_event: Optional[Callable[[events.Event], None]] = None) -> Path:
    """Write SOURCE as one original-layout file and return its path; emits Progress and Log events."""
    emit = on_event or (lambda event: None)
    dtypes = {"unet": _dtype("--unet-dtype", unet_dtype), "vae": _dtype("--vae-dtype", vae_dtype),
              "text_encoder": _dtype("--text-encoder-dtype", text_encoder_dtype)}
    wanted = tuple(c for c, keep in zip(COMPONENTS, (True, vae, text_encoder)) if keep)
    total = 2 * len(wanted) + 1  # load and convert each component, then write
    done = 0

    def step(message: str) -> None:
        nonlocal done
        done += 1
        emit(events.Log(message=message))
        emit(events.Progress(done=done, total=total))

    # A named output file is checked before minutes of loading; a folder's file name needs the source.
    target, _ = output_path(out, "", fmt)
    if target == Path(out).expanduser():
        _refuse_existing(target, overwrite)
    loaded = load_source(source, wanted, ema=ema, on_loaded=lambda c: step(f"loaded the {c}"))
    target, fmt = output_path(out, loaded.name, fmt)
    _refuse_existing(target, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)

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
        emit(events.Log(level="warning", message=(
            "this is a v-prediction model and the file does not say so: A1111 needs a v-prediction config "
            f"(v2-inference-v.yaml) saved beside it as {target.with_suffix('.yaml').name}")))
    _write(state, target, fmt)
    step(f"wrote {target} ({format_size(target.stat().st_size)})")
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
        ema=args.ema, fmt=args.format, overwrite=args.overwrite, on_event=show)
    print(f"{path} ({format_size(path.stat().st_size)})")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="write a checkpoint or diffusers folder as one .safetensors/.ckpt file (A1111, ComfyUI)")
    parser.add_argument("checkpoint", metavar="CKPT",
                        help="training checkpoint (run/checkpoints/step-N), run folder or diffusers folder")
    parser.add_argument("out", metavar="OUT",
                        help="output .safetensors/.ckpt file, or a folder for a file named after the checkpoint")
    parser.add_argument("--no-text-encoder", action="store_true", help="leave the text encoder out")
    parser.add_argument("--no-vae", action="store_true", help="leave the VAE out")
    for component in ("unet", "vae", "text-encoder"):
        parser.add_argument(f"--{component}-dtype", choices=list(DTYPES), default="fp32",
                            help=f"{component.replace('-', ' ')} weight type (default fp32)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA UNet (ema_unet/)")
    parser.add_argument("--format", choices=list(FORMATS.values()),
                        help="file format when OUT is a folder (default safetensors; a file's extension decides)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    parser.set_defaults(func=cmd_convert)
