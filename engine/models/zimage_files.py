"""Z-Image as ComfyUI users keep it: the transformer alone in its original layout (`keymap_zimage`; ComfyUI's
diffusion_models/ folder, z_image_turbo_bf16.safetensors), Qwen3-4B as transformers names it (text_encoders/,
qwen_3_4b.safetensors) and Flux.1's autoencoder in the LDM layout (vae/, ae.safetensors).

Each model is built from the shipped Z-Image-Turbo config with the sizes its tensors show; the transformer's
rotary split of a head is no tensor's shape: the file's recorded config gives it (this trainer's files),
else Z-Image's proportions (32 : 48 : 48 of 128) of the file's head width.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from ..errors import UserError
from . import keymap_zimage
from .qwen3_text import qwen3_from_file
from .single_file import (BUILTIN_CONFIGS, CONFIGS_KEY, _count, _load_weights, _read_tensors, flux_vae,
                          located_transformer, part_file, read_shapes)

# the keys only a Z-Image transformer's original layout has
TRANSFORMER_KEYS = ("noise_refiner.0.attention.qkv.weight", "cap_embedder.1.weight")
# where ComfyUI's checkpoints keep the transformer, and a bare transformer file (no prefix)
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")
LATENT_CHANNELS = 16  # Flux.1's autoencoder's
FILES = {"text_encoder": "Qwen3-4B (qwen_3_4b.safetensors)", "vae": "Flux.1's autoencoder (ae.safetensors)"}


def transformer_prefix(shapes: dict) -> Optional[str]:
    return next((prefix for prefix in TRANSFORMER_PREFIXES
                 if all(prefix + key in shapes for key in TRANSFORMER_KEYS)), None)


def is_zimage_file(path: Path) -> bool:
    try:
        return transformer_prefix(read_shapes(path)) is not None
    except UserError:  # not a readable checkpoint: the loader that takes it names the problem
        return False


def _shipped(component: str) -> dict:
    return json.loads((BUILTIN_CONFIGS / "z-image" / component / "config.json").read_text(encoding="utf-8"))


def _recorded_transformer_config(path: Path) -> Optional[dict]:
    from safetensors import safe_open

    if path.suffix != ".safetensors":
        return None
    with safe_open(str(path), "pt") as handle:
        recorded = (handle.metadata() or {}).get(CONFIGS_KEY)
    return json.loads(recorded).get("transformer") if recorded else None


def transformer_config(path: Path, shapes: dict, prefix: str) -> dict:
    """The shipped config with the sizes the tensors show (the recorded config where the file has one)."""
    recorded = _recorded_transformer_config(path)
    if recorded is not None:
        return recorded
    config = _shipped("transformer")
    dim, patch_inputs = shapes[prefix + "x_embedder.weight"]
    head = shapes[prefix + "layers.0.attention.q_norm.weight"][0]
    real_head = config["dim"] // config["n_heads"]
    config.update(dim=dim, n_heads=dim // head, n_kv_heads=dim // head, n_layers=_count(shapes, prefix + "layers."),
                  n_refiner_layers=_count(shapes, prefix + "noise_refiner."),
                  cap_feat_dim=shapes[prefix + "cap_embedder.1.weight"][1],
                  in_channels=patch_inputs // (config["all_patch_size"][0] ** 2),
                  axes_dims=[axis * head // real_head for axis in config["axes_dims"]])
    return config


def _transformer_file(transformer_file) -> tuple[Path, dict, str]:
    return located_transformer(transformer_file, transformer_prefix,
                               "a Z-Image transformer; a Z-Image model file holds it in the original layout "
                               "(layers.*, noise_refiner.*, cap_embedder.*), as z_image_turbo_bf16.safetensors")


def load_zimage_transformer(transformer_file, dtype: torch.dtype = torch.float32):
    """The transformer of a Z-Image file (a bare one or a ComfyUI checkpoint), on the CPU."""
    from accelerate import init_empty_weights
    from diffusers import ZImageTransformer2DModel

    path, shapes, prefix = _transformer_file(transformer_file)
    config = transformer_config(path, shapes, prefix)
    with init_empty_weights():
        model = ZImageTransformer2DModel.from_config(config)
    state = keymap_zimage.from_original(_read_tensors(path, prefix, "model"))
    return _load_weights(model, state, "model", path.name, dtype)


def _vae(state: dict, source: str, dtype: torch.dtype):
    channels = state["decoder.conv_in.weight"].shape[1] if "decoder.conv_in.weight" in state else LATENT_CHANNELS
    if channels != LATENT_CHANNELS:
        raise UserError(f"config key 'vae': {source} has {channels} latent channels; Z-Image's transformer takes "
                        f"{LATENT_CHANNELS} ({FILES['vae']})")
    # Flux.1's loader checks the channels against a Flux transformer's input, 2x2 latent pixels per token
    return flux_vae(state, SimpleNamespace(in_channels=4 * LATENT_CHANNELS), source, dtype)


def load_zimage_files(transformer_file, text_encoder=None, vae=None, dtypes: Optional[dict] = None) -> dict:
    """Z-Image from ComfyUI-style files on the CPU: {"transformer", "text_encoder" (Qwen3-4B), "vae"}, each in its
    dtype in `dtypes` (by those names; fp32 where not given). A part not given is refused naming its key."""
    dtype = {name: torch.float32 for name in ("transformer", "text_encoder", "vae")} | (dtypes or {})
    _transformer_file(transformer_file)  # refused before the other files are read
    loaded = {}
    for name, given in (("text_encoder", text_encoder), ("vae", vae)):
        source = part_file(name, given, "Z-Image", FILES[name])
        state = _read_tensors(source, "", name, dtype[name])
        loaded[name] = qwen3_from_file(state, source.name, dtype[name], _shipped("text_encoder"),
                                       FILES["text_encoder"]) if name == "text_encoder" else _vae(
            state, source.name, dtype[name])
    return {"transformer": load_zimage_transformer(transformer_file, dtype["transformer"]), **loaded}
