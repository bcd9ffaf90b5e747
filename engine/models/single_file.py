"""Single-file base models (`model: sd.safetensors` or `.ckpt`) loaded offline into diffusers components.

diffusers' own single-file loader does the conversion; it needs a folder of diffusers configs, found in
this order:
1. a diffusers model folder with the file's name beside it (`sd.safetensors` + `sd/`),
2. the `tokenizer:` folder when it is a whole diffusers model folder,
3. the built-in SD1.5 or SD2.1 (768, v-prediction) configs, chosen from the tensors.
The tokenizer vocabulary is not built in: it comes from `tokenizer:` or from the folder of 1. or 2.
"""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Optional

import torch

from .. import notices, paths
from ..errors import UserError
from .keymap import CLIP_PREFIX, OPEN_CLIP_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX
from .sd import Components

SUFFIXES = (".safetensors", ".ckpt")
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs" / "pipelines"
# Cross-attention width of the UNet: 768 for OpenAI CLIP ViT-L (SD1.x), 1024 for OpenCLIP ViT-H (SD2.x).
_FAMILIES = {768: ("sd15", CLIP_PREFIX), 1024: ("sd21", OPEN_CLIP_PREFIX)}
_CONTEXT_KEY = UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
_CONV_IN_KEY = UNET_PREFIX + "input_blocks.0.0.weight"


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a single file without reading its weights (safetensors header, mmap for .ckpt)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as handle:
                return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # any reader failure means the same thing to the user: a bad file
        raise UserError(f"config key 'model': cannot read {path}: {error}") from None
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return {key: tuple(value.shape) for key, value in state.items() if isinstance(value, torch.Tensor)}


def detect_family(shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    """'sd15' or 'sd21' when the tensors have that architecture's text width and text encoder, else None."""
    context, conv_in = shapes.get(_CONTEXT_KEY), shapes.get(_CONV_IN_KEY)
    if context is None or conv_in is None or conv_in[1] != 4 or context[1] not in _FAMILIES:
        return None
    family, encoder_prefix = _FAMILIES[context[1]]
    encoders = {key[:len(encoder_prefix)] for key in shapes if key.startswith(TEXT_ENCODER_PREFIX)}
    return family if encoders <= {encoder_prefix} else None


def empty_models(family: str) -> dict[str, torch.nn.Module]:
    """The built-in architecture ('sd15' or 'sd21') on the meta device: every shape, no weights or memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    folder = BUILTIN_CONFIGS / family
    with torch.device("meta"):
        return {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def config_folder(path: Path, shapes: dict, tokenizer: Optional[str] = None) -> Path:
    companion = path.with_suffix("")
    if (companion / "model_index.json").is_file():
        return companion
    if tokenizer and (Path(paths.resolve(tokenizer)) / "model_index.json").is_file():
        return Path(paths.resolve(tokenizer))
    family = detect_family(shapes)
    if family is None:
        raise UserError(f"config key 'model': {path} is not an SD1.x or SD2.x checkpoint this app knows; put its "
                        f"diffusers model folder beside it as {companion.name}/ (model_index.json and configs)")
    if family == "sd21":
        notices.warn(f"{path.name}: loaded as SD2.x 768 v-prediction; for an epsilon model such as SD2.1-base "
                      "set prediction_type: epsilon")
    return BUILTIN_CONFIGS / family


def _load_tokenizer(path: Path, folder: Path, tokenizer: Optional[str], required: bool):
    from transformers import CLIPTokenizer

    if tokenizer:
        location = Path(paths.resolve(tokenizer))
        if (location / "model_index.json").is_file():
            location = location / "tokenizer"
        if not location.is_dir():
            raise UserError(f"config key 'tokenizer': not a folder: {location}")
        return CLIPTokenizer.from_pretrained(location)
    if (folder / "tokenizer").is_dir():
        return CLIPTokenizer.from_pretrained(folder / "tokenizer")
    if not required:
        return None
    raise UserError(f"config key 'tokenizer': {path.name} is a single file and holds no tokenizer; set tokenizer: to "
                    "a CLIP tokenizer folder (the tokenizer/ folder of a diffusers SD1.x or SD2.x model) or put a "
                    f"diffusers model folder beside the file as {path.with_suffix('').name}/")


def load_single_file_components(path: str | Path, vae: Optional[str] = None, tokenizer: Optional[str] = None,
                                require_tokenizer: bool = True) -> Components:
    """Load an original-layout SD checkpoint in fp32 on the CPU; `vae:` replaces the file's VAE."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError
    from transformers import CLIPTextModel

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"config key 'model': expected a diffusers folder or a .safetensors/.ckpt file, got {path}")
    shapes = read_shapes(path)
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise UserError(f"config key 'model': {path} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* weights)")
    folder = config_folder(path, shapes, tokenizer)
    passed = {"tokenizer": _load_tokenizer(path, folder, tokenizer, require_tokenizer)}
    if vae:
        location = paths.resolve(vae)
        if not Path(location).exists():
            raise UserError(f"config key 'vae': not found: {location}")
        passed["vae"] = AutoencoderKL.from_pretrained(location)
    elif not any(key.startswith(VAE_PREFIX) for key in shapes):
        if not _has_weights(folder / "vae"):
            raise UserError(f"config key 'vae': {path.name} holds no VAE; set vae: to a diffusers VAE folder")
        passed["vae"] = AutoencoderKL.from_pretrained(folder / "vae")
    if not any(key.startswith(TEXT_ENCODER_PREFIX) for key in shapes):
        if not _has_weights(folder / "text_encoder"):
            raise UserError(f"config key 'model': {path.name} holds no text encoder; put a diffusers model folder "
                            f"with one beside it as {path.with_suffix('').name}/")
        passed["text_encoder"] = CLIPTextModel.from_pretrained(folder / "text_encoder")
    try:
        pipeline = StableDiffusionPipeline.from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32,
            safety_checker=None, feature_extractor=None, **passed)
    except (ValueError, RuntimeError, OSError, SingleFileComponentError) as error:  # tensors that do not fit
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"config key 'model': {path.name} does not fit the configs in {folder}: {first_line}") from None
    return Components(
        tokenizer=pipeline.tokenizer, text_encoder=pipeline.text_encoder, vae=pipeline.vae, unet=pipeline.unet,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config), model_path=str(path))
