"""Names of SDXL's diffusers weights in the original single-file layout (Stability's generative-models,
read by A1111, ComfyUI and diffusers' single-file loader).

The UNet and the VAE keep SD's layout (keymap.py), the UNet with `label_emb` for its text-time embedding.
The two text encoders sit under `conditioner.embedders.`: the first, OpenAI CLIP ViT-L, keeps transformers'
names; the second, OpenCLIP ViT-bigG, has OpenCLIP's layout (fused q/k/v, and its projection stored as the
matrix OpenCLIP multiplies the pooled output by, the transpose of transformers' Linear weight).
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from .keymap import UNET_PREFIX, Target, _refuse, clip_key_map, unet_key_map, vae_key_map

CONDITIONER_PREFIX = "conditioner.embedders."
CLIP_PREFIX = CONDITIONER_PREFIX + "0.transformer.text_model."
OPEN_CLIP_PREFIX = CONDITIONER_PREFIX + "1.model."
# Each encoder's place in the file and the activation that place implies (the loaders build the model
# from the layout, not from a config): OpenAI's CLIP uses QuickGELU, OpenCLIP's bigG plain GELU.
_ENCODERS = {"text_encoder": (CLIP_PREFIX, "quick_gelu", False),
             "text_encoder_2": (OPEN_CLIP_PREFIX, "gelu", True)}


def _encoder_key_map(component: str, config: Mapping, keys: Iterable[str]) -> dict[str, Target]:
    prefix, activation, open_clip = _ENCODERS[component]
    if config.get("hidden_act") != activation:
        raise _refuse(component, f"SDXL's {'second' if open_clip else 'first'} text encoder is a CLIP text model "
                                 f"with activation {activation}, this one has {config.get('hidden_act')!r}")
    return clip_key_map(component, config, keys, prefix, open_clip, projection=open_clip)


def text_encoder_key_map(config: Mapping, keys: Iterable[str]) -> dict[str, Target]:
    return _encoder_key_map("text_encoder", config, keys)


def text_encoder_2_key_map(config: Mapping, keys: Iterable[str]) -> dict[str, Target]:
    return _encoder_key_map("text_encoder_2", config, keys)


KEY_MAPS = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map,
            "text_encoder_2": text_encoder_2_key_map}


def is_sdxl_models(models: Mapping[str, torch.nn.Module]) -> bool:
    """Whether models ({"unet": …, "text_encoder": …}) are SDXL's: a second text encoder, or a UNet
    conditioned on text and time ids (the UNet alone, when a file leaves the text encoders out)."""
    if "text_encoder_2" in models:
        return True
    unet = models.get("unet")
    return unet is not None and unet.config.get("addition_embed_type") == "text_time"


def unet_module_names(config: Mapping, modules: Iterable[str]) -> dict[str, str]:
    """diffusers UNet module paths -> the original layout's (`down_blocks.1.attentions.0.proj_in` ->
    `input_blocks.4.1.proj_in`), as kohya's SDXL trainer names its adapted modules."""
    modules = list(modules)
    mapping = unet_key_map(config, [f"{module}.weight" for module in modules])
    return {module: mapping[f"{module}.weight"].key.removeprefix(UNET_PREFIX).removesuffix(".weight")
            for module in modules}
