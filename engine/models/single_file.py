"""Single-file base models (`model: sd.safetensors` or `.ckpt`) loaded offline into diffusers components.

diffusers' own single-file loader does the conversion; it needs a folder of diffusers configs, found in
this order:
1. a diffusers model folder with the file's name beside it (`sd.safetensors` + `sd/`),
2. the `tokenizer:` folder when it is a whole diffusers model folder,
3. the configs this project's conversion recorded in the file's metadata (CONFIGS_KEY),
4. the built-in SD1.5, SD2.1 (768, v-prediction) or SDXL base configs, chosen from the tensors.
The tokenizers come from `tokenizer:`, else from the folder's tokenizer folders, else from the CLIP
vocabulary with the family's padding tokens (`clip_vocab`). SDXL's second tokenizer is the folder's
tokenizer_2/, or else the first one padding with "!": both have one vocabulary and differ only in the
padding token.
"""
from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path
from typing import Optional

import torch

from .. import notices, paths
from ..errors import UserError
from . import clip_vocab, keymap_sdxl
from .keymap import CLIP_PREFIX, OPEN_CLIP_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX
from .sd import Components, load_tokenizer
from .sdxl import TextEncoders, is_sdxl_folder

SUFFIXES = (".safetensors", ".ckpt")
BUILTIN_CONFIGS = Path(__file__).resolve().parent / "configs" / "pipelines"
# safetensors metadata: the diffusers configs of the model a file holds, as `model_configs` gives them
CONFIGS_KEY = "scal_sdt.diffusers_configs"
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


# SDXL's UNet embeds its micro-conditioning and pooled text embedding; SD1.x/SD2.x have no label embedding.
_SDXL_KEY = UNET_PREFIX + "label_emb.0.0.weight"
# SDXL's text encoders in the file (the refiner, with only an OpenCLIP one at embedders.0, is another model).
_SDXL_ENCODERS = {"text_encoder": keymap_sdxl.CONDITIONER_PREFIX + "0.transformer.",
                  "text_encoder_2": keymap_sdxl.OPEN_CLIP_PREFIX}


def detect_family(shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    """'sd15', 'sd21' or 'sdxl' when the tensors have that architecture's text width and text encoders,
    else None."""
    if _SDXL_KEY in shapes:
        found = {key for key in shapes if key.startswith(keymap_sdxl.CONDITIONER_PREFIX)}
        return "sdxl" if all(key.startswith(tuple(_SDXL_ENCODERS.values())) for key in found) else None
    context, conv_in = shapes.get(_CONTEXT_KEY), shapes.get(_CONV_IN_KEY)
    if context is None or conv_in is None or conv_in[1] != 4 or context[1] not in _FAMILIES:
        return None
    family, encoder_prefix = _FAMILIES[context[1]]
    encoders = {key[:len(encoder_prefix)] for key in shapes if key.startswith(TEXT_ENCODER_PREFIX)}
    return family if encoders <= {encoder_prefix} else None


def empty_models(family: str) -> dict[str, torch.nn.Module]:
    """The built-in architecture ('sd15', 'sd21' or 'sdxl') on the meta device: every shape, no weights or
    memory."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = BUILTIN_CONFIGS / family
    with torch.device("meta"):
        models = {"unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder / "unet")),
                  "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder / "vae")),
                  "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder / "text_encoder"))}
        if family == "sdxl":
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder / "text_encoder_2"))
    return models


def _has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def _check_family(folder: Path, family: Optional[str], key: str, path: Path) -> None:
    """A model folder whose configs are another family's than the file's tensors is refused, naming key."""
    if family is None or is_sdxl_folder(folder) == (family == "sdxl"):
        return
    if family == "sdxl":
        raise UserError(f"config key '{key}': {folder} is an SD1.x/SD2.x model, but {path.name} is SDXL; "
                        f"point {key}: at an SDXL model's folder (with tokenizer_2/)")
    raise UserError(f"config key '{key}': {folder} is an SDXL model, but {path.name} is SD1.x/SD2.x; "
                    f"point {key}: at an SD1.x/SD2.x model's folder")


def _model_folder(tokenizer: Optional[str]) -> Optional[Path]:
    """The `tokenizer:` location when it is a whole diffusers model folder."""
    location = Path(paths.resolve(tokenizer)) if tokenizer else None
    return location if location is not None and (location / "model_index.json").is_file() else None


def _tokenizer_names(folder: Path) -> list[str]:
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    return [name for name in ("tokenizer", "tokenizer_2") if name in index]


def model_configs(folder: Path, prediction_type: str) -> dict:
    """A model folder's configs without weights, for CONFIGS_KEY: every config file (the noise schedule's
    prediction type set to prediction_type) and the padding token of each tokenizer."""
    from transformers import CLIPTokenizer

    files = {"model_index.json": folder / "model_index.json", "scheduler/scheduler_config.json":
             folder / "scheduler" / "scheduler_config.json"}
    files.update({f"{c.name}/config.json": c / "config.json" for c in sorted(folder.iterdir())
                  if (c / "config.json").is_file()})
    configs = {name: json.loads(file.read_text(encoding="utf-8")) for name, file in files.items() if file.is_file()}
    configs["scheduler/scheduler_config.json"]["prediction_type"] = prediction_type
    builtin = clip_vocab.PAD_TOKENS.get(folder.name, {}) if folder.parent == BUILTIN_CONFIGS else {}
    pad_tokens = {name: (CLIPTokenizer.from_pretrained(folder / name).pad_token if (folder / name).is_dir()
                         else builtin.get(name)) for name in _tokenizer_names(folder)}
    return {"files": configs, "pad_tokens": {name: pad for name, pad in pad_tokens.items() if pad is not None}}


def recorded_configs(path: Path) -> Optional[dict]:
    """The configs this project's conversion recorded in a .safetensors file (CONFIGS_KEY), if any."""
    if path.suffix != ".safetensors":
        return None
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        text = (handle.metadata() or {}).get(CONFIGS_KEY)
    return json.loads(text) if text else None


def _recorded_folder(configs: dict) -> Path:
    """The recorded configs as a diffusers folder without weights, one cached folder per distinct configs."""
    text = json.dumps(configs, sort_keys=True)
    target = paths.cache_dir() / "single-file-configs" / hashlib.sha256(text.encode()).hexdigest()[:16]

    def write(folder: Path) -> None:
        for name, values in configs["files"].items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(json.dumps(values, indent=1), encoding="utf-8")
        for name, pad_token in configs["pad_tokens"].items():
            clip_vocab.clip_tokenizer(pad_token).save_pretrained(folder / name)

    return paths.build_once(target, write)


def config_folder(path: Path, shapes: dict, tokenizer: Optional[str] = None) -> Path:
    companion = path.with_suffix("")
    family = detect_family(shapes)
    tokenizer_folder = _model_folder(tokenizer)
    if tokenizer_folder is not None:
        _check_family(tokenizer_folder, family, "tokenizer", path)
    if (companion / "model_index.json").is_file():
        _check_family(companion, family, "model", path)
        return companion
    if tokenizer_folder is not None:
        return tokenizer_folder
    recorded = recorded_configs(path)
    if recorded is not None:
        return _recorded_folder(recorded)
    if family is None:
        raise UserError(f"config key 'model': {path} is not an SD1.x or SD2.x checkpoint, nor an SDXL one, that "
                        f"this app knows; put its diffusers model folder beside it as {companion.name}/ "
                        "(model_index.json and configs)")
    if family == "sd21":
        notices.warn(f"{path.name}: loaded as SD2.x 768 v-prediction; for an epsilon model such as SD2.1-base "
                      "set prediction_type: epsilon")
    return BUILTIN_CONFIGS / family


def _load_tokenizers(path: Path, folder: Path, tokenizer: Optional[str], sdxl: bool) -> dict:
    """{"tokenizer": …} (SDXL: and "tokenizer_2")."""
    from transformers import CLIPTokenizer

    if tokenizer:
        model_folder = _model_folder(tokenizer)
        location = model_folder / "tokenizer" if model_folder is not None else Path(paths.resolve(tokenizer))
        if not location.is_dir():
            raise UserError(f"config key 'tokenizer': not a folder: {location}")
    elif (folder / "tokenizer").is_dir():
        location, model_folder = folder / "tokenizer", folder
    elif folder.parent == BUILTIN_CONFIGS:
        return {name: clip_vocab.clip_tokenizer(pad) for name, pad in clip_vocab.PAD_TOKENS[folder.name].items()}
    else:
        raise UserError(f"config key 'tokenizer': {folder} has no tokenizer/ folder for {path.name}; set tokenizer: "
                        "to a CLIP tokenizer folder (the tokenizer/ folder of a diffusers SD1.x, SD2.x or SDXL model) "
                        "or add one to that folder")
    # the folder's files checked, naming the key that chose it
    loaded = {"tokenizer": load_tokenizer(location, "tokenizer" if tokenizer else "model")}
    if sdxl:
        second = model_folder / "tokenizer_2" if model_folder is not None else None
        loaded["tokenizer_2"] = (CLIPTokenizer.from_pretrained(second) if second is not None and second.is_dir()
                                 else CLIPTokenizer.from_pretrained(location, pad_token="!"))
    return loaded


def _missing_text_encoders(path: Path, shapes: dict, folder: Path, sdxl: bool) -> dict:
    """The text encoders the file leaves out, from the config folder's weights."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    if sdxl:
        wanted = {name: (prefix, CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection)
                  for name, prefix in _SDXL_ENCODERS.items()}
    else:
        wanted = {"text_encoder": (TEXT_ENCODER_PREFIX, CLIPTextModel)}
    loaded = {}
    for name, (prefix, loader) in wanted.items():
        if any(key.startswith(prefix) for key in shapes):
            continue
        if not _has_weights(folder / name):
            raise UserError(f"config key 'model': {path.name} holds no {name.replace('_', ' ')}; put a diffusers "
                            f"model folder with one beside it as {path.with_suffix('').name}/")
        loaded[name] = loader.from_pretrained(folder / name)
    return loaded


def load_single_file_components(path: str | Path, vae: Optional[str] = None,
                                tokenizer: Optional[str] = None) -> Components:
    """Load an original-layout SD or SDXL checkpoint in fp32 on the CPU; `vae:` replaces the file's VAE.
    An SDXL model's text encoders come as one TextEncoders."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
    from diffusers.loaders.single_file_utils import SingleFileComponentError

    path = Path(path)
    if path.suffix not in SUFFIXES:
        raise UserError(f"config key 'model': expected a diffusers folder or a .safetensors/.ckpt file, got {path}")
    shapes = read_shapes(path)
    if not any(key.startswith(UNET_PREFIX) for key in shapes):
        raise UserError(f"config key 'model': {path} is not a Stable Diffusion checkpoint (no {UNET_PREFIX}* weights)")
    folder = config_folder(path, shapes, tokenizer)
    sdxl = is_sdxl_folder(folder)
    passed = _load_tokenizers(path, folder, tokenizer, sdxl)
    if vae:
        location = paths.resolve(vae)
        if not Path(location).exists():
            raise UserError(f"config key 'vae': not found: {location}")
        passed["vae"] = AutoencoderKL.from_pretrained(location)
    elif not any(key.startswith(VAE_PREFIX) for key in shapes):
        if not _has_weights(folder / "vae"):
            raise UserError(f"config key 'vae': {path.name} holds no VAE; set vae: to a diffusers VAE folder")
        passed["vae"] = AutoencoderKL.from_pretrained(folder / "vae")
    passed.update(_missing_text_encoders(path, shapes, folder, sdxl))
    if not sdxl:
        passed.update(safety_checker=None, feature_extractor=None)
    try:
        pipeline = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline).from_single_file(
            str(path), config=str(folder), local_files_only=True, torch_dtype=torch.float32, **passed)
    except (ValueError, RuntimeError, OSError, SingleFileComponentError) as error:  # tensors that do not fit
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"config key 'model': {path.name} does not fit the configs in {folder}: {first_line}") from None
    text_encoder = pipeline.text_encoder
    if sdxl:
        text_encoder = TextEncoders(pipeline.text_encoder, pipeline.text_encoder_2, pipeline.tokenizer_2)
    return Components(
        tokenizer=pipeline.tokenizer, text_encoder=text_encoder, vae=pipeline.vae, unet=pipeline.unet,
        noise_scheduler=DDPMScheduler.from_config(pipeline.scheduler.config), model_path=str(path))
