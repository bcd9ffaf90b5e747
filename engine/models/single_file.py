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

Flux.1 comes as ComfyUI keeps it (`load_flux_files`): Black Forest Labs' transformer file (flux1-dev.safetensors,
for ComfyUI's diffusion_models/ folder) with CLIP-L (clip_l.safetensors), T5-XXL (t5xxl_fp16.safetensors) and
BFL's autoencoder (ae.safetensors) as separate files, or one checkpoint holding all four under ComfyUI's
prefixes (FLUX_PARTS); a text encoder in ComfyUI's fp8-scaled layouts (t5xxl_fp8_e4m3fn_scaled.safetensors) comes as
plain weights (`comfy_fp8`). Each model's architecture is the shipped FLUX.1 config with the sizes its tensors show.
Chroma comes the same way (`load_chroma_files`): its transformer in the same layout (told apart by its
`distilled_guidance_layer`), with T5-XXL and the FLUX.1 autoencoder, and no CLIP.
"""
from __future__ import annotations

import functools
import hashlib
import json
import zipfile
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from .. import notices, paths
from ..errors import UserError
from . import clip_vocab, comfy_fp8, keymap_flux, keymap_sdxl
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


# What only Flux.1's transformer has, in BFL's layout.
_FLUX_KEYS = ("double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight")
# Where a ComfyUI checkpoint of Flux.1 keeps each part (comfy/supported_models.py, Flux: vae_key_prefix
# "vae.", text_encoder_key_prefix "text_encoders.", its clip_l and t5xxl; the model under model.diffusion_model.)
FLUX_PARTS = {"transformer": keymap_flux.PREFIX, "text_encoder": "text_encoders.clip_l.transformer.",
              "text_encoder_2": "text_encoders.t5xxl.transformer.", "vae": "vae."}
FLUX_FILES = {"text_encoder": "CLIP ViT-L (clip_l.safetensors)", "text_encoder_2": "T5-XXL (t5xxl_fp16.safetensors)",
              "vae": "the FLUX.1 autoencoder (ae.safetensors)"}


# Chroma's transformer: Flux.1's blocks, with one modulation network in place of the blocks' modulation layers
_CHROMA_KEY = keymap_flux.APPROXIMATOR + "in_proj.weight"
# its parts in a ComfyUI-style checkpoint: Flux.1's places, T5-XXL its only text encoder
CHROMA_PARTS = {"transformer": keymap_flux.PREFIX, "text_encoder": FLUX_PARTS["text_encoder_2"], "vae": "vae."}
CHROMA_FILES = {"text_encoder": FLUX_FILES["text_encoder_2"], "vae": FLUX_FILES["vae"]}
# FLUX.2's transformer: Flux's blocks, their modulation computed once for all (comfy/model_detection.py's test)
_FLUX2_KEY = "double_stream_modulation_img.lin.weight"


def _flux_prefix(shapes) -> Optional[str]:
    """The prefix of a Flux.1 transformer's keys in these tensors ('' for a bare one), or None."""
    for prefix in (keymap_flux.PREFIX, ""):
        if all(prefix + key in shapes for key in _FLUX_KEYS):
            return prefix
    return None


def detect_family(shapes: dict[str, tuple[int, ...]]) -> Optional[str]:
    """'sd15', 'sd21', 'sdxl', 'flux1', 'chroma' or 'flux2' when the tensors have that architecture's text width
    and text encoders (Flux.1: its transformer's blocks; Chroma: those and its modulation network; FLUX.2: those
    and the modulation all its blocks share), else None."""
    prefix = _flux_prefix(shapes)
    if prefix is not None:
        if prefix + _FLUX2_KEY in shapes:
            return "flux2"
        return "chroma" if prefix + _CHROMA_KEY in shapes else "flux1"
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


def _read_tensors(path: Path, prefix: str, key: str, dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """The tensors under prefix in a .safetensors file, without it; only those are read. With dtype, the weights of
    ComfyUI's fp8-scaled layouts come as plain weights in dtype (`comfy_fp8`)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as handle:
            state = {name[len(prefix):]: handle.get_tensor(name) for name in handle.keys() if name.startswith(prefix)}
            metadata = handle.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise UserError(f"config key '{key}': cannot read {path} as a .safetensors file: {error}") from None
    return state if dtype is None else comfy_fp8.plain_weights(state, metadata, prefix, dtype, key, path.name)


def _count(keys, prefix: str) -> int:
    """How many numbered blocks prefix.N. the keys have."""
    return len({key[len(prefix):].split(".", 1)[0] for key in keys if key.startswith(prefix)})


def located_transformer(transformer_file, find_prefix, not_one: str) -> tuple[Path, dict, str]:
    """(path, tensor shapes, key prefix) of a transformer's file, the prefix as find_prefix(shapes) finds it;
    refused naming 'model' with `not_one` (what the file is not, and the layout it should hold) when none is."""
    path = Path(paths.resolve(str(transformer_file)))
    shapes = read_shapes(path)
    prefix = find_prefix(shapes)
    if prefix is None:
        raise UserError(f"config key 'model': {path.name} is not {not_one}")
    return path, shapes, prefix


def part_file(key: str, given, model: str, expected: str) -> Path:
    """The file of a single-file model's part (its text encoder or autoencoder) set at config key `key`; refused
    naming the key when it is not set (`model` holds its transformer only; `expected` names the file to set) or
    is not a file."""
    if not given:
        raise UserError(f"config key '{key}': a single-file {model} model holds the transformer only; set {key}: to "
                        f"{expected}")
    return paths.existing_file(given, key)


def ldm_vae_config(state: dict, config: dict) -> dict:
    """config (a diffusers autoencoder's) with the sizes an original-layout (LDM) autoencoder's tensors give: its
    levels' widths, blocks per level and latent channels."""
    levels = _count(state, "encoder.down.")
    return {**config, "block_out_channels": [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]
                                             for i in range(levels)],
            "layers_per_block": _count(state, "encoder.down.0.block."),
            "latent_channels": state["decoder.conv_in.weight"].shape[1],
            "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}


def _load_weights(model: torch.nn.Module, state: dict, key: str, source: str,
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Put state (cast to dtype) into a model built without weights; any missing or extra tensor is refused."""
    try:
        result = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    except RuntimeError as error:  # a tensor of another shape
        raise UserError(f"config key '{key}': {source} does not fit its architecture: "
                        f"{str(error).strip().splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        detail = (f"{len(result.missing_keys)} missing, {len(result.unexpected_keys)} unexpected, e.g. "
                  f"{(result.missing_keys or result.unexpected_keys)[0]}")
        raise UserError(f"config key '{key}': {source} does not fit its architecture: {detail}")
    return model.eval()


def _flux_transformer_config(shapes: dict, prefix: str) -> dict:
    """The shipped FLUX.1-dev config (schnell's without the guidance embedding) with the sizes the tensors
    show; the rotary axes are no tensor's shape and stay FLUX.1's."""
    from diffusers import FluxTransformer2DModel

    guidance = prefix + "guidance_in.in_layer.weight" in shapes
    config = dict(FluxTransformer2DModel.load_config(BUILTIN_CONFIGS / ("flux1-dev" if guidance else "flux1-schnell")
                                                     / "transformer"))
    width, in_channels = shapes[prefix + "img_in.weight"]
    head_width = shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    config.update(in_channels=in_channels, num_layers=_count(shapes, prefix + "double_blocks."),
                  num_single_layers=_count(shapes, prefix + "single_blocks."), attention_head_dim=head_width,
                  num_attention_heads=width // head_width, joint_attention_dim=shapes[prefix + "txt_in.weight"][1],
                  pooled_projection_dim=shapes[prefix + "vector_in.in_layer.weight"][1], guidance_embeds=guidance)
    return config


def _flux_transformer(path: Path, config: dict, prefix: str, dtype: torch.dtype = torch.float32):
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel

    try:
        state = keymap_flux.from_original(_read_tensors(path, prefix, "model"))
    except (RuntimeError, KeyError, IndexError) as error:  # diffusers' converter on other shapes
        raise UserError(f"config key 'model': {path.name} is not a FLUX.1 transformer diffusers can read "
                        f"({type(error).__name__}: {error})") from None
    with init_empty_weights():
        model = FluxTransformer2DModel.from_config(config)
    return _load_weights(model, state, "model", path.name, dtype)


def _flux_clip(state: dict, transformer_config, source: str, dtype: torch.dtype):
    """CLIP-L as ComfyUI keeps it (transformers' names under text_model.; a projection, which Flux does not
    use, ignored). Its width must be the transformer's pooled input."""
    from accelerate import init_empty_weights
    from transformers import CLIPTextConfig, CLIPTextModel

    state = {k.removeprefix("text_model."): v for k, v in state.items()
             if k not in ("text_projection.weight", "logit_scale") and not k.endswith("position_ids")}
    embedding = state.get("embeddings.token_embedding.weight")
    if embedding is None:
        raise UserError(f"config key 'text_encoder': {source} is not a CLIP text encoder (no "
                        "text_model.embeddings.token_embedding.weight); set it to CLIP ViT-L, clip_l.safetensors")
    wanted = transformer_config.pooled_projection_dim
    if embedding.shape[1] != wanted:
        raise UserError(f"config key 'text_encoder': {source} is a CLIP text encoder {embedding.shape[1]} wide; this "
                        f"FLUX.1 transformer takes CLIP ViT-L's pooled output, {wanted} wide (clip_l.safetensors)")
    # The head count is no tensor's shape: CLIP ViT-L's is kept.
    config = CLIPTextConfig.from_pretrained(BUILTIN_CONFIGS / "flux1-dev" / "text_encoder")
    for name, value in dict(vocab_size=embedding.shape[0], hidden_size=embedding.shape[1],
                            intermediate_size=state["encoder.layers.0.mlp.fc1.weight"].shape[0],
                            num_hidden_layers=_count(state, "encoder.layers."),
                            max_position_embeddings=state["embeddings.position_embedding.weight"].shape[0]).items():
        setattr(config, name, value)
    with init_empty_weights():
        model = CLIPTextModel(config)
    return _load_weights(model, state, "text_encoder", source, dtype)


def _flux_t5(state: dict, transformer_config, source: str, dtype: torch.dtype, key: str = "text_encoder_2"):
    """T5's encoder as ComfyUI keeps it (transformers' T5EncoderModel names), given by config key `key`. Its
    width must be the transformer's text input."""
    from accelerate import init_empty_weights
    from transformers import T5Config, T5EncoderModel

    shared = state.get("shared.weight", state.get("encoder.embed_tokens.weight"))
    bias = state.get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")
    if shared is None or bias is None:
        raise UserError(f"config key '{key}': {source} is not a T5 encoder (no shared.weight and "
                        "encoder.block.0 attention); set it to T5-XXL, t5xxl_fp16.safetensors")
    wanted = transformer_config.joint_attention_dim
    if shared.shape[1] != wanted:
        raise UserError(f"config key '{key}': {source} is a T5 encoder {shared.shape[1]} wide; this transformer "
                        f"takes T5-XXL's hidden states, {wanted} wide (t5xxl_fp16.safetensors)")
    heads = bias.shape[1]
    config = T5Config.from_pretrained(BUILTIN_CONFIGS / "flux1-dev" / "text_encoder_2")
    for name, value in dict(vocab_size=shared.shape[0], d_model=shared.shape[1], num_heads=heads,
                            d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0] // heads,
                            d_ff=state["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"].shape[0],
                            num_layers=_count(state, "encoder.block.")).items():
        setattr(config, name, value)
    # the input embedding is the shared one; files hold it under either name or both
    state = {**state, "shared.weight": shared, "encoder.embed_tokens.weight": shared}
    with init_empty_weights():
        model = T5EncoderModel(config)
    model = _load_weights(model, state, key, source, dtype)
    model.encoder.embed_tokens = model.shared
    return model


def flux_vae(state: dict, transformer_config, source: str, dtype: torch.dtype):
    """BFL's autoencoder (the LDM layout, without quant convolutions), by diffusers' converter."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    if "decoder.conv_in.weight" not in state or "encoder.down.0.block.0.conv1.weight" not in state:
        raise UserError(f"config key 'vae': {source} is not an autoencoder in the original layout (no "
                        "encoder.down / decoder weights); set it to ae.safetensors")
    latent = state["decoder.conv_in.weight"].shape[1]
    wanted = transformer_config.in_channels // 4  # the transformer packs 2x2 latent pixels into a token
    if latent != wanted:
        raise UserError(f"config key 'vae': {source} has {latent} latent channels; this transformer takes "
                        f"{wanted} (ae.safetensors)")
    # The group-norm count is no tensor's shape: FLUX.1's is kept.
    config = ldm_vae_config(state, dict(AutoencoderKL.load_config(BUILTIN_CONFIGS / "flux1-dev" / "vae")))
    with init_empty_weights():
        model = AutoencoderKL.from_config(config)
    return _load_weights(model, convert_ldm_vae_checkpoint(state, config), "vae", source, dtype)


_FLUX_LOADERS = {"text_encoder": _flux_clip, "text_encoder_2": _flux_t5, "vae": flux_vae}


def _flux_file(transformer_file) -> tuple[Path, dict, str]:
    """A FLUX.1 model file's path, tensor shapes and transformer prefix; anything else refused naming `model`."""
    path = Path(paths.resolve(str(transformer_file)))
    shapes = read_shapes(path)
    prefix = _flux_prefix(shapes)
    if prefix is None:
        family = detect_family(shapes)
        found = f"an {family.upper()} checkpoint" if family else "not a FLUX.1 transformer"
        raise UserError(f"config key 'model': {path.name} is {found}; a FLUX.1 model file holds its transformer "
                        "in Black Forest Labs' layout (double_blocks.*, single_blocks.*), as flux1-dev.safetensors")
    return path, shapes, prefix


def flux_config_folder(transformer_file) -> Path:
    """The shipped configs of a FLUX.1 file's variant: dev's with a guidance embedding, else schnell's."""
    _, shapes, prefix = _flux_file(transformer_file)
    return BUILTIN_CONFIGS / ("flux1-dev" if prefix + "guidance_in.in_layer.weight" in shapes else "flux1-schnell")


def load_flux_transformer(transformer_file):
    """Only the transformer of a FLUX.1 file (a bare one or a ComfyUI checkpoint), fp32 on the CPU."""
    path, shapes, prefix = _flux_file(transformer_file)
    return _flux_transformer(path, _flux_transformer_config(shapes, prefix), prefix)


def load_flux_files(transformer_file, text_encoder=None, text_encoder_2=None, vae=None,
                    dtypes: Optional[dict] = None) -> dict:
    """FLUX.1 from ComfyUI-style files on the CPU: {"transformer", "text_encoder" (CLIP-L), "text_encoder_2"
    (T5-XXL), "vae"}, each in its dtype in `dtypes` (by those names; fp32 where not given), cast from the
    file's as it is read. A part given as its own file replaces the checkpoint's; a part neither given nor in
    the checkpoint is refused naming its config key."""
    dtype = {name: torch.float32 for name in ("transformer", "text_encoder", "text_encoder_2", "vae")} | (dtypes or {})
    path, shapes, prefix = _flux_file(transformer_file)
    config = _flux_transformer_config(shapes, prefix)
    sizes = SimpleNamespace(**config)  # what the other parts must fit, checked before the transformer is read
    loaded = {}
    given = {"text_encoder": text_encoder, "text_encoder_2": text_encoder_2, "vae": vae}
    for name, loader in _FLUX_LOADERS.items():
        if given[name]:
            source = paths.existing_file(given[name], name)
            # a ComfyUI checkpoint given for one part: that part of it
            state = (_read_tensors(source, FLUX_PARTS[name], name, dtype[name])
                     or _read_tensors(source, "", name, dtype[name]))
        elif any(key.startswith(FLUX_PARTS[name]) for key in shapes):
            source, state = path, _read_tensors(path, FLUX_PARTS[name], name, dtype[name])
        else:
            raise UserError(f"config key '{name}': {path.name} holds no {name.replace('_', ' ')}; set {name}: to "
                            f"{FLUX_FILES[name]}")
        loaded[name] = loader(state, sizes, source.name, dtype[name])
    return {"transformer": _flux_transformer(path, config, prefix, dtype["transformer"]), **loaded}


def _chroma_transformer_config(shapes: dict, prefix: str) -> dict:
    """The shipped Chroma config with the sizes the tensors show (the rotary axes stay Chroma's)."""
    from diffusers import ChromaTransformer2DModel

    config = dict(ChromaTransformer2DModel.load_config(BUILTIN_CONFIGS / "chroma" / "transformer"))
    width, in_channels = shapes[prefix + "img_in.weight"]
    head_width = shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    hidden, channels = shapes[prefix + _CHROMA_KEY]
    config.update(in_channels=in_channels, num_layers=_count(shapes, prefix + "double_blocks."),
                  num_single_layers=_count(shapes, prefix + "single_blocks."), attention_head_dim=head_width,
                  num_attention_heads=width // head_width, joint_attention_dim=shapes[prefix + "txt_in.weight"][1],
                  approximator_num_channels=channels, approximator_hidden_dim=hidden,
                  approximator_layers=_count(shapes, prefix + keymap_flux.APPROXIMATOR + "layers."))
    return config


def _chroma_file(transformer_file) -> tuple[Path, dict, str]:
    """A Chroma model file's path, tensor shapes and transformer prefix; anything else refused naming `model`."""
    path = Path(paths.resolve(str(transformer_file)))
    shapes = read_shapes(path)
    prefix = _flux_prefix(shapes)
    if prefix is None or prefix + _CHROMA_KEY not in shapes:
        raise UserError(f"config key 'model': {path.name} is not a Chroma transformer (Flux.1's double_blocks.* "
                        "and single_blocks.* with distilled_guidance_layer.*), as Chroma1-HD.safetensors")
    return path, shapes, prefix


def _chroma_transformer(path: Path, shapes: dict, prefix: str, dtype: torch.dtype = torch.float32):
    from accelerate import init_empty_weights
    from diffusers import ChromaTransformer2DModel

    try:
        state = keymap_flux.from_original(_read_tensors(path, prefix, "model"))
    except (RuntimeError, KeyError, IndexError) as error:  # diffusers' converter on other shapes
        raise UserError(f"config key 'model': {path.name} is not a Chroma transformer diffusers can read "
                        f"({type(error).__name__}: {error})") from None
    with init_empty_weights():
        model = ChromaTransformer2DModel.from_config(_chroma_transformer_config(shapes, prefix))
    return _load_weights(model, state, "model", path.name, dtype)


def load_chroma_transformer(transformer_file):
    """Only the transformer of a Chroma file (a bare one or a ComfyUI checkpoint), fp32 on the CPU."""
    return _chroma_transformer(*_chroma_file(transformer_file))


def load_chroma_files(transformer_file, text_encoder=None, vae=None, dtypes: Optional[dict] = None) -> dict:
    """Chroma from ComfyUI-style files on the CPU: {"transformer", "text_encoder" (T5-XXL), "vae"}, each in its
    dtype in `dtypes` (fp32 where not given), as load_flux_files reads Flux.1's."""
    dtype = {name: torch.float32 for name in ("transformer", "text_encoder", "vae")} | (dtypes or {})
    path, shapes, prefix = _chroma_file(transformer_file)
    sizes = SimpleNamespace(**_chroma_transformer_config(shapes, prefix))  # what the other parts must fit
    loaded = {}
    t5 = functools.partial(_flux_t5, key="text_encoder")  # Chroma's one text encoder
    for name, given, loader in (("text_encoder", text_encoder, t5), ("vae", vae, flux_vae)):
        if given:
            source = paths.existing_file(given, name)
            state = (_read_tensors(source, CHROMA_PARTS[name], name, dtype[name])
                     or _read_tensors(source, "", name, dtype[name]))
        elif any(key.startswith(CHROMA_PARTS[name]) for key in shapes):
            source, state = path, _read_tensors(path, CHROMA_PARTS[name], name, dtype[name])
        else:
            raise UserError(f"config key '{name}': {path.name} holds no {name.replace('_', ' ')}; set {name}: to "
                            f"{CHROMA_FILES[name]}")
        loaded[name] = loader(state, sizes, source.name, dtype[name])
    return {"transformer": _chroma_transformer(path, shapes, prefix, dtype["transformer"]), **loaded}
