"""FLUX.2 [klein] as ComfyUI users keep it: the transformer alone in Black Forest Labs' layout (`keymap_flux2`;
ComfyUI's diffusion_models/ folder, flux-2-klein-4b.safetensors), Qwen3 as transformers names it (text_encoders/,
qwen_3_4b.safetensors, qwen_3_8b.safetensors for the 9B) and FLUX.2's autoencoder in the LDM layout with its
latents' batch-norm statistics (vae/, flux2-vae.safetensors).

Each model is built from the shipped FLUX.2 [klein] 4B configs with the sizes its tensors show. The transformer's
rotary split of a head is no tensor's shape: it keeps the real model's proportions (four equal axes) of the file's
head width.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from ..errors import UserError
from .single_file import (_count, _load_weights, _read_tensors, ldm_vae_config, located_transformer, part_file,
                          read_shapes)

ARCH = "flux2-klein-4b"  # the shipped configs a file's sizes go into
# what only a FLUX.2 transformer has in BFL's layout: the modulation shared by all blocks (ComfyUI's test for
# Flux.2, comfy/model_detection.py), and a Flux double block
TRANSFORMER_KEYS = ("double_stream_modulation_img.lin.weight", "double_blocks.0.img_attn.norm.query_norm.scale")
# where ComfyUI's checkpoints keep the transformer, and a bare transformer file (no prefix)
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "")
# BFL's autoencoder keeps its quant convolutions inside the encoder and decoder; ComfyUI moves them to the top
# level, where diffusers' LDM converter reads them
QUANT_CONVS = {"encoder.quant_conv.": "quant_conv.", "decoder.post_quant_conv.": "post_quant_conv."}
BATCH_NORM = "bn."
FILES = {"text_encoder": "Qwen3 (qwen_3_4b.safetensors; qwen_3_8b.safetensors for the 9B)",
         "vae": "FLUX.2's autoencoder (flux2-vae.safetensors)"}


def transformer_prefix(shapes: dict) -> Optional[str]:
    return next((prefix for prefix in TRANSFORMER_PREFIXES
                 if all(prefix + key in shapes for key in TRANSFORMER_KEYS)), None)


def is_klein_file(path: Path) -> bool:
    try:
        return transformer_prefix(read_shapes(path)) is not None
    except UserError:  # not a readable checkpoint: the loader that takes it names the problem
        return False


def shipped(component: str) -> dict:
    from .flux2_klein import shipped as shipped_config

    return shipped_config(ARCH, component)


def transformer_config(shapes: dict, prefix: str) -> dict:
    """The shipped config with the sizes the tensors show."""
    config = shipped("transformer")
    width, in_channels = shapes[prefix + "img_in.weight"]
    head = shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    real_head = config["attention_head_dim"]
    config.update(in_channels=in_channels, attention_head_dim=head, num_attention_heads=width // head,
                  num_layers=_count(shapes, prefix + "double_blocks."),
                  num_single_layers=_count(shapes, prefix + "single_blocks."),
                  joint_attention_dim=shapes[prefix + "txt_in.weight"][1],
                  # the MLP's input projects to its gate and its value
                  mlp_ratio=shapes[prefix + "double_blocks.0.img_mlp.0.weight"][0] / (2 * width),
                  axes_dims_rope=[axis * head // real_head for axis in config["axes_dims_rope"]])
    return config


def _transformer_file(transformer_file) -> tuple[Path, dict, str]:
    return located_transformer(transformer_file, transformer_prefix,
                               "a FLUX.2 [klein] transformer; its model file holds it in Black Forest Labs' layout "
                               "(double_blocks.*, single_blocks.*, double_stream_modulation_img.*), as "
                               "flux-2-klein-4b.safetensors")


def load_klein_transformer(transformer_file, dtype: torch.dtype = torch.float32):
    """The transformer of a FLUX.2 [klein] file (a bare one or a ComfyUI checkpoint), on the CPU, by diffusers'
    FLUX.2 converter."""
    from accelerate import init_empty_weights
    from diffusers import Flux2Transformer2DModel
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers

    path, shapes, prefix = _transformer_file(transformer_file)
    with init_empty_weights():
        model = Flux2Transformer2DModel.from_config(transformer_config(shapes, prefix))
    try:
        state = convert_flux2_transformer_checkpoint_to_diffusers(_read_tensors(path, prefix, "model"))
    except (RuntimeError, KeyError, IndexError) as error:  # diffusers' converter on other shapes
        raise UserError(f"config key 'model': {path.name} is not a FLUX.2 transformer diffusers can read "
                        f"({type(error).__name__}: {error})") from None
    return _load_weights(model, state, "model", path.name, dtype)


def _vae(state: dict, source: str, dtype: torch.dtype, latent_channels: int):
    """AutoencoderKLFlux2 from the LDM layout (diffusers' converter) and its batch-norm statistics."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKLFlux2
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    for original, moved in QUANT_CONVS.items():
        state = {moved + key[len(original):] if key.startswith(original) else key: value
                 for key, value in state.items()}
    if ("decoder.conv_in.weight" not in state or "encoder.down.0.block.0.conv1.weight" not in state
            or BATCH_NORM + "running_mean" not in state):
        raise UserError(f"config key 'vae': {source} is not FLUX.2's autoencoder in the original layout (no "
                        f"encoder.down / decoder weights or bn statistics); set it to {FILES['vae']}")
    latent = state["decoder.conv_in.weight"].shape[1]
    if latent != latent_channels:
        raise UserError(f"config key 'vae': {source} has {latent} latent channels; this transformer takes "
                        f"{latent_channels} ({FILES['vae']})")
    config = ldm_vae_config(state, shipped("vae"))  # the group-norm count is no tensor's shape: FLUX.2's is kept
    with init_empty_weights():
        model = AutoencoderKLFlux2.from_config(config)
    weights = convert_ldm_vae_checkpoint({k: v for k, v in state.items() if not k.startswith(BATCH_NORM)}, config)
    weights.update({key: value for key, value in state.items() if key.startswith(BATCH_NORM)})
    return _load_weights(model, weights, "vae", source, dtype)


def load_klein_files(transformer_file, text_encoder=None, vae=None, dtypes: Optional[dict] = None) -> dict:
    """FLUX.2 [klein] from ComfyUI-style files on the CPU: {"transformer", "text_encoder" (Qwen3ForCausalLM),
    "vae"}, each in its dtype in `dtypes` (by those names; fp32 where not given). A part not given is refused
    naming its key."""
    from .qwen3_text import qwen3_from_file

    dtype = {name: torch.float32 for name in ("transformer", "text_encoder", "vae")} | (dtypes or {})
    _, shapes, prefix = _transformer_file(transformer_file)  # refused before the other files are read
    sizes = transformer_config(shapes, prefix)
    loaded = {}
    for name, given in (("text_encoder", text_encoder), ("vae", vae)):
        source = part_file(name, given, "FLUX.2 [klein]", FILES[name])
        state = _read_tensors(source, "", name, dtype[name])
        embedding = state.get("model.embed_tokens.weight", state.get("embed_tokens.weight"))
        if name == "text_encoder" and embedding is not None and 3 * embedding.shape[1] != sizes["joint_attention_dim"]:
            raise UserError(f"config key 'text_encoder': {source.name} is {embedding.shape[1]} wide; this transformer "
                            f"reads three Qwen3 layers side by side, {sizes['joint_attention_dim'] // 3} wide each "
                            f"({FILES['text_encoder']})")
        if name == "text_encoder":
            loaded[name] = qwen3_from_file(state, source.name, dtype[name], shipped("text_encoder"),
                                           FILES["text_encoder"], causal_lm=True)
        else:
            # the transformer packs 2x2 latent pixels into a token
            loaded[name] = _vae(state, source.name, dtype[name], sizes["in_channels"] // 4)
    return {"transformer": load_klein_transformer(transformer_file, dtype["transformer"]), **loaded}
