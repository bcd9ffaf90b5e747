"""Qwen-Image's text encoder and autoencoder as ComfyUI users keep them, beside the transformer's own file.

- The text encoder (text_encoders/, qwen_2.5_vl_7b.safetensors): Qwen2.5-VL-7B under the names of Qwen's release,
  the language model under `model.` and the vision tower under `visual.` (ComfyUI's Qwen25_7BVLI), its vocabulary
  head `lm_head.` where the file keeps one. transformers reads those names into Qwen2_5_VLForConditionalGeneration;
  the fp8 file (qwen_2.5_vl_7b_fp8_scaled.safetensors) comes as plain weights first (`comfy_fp8`).
- The autoencoder (vae/, qwen_image_vae.safetensors): Wan 2.1's autoencoder in its original layout
  (`encoder.downsamples.*`, `decoder.upsamples.*`, `conv1`/`conv2` around the latent), which diffusers' Wan converter
  reads into the same modules AutoencoderKLQwenImage has.

Each model's architecture is the one the file's metadata records (CONFIGS_KEY, as `convert` records the transformer's),
else Qwen-Image's shipped one with the sizes the autoencoder's tensors show; any tensor that does not fit it is refused
naming the file's config key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from .. import paths
from ..errors import UserError
from .single_file import _count, _load_weights, _read_tensors, read_shapes

# where a file's metadata records a component's config (the layout `qwen_image.recorded_config` writes)
RECORDED = "{}/config.json"
# what only each file has: the language model's biased attention (ComfyUI's test for Qwen2.5) and a tower beside it;
# the middle of Wan's decoder (diffusers' and ComfyUI's test for Wan's autoencoder)
TEXT_ENCODER_KEYS = ("model.layers.0.self_attn.k_proj.bias", "model.embed_tokens.weight",
                     "model.layers.0.mlp.gate_proj.weight", "visual.patch_embed.proj.weight")
VAE_KEYS = ("decoder.middle.0.residual.0.gamma", "encoder.downsamples.0.residual.0.gamma", "encoder.conv1.weight",
            "conv2.weight")
FILES = {"text_encoder": "Qwen2.5-VL-7B (qwen_2.5_vl_7b.safetensors)",
         "vae": "Qwen-Image's autoencoder (qwen_image_vae.safetensors)"}
# the latent channels of the normalisation statistics in Qwen-Image's autoencoder config
LATENT_CHANNELS = 16


def _config(path: Path, component: str) -> dict:
    from .qwen_image import recorded_files, shipped_config

    recorded = recorded_files(path).get(RECORDED.format(component))
    config = dict(recorded) if recorded else shipped_config(component)
    for key in ("_name_or_path", "torch_dtype", "dtype"):  # where and how it was saved: no part of the architecture
        config.pop(key, None)
    return config


def _checked(given, key: str, wanted: tuple[str, ...]) -> tuple[Path, dict]:
    """The file's path and tensor shapes; a file without the tensors `wanted` is refused naming key."""
    path = paths.existing_file(given, key)
    try:
        shapes = read_shapes(path)
    except UserError:
        raise UserError(f"config key '{key}': cannot read {path.name} as a .safetensors file") from None
    if not all(name in shapes for name in wanted):
        raise UserError(f"config key '{key}': {path.name} is not {FILES[key]} in the layout ComfyUI keeps it (no "
                        f"{' or '.join(name for name in wanted if name not in shapes)})")
    return path, shapes


def _check_sizes(path: Path, shapes: dict, config) -> None:
    """Refuse a file whose sizes are not the config's, naming the key."""
    text, vision = config.text_config, config.vision_config
    wanted = {"vocabulary": text.vocab_size, "width": text.hidden_size, "layers": text.num_hidden_layers,
              "feed-forward width": text.intermediate_size, "vision blocks": vision.depth,
              "vision width": vision.hidden_size}
    found = {"vocabulary": shapes["model.embed_tokens.weight"][0], "width": shapes["model.embed_tokens.weight"][1],
             "layers": _count(shapes, "model.layers."),
             "feed-forward width": shapes["model.layers.0.mlp.gate_proj.weight"][0],
             "vision blocks": _count(shapes, "visual.blocks."),
             "vision width": shapes["visual.patch_embed.proj.weight"][0]}
    wrong = [name for name in wanted if wanted[name] != found[name]]
    if wrong:
        raise UserError(f"config key 'text_encoder': {path.name} does not fit Qwen2.5-VL's architecture: its "
                        f"{wrong[0]} is {found[wrong[0]]}, the architecture's {wanted[wrong[0]]} (that of "
                        f"{FILES['text_encoder']} where the file records none)")


def load_text_encoder_file(given, dtype: torch.dtype = torch.float32):
    """Qwen2.5-VL from ComfyUI's text-encoder file, in dtype on the CPU, by transformers' reading of its names.
    Without a vocabulary head in the file, the head shares the embedding (Qwen-Image reads hidden states only)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    path, shapes = _checked(given, "text_encoder", TEXT_ENCODER_KEYS)
    config = Qwen2_5_VLConfig.from_dict(_config(path, "text_encoder") | {
        "tie_word_embeddings": "lm_head.weight" not in shapes})
    _check_sizes(path, shapes, config)  # before a model of the config's size is built
    try:
        model, info = Qwen2_5_VLForConditionalGeneration.from_pretrained(
            None, config=config, state_dict=_read_tensors(path, "", "text_encoder", dtype), dtype=dtype,
            output_loading_info=True)
    except (RuntimeError, ValueError) as error:  # a tensor of another shape
        raise UserError(f"config key 'text_encoder': {path.name} does not fit Qwen2.5-VL's architecture "
                        f"({str(error).strip().splitlines()[0]})") from None
    wrong = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"])
    if wrong:
        raise UserError(f"config key 'text_encoder': {path.name} does not fit Qwen2.5-VL's architecture: "
                        f"{len(info['missing_keys'])} missing, {len(info['unexpected_keys'])} unexpected, e.g. "
                        f"{wrong[0]}")
    return model.eval()


def load_vae_file(given, dtype: torch.dtype = torch.float32):
    """AutoencoderKLQwenImage from ComfyUI's autoencoder file (Wan's original layout), in dtype on the CPU."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLQwenImage
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    path, _ = _checked(given, "vae", VAE_KEYS)
    state = _read_tensors(path, "", "vae")
    config = _config(path, "vae")
    # the widths are tensors' shapes: the first convolution's and the latent's (the convolution after it)
    config.update(base_dim=state["encoder.conv1.weight"].shape[0], z_dim=state["conv2.weight"].shape[0])
    if config["z_dim"] != len(config["latents_mean"]):
        raise UserError(f"config key 'vae': {path.name} has {config['z_dim']} latent channels; Qwen-Image's "
                        f"transformer takes {LATENT_CHANNELS} ({FILES['vae']})")
    with init_empty_weights():
        model = AutoencoderKLQwenImage.from_config(config)
    return _load_weights(model, convert_wan_vae_to_diffusers(state), "vae", path.name, dtype)


def load_parts(text_encoder, vae, dtypes: Optional[dict] = None) -> dict:
    """{"text_encoder", "vae"} of a single-file Qwen-Image model: each a diffusers folder (its config.json) or
    ComfyUI's file, in its dtype in `dtypes` (fp32 where not given). A part not given is refused naming its key."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLForConditionalGeneration

    dtype = {"text_encoder": torch.float32, "vae": torch.float32} | (dtypes or {})
    loaded = {}
    for key, given in (("text_encoder", text_encoder), ("vae", vae)):
        if not given:
            raise UserError(f"config key '{key}': a single-file Qwen-Image model holds the transformer only; set "
                            f"{key}: to {FILES[key]} or the diffusers folder's {key}/")
        location = Path(paths.resolve(str(given)))
        if location.is_file():
            loaded[key] = (load_text_encoder_file if key == "text_encoder" else load_vae_file)(location, dtype[key])
        elif (location / "config.json").is_file():
            loaded[key] = (Qwen2_5_VLForConditionalGeneration.from_pretrained(location, dtype=dtype[key])
                           if key == "text_encoder"
                           else AutoencoderKLQwenImage.from_pretrained(location, torch_dtype=dtype[key]))
        else:
            raise UserError(f"config key '{key}': {location} is neither {FILES[key]} nor a model folder (no "
                            "config.json)")
    return loaded
