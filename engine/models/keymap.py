"""Names of diffusers weights in the original Stable Diffusion checkpoint layout (A1111, ComfyUI).

Each map is built from the model's own config (block types and counts), so any SD1.x/SD2.x/SDXL-shaped
model converts, the tiny demo models included (SDXL's text encoders: keymap_sdxl). Building a map checks
that every source key gets exactly one place in the output: a model with parts this layout has no name for
is refused instead of written wrong.
"""
from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Mapping, Optional, Union

import torch

from ..errors import UserError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_ENCODER_PREFIX = "cond_stage_model."
CLIP_PREFIX = TEXT_ENCODER_PREFIX + "transformer.text_model."
OPEN_CLIP_PREFIX = TEXT_ENCODER_PREFIX + "model."


@dataclass(frozen=True)
class Target:
    """Where one source tensor goes: a key, or one slice of a key that concatenates several (q, k, v)."""
    key: str
    part: int = 0
    parts: int = 1
    conv1x1: bool = False  # a linear weight stored as a 1x1 convolution
    transpose: bool = False  # a linear weight stored as the matrix the input is multiplied by (x @ W)


# Resnet parameter names: diffusers ResnetBlock2D -> LDM ResBlock (UNet) and ResnetBlock (VAE).
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2",
               "conv_shortcut": "nin_shortcut"}
# VAE mid-block attention, both the current and the pre-0.15 diffusers names.
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out",
                  "query": "q", "key": "k", "value": "v", "proj_attn": "proj_out"}
_PARAM = ("weight", "bias")
# Modules whose names are the same in both layouts; anything else inside them is an unknown architecture.
_SAME = re.compile(r"(weight|bias)")
_SPATIAL_TRANSFORMER = re.compile(
    r"(norm|proj_in|proj_out)\.(weight|bias)|transformer_blocks\.\d+\.(norm[123]\.(weight|bias)"
    r"|attn[12]\.to_[qkv]\.weight|attn[12]\.to_out\.0\.(weight|bias)|ff\.net\.(0\.proj|2)\.(weight|bias))")

_UNET_DOWN = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}  # block type -> has attentions
_UNET_UP = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}
_UNET_MID = ("UNetMidBlock2DCrossAttn", None)
# SDXL's embedding of the pooled text embedding and the micro-conditioning; its original is `label_emb`.
_ADDITION_EMBEDDING = (("add_embedding.linear_1.", "label_emb.0.0.", _SAME),
                       ("add_embedding.linear_2.", "label_emb.0.2.", _SAME))


def _per_block(value, count: int) -> list[int]:
    return list(value) if isinstance(value, (list, tuple)) else [value] * count


def _refuse(component: str, message: str) -> UserError:
    return UserError(f"cannot convert the {component} to a single-file checkpoint: {message}")


Rule = Union[dict, re.Pattern]


def _modules_to_keys(component: str, keys: Iterable[str], modules: list[tuple[str, str, Rule]]) -> dict[str, Target]:
    """Map keys through (diffusers module prefix, original prefix, rule); a rule is a dict renaming the
    parameter's module, or a pattern the rest of the key must match to keep its name."""
    by_prefix = {source: (target, rule) for source, target, rule in modules}
    result, unknown = {}, []
    for key in keys:
        parts = key.split(".")
        # The longest module prefix owns the key: "mid_block.resnets.0." before any shorter prefix.
        for cut in range(len(parts) - 1, 0, -1):
            prefix = ".".join(parts[:cut]) + "."
            if prefix in by_prefix:
                break
        else:
            unknown.append(key)
            continue
        target, rule = by_prefix[prefix]
        rest = key[len(prefix):]
        if isinstance(rule, dict):
            name, _, param = rest.rpartition(".")
            if name not in rule or param not in _PARAM:
                unknown.append(key)
                continue
            rest = f"{rule[name]}.{param}"
        elif not rule.fullmatch(rest):
            unknown.append(key)
            continue
        result[key] = Target(target + rest)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise _refuse(component, f"no original-layout name for '{unknown[0]}'{more}")
    return result


def unet_key_map(config: Mapping, keys: Iterable[str]) -> dict[str, Target]:
    """UNet2DConditionModel -> LDM UNetModel (input_blocks / middle_block / output_blocks), with SDXL's
    text-time embedding; the transformer depth of each block (SDXL: transformer_layers_per_block) shows in
    the keys alone."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    for kind, known in (*((t, _UNET_DOWN) for t in down_types), *((t, _UNET_UP) for t in up_types)):
        if kind not in known:
            raise _refuse("unet", f"block type {kind} has no original layout")
    if config.get("mid_block_type", _UNET_MID[0]) not in _UNET_MID:
        raise _refuse("unet", f"mid block type {config['mid_block_type']} has no original layout")
    layers = _per_block(config["layers_per_block"], len(down_types))
    up_layers = list(reversed(layers))
    modules = [("time_embedding.linear_1.", "time_embed.0.", _SAME),
               ("time_embedding.linear_2.", "time_embed.2.", _SAME), ("conv_in.", "input_blocks.0.0.", _SAME),
               ("conv_norm_out.", "out.0.", _SAME), ("conv_out.", "out.2.", _SAME)]
    if config.get("addition_embed_type") == "text_time":
        modules += _ADDITION_EMBEDDING
    index = 1
    for block, kind in enumerate(down_types):
        for layer in range(layers[block]):
            modules.append((f"down_blocks.{block}.resnets.{layer}.", f"input_blocks.{index}.0.", _UNET_RESNET))
            if _UNET_DOWN[kind]:
                modules.append((f"down_blocks.{block}.attentions.{layer}.", f"input_blocks.{index}.1.",
                                _SPATIAL_TRANSFORMER))
            index += 1
        if block < len(down_types) - 1:  # diffusers gives every block but the last a downsampler
            modules.append((f"down_blocks.{block}.downsamplers.0.conv.", f"input_blocks.{index}.0.op.", _SAME))
            index += 1
    if config.get("mid_block_type", _UNET_MID[0]):
        modules += [("mid_block.resnets.0.", "middle_block.0.", _UNET_RESNET),
                    ("mid_block.attentions.0.", "middle_block.1.", _SPATIAL_TRANSFORMER),
                    ("mid_block.resnets.1.", "middle_block.2.", _UNET_RESNET)]
    index = 0
    for block, kind in enumerate(up_types):
        count = up_layers[block] + 1
        for layer in range(count):
            modules.append((f"up_blocks.{block}.resnets.{layer}.", f"output_blocks.{index}.0.", _UNET_RESNET))
            if _UNET_UP[kind]:
                modules.append((f"up_blocks.{block}.attentions.{layer}.", f"output_blocks.{index}.1.",
                                _SPATIAL_TRANSFORMER))
            if layer == count - 1 and block < len(up_types) - 1:
                slot = 2 if _UNET_UP[kind] else 1
                modules.append((f"up_blocks.{block}.upsamplers.0.conv.", f"output_blocks.{index}.{slot}.conv.", _SAME))
            index += 1
    modules = [(source, UNET_PREFIX + target, rule) for source, target, rule in modules]
    return _modules_to_keys("unet", keys, modules)


def vae_key_map(config: Mapping, keys: Iterable[str]) -> dict[str, Target]:
    """AutoencoderKL -> LDM AutoencoderKL (encoder.down / decoder.up in reverse order / mid.attn_1)."""
    down_types, up_types = list(config["down_block_types"]), list(config["up_block_types"])
    if set(down_types) != {"DownEncoderBlock2D"} or set(up_types) != {"UpDecoderBlock2D"}:
        raise _refuse("vae", f"block types {down_types + up_types} have no original layout")
    modules = [("quant_conv.", "quant_conv.", _SAME), ("post_quant_conv.", "post_quant_conv.", _SAME)]
    for coder in ("encoder", "decoder"):
        modules += [(f"{coder}.conv_in.", f"{coder}.conv_in.", _SAME),
                    (f"{coder}.conv_norm_out.", f"{coder}.norm_out.", _SAME),
                    (f"{coder}.conv_out.", f"{coder}.conv_out.", _SAME),
                    (f"{coder}.mid_block.resnets.0.", f"{coder}.mid.block_1.", _VAE_RESNET),
                    (f"{coder}.mid_block.resnets.1.", f"{coder}.mid.block_2.", _VAE_RESNET),
                    (f"{coder}.mid_block.attentions.0.", f"{coder}.mid.attn_1.", _VAE_ATTENTION)]
    layers = config["layers_per_block"]
    for block in range(len(down_types)):
        for layer in range(layers):
            modules.append((f"encoder.down_blocks.{block}.resnets.{layer}.", f"encoder.down.{block}.block.{layer}.",
                            _VAE_RESNET))
        modules.append((f"encoder.down_blocks.{block}.downsamplers.0.conv.",
                        f"encoder.down.{block}.downsample.conv.", _SAME))
    # The original decoder numbers its levels from the lowest resolution up, diffusers from the top down.
    for block in range(len(up_types)):
        level = len(up_types) - 1 - block
        for layer in range(layers + 1):
            modules.append((f"decoder.up_blocks.{block}.resnets.{layer}.", f"decoder.up.{level}.block.{layer}.",
                            _VAE_RESNET))
        modules.append((f"decoder.up_blocks.{block}.upsamplers.0.conv.", f"decoder.up.{level}.upsample.conv.", _SAME))
    modules = [(source, VAE_PREFIX + target, rule) for source, target, rule in modules]
    mapping = _modules_to_keys("vae", keys, modules)
    # The original mid-block attention uses 1x1 convolutions where diffusers uses linears.
    return {key: Target(t.key, conv1x1=True) if re.search(r"mid\.attn_1\.(q|k|v|proj_out)\.weight$", t.key) else t
            for key, t in mapping.items()}


_CLIP_LAYER = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
               "layer_norm1", "layer_norm2", "mlp.fc1", "mlp.fc2")
_OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                    "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


def clip_key_map(component: str, config: Mapping, keys: Iterable[str], prefix: str, open_clip: bool,
                 projection: bool = False) -> dict[str, Target]:
    """CLIPTextModel (or, projection, CLIPTextModelWithProjection) -> transformers' own names behind prefix,
    or OpenCLIP's layout (fused q/k/v, `text_projection` as the matrix OpenCLIP multiplies by).
    Keys with or without transformers' older `text_model.` prefix are accepted."""
    names = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    if not open_clip:
        names = {name: name for name in names} | {"embeddings.position_ids": "embeddings.position_ids"}
    for layer in range(config["num_hidden_layers"]):
        for module in _CLIP_LAYER:
            for param in _PARAM:
                source = f"encoder.layers.{layer}.{module}.{param}"
                if not open_clip:
                    names[source] = source
                elif module.endswith(_QKV):
                    names[source] = (f"transformer.resblocks.{layer}.attn.in_proj_{param}",
                                     _QKV.index(module.rsplit(".", 1)[1]))
                else:
                    names[source] = f"transformer.resblocks.{layer}.{_OPEN_CLIP_LAYER[module]}.{param}"
    result, unknown = {}, []
    for key in keys:
        name = names.get(key.removeprefix("text_model."))
        if open_clip and key.endswith("embeddings.position_ids"):
            continue  # a constant arange that older transformers saved; OpenCLIP has no such buffer
        if projection and key == "text_projection.weight":
            result[key] = Target(prefix + "text_projection", transpose=True)
        elif name is None:
            unknown.append(key)
        elif isinstance(name, tuple):
            result[key] = Target(prefix + name[0], part=name[1], parts=3)
        else:
            result[key] = Target(prefix + name)
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise _refuse(component, f"no original-layout name for '{unknown[0]}'{more}")
    return result


def text_encoder_key_map(config: Mapping, keys: Iterable[str]) -> dict[str, Target]:
    """CLIPTextModel -> SD1 (OpenAI CLIP, transformers names) or SD2 (OpenCLIP, fused q/k/v) layout.

    OpenAI's CLIP uses QuickGELU and OpenCLIP's ViT-H plain GELU, so the activation tells them apart.
    """
    activation = config.get("hidden_act")
    if activation not in ("quick_gelu", "gelu"):
        raise _refuse("text_encoder", f"a CLIP text model with activation {activation!r} is neither SD1.x "
                                      "(quick_gelu) nor SD2.x (gelu)")
    open_clip = activation == "gelu"
    return clip_key_map("text_encoder", config, keys, OPEN_CLIP_PREFIX if open_clip else CLIP_PREFIX, open_clip)


KEY_MAPS = {"unet": unet_key_map, "vae": vae_key_map, "text_encoder": text_encoder_key_map}


def check_complete(key_maps: Mapping[str, Mapping[str, Target]]) -> None:
    """Every output slot filled exactly once across all components, and every fused key whole."""
    slots: dict[str, dict[int, str]] = defaultdict(dict)
    sizes: dict[str, int] = {}
    for component, mapping in key_maps.items():
        for source, target in mapping.items():
            owner = slots[target.key].get(target.part)
            if owner is not None:
                raise _refuse(component, f"'{source}' and '{owner}' both map to '{target.key}'")
            slots[target.key][target.part] = source
            sizes[target.key] = target.parts
    for key, parts in slots.items():
        if len(parts) != sizes[key]:
            raise UserError(f"cannot convert to a single-file checkpoint: '{key}' is missing "
                            f"{sizes[key] - len(parts)} of its {sizes[key]} parts")


def to_original(state_dict: Mapping[str, torch.Tensor], mapping: Mapping[str, Target],
                dtype: Optional[torch.dtype] = None) -> dict[str, torch.Tensor]:
    """Rename, reshape and fuse the mapped tensors, casting floating-point ones to dtype.

    Works on meta tensors too, which is how output sizes of real architectures are checked.
    """
    out: dict[str, torch.Tensor] = {}
    fused: dict[str, dict[int, torch.Tensor]] = defaultdict(dict)
    for key, target in mapping.items():
        tensor = state_dict[key]
        if dtype is not None and tensor.is_floating_point():
            tensor = tensor.to(dtype)
        if target.parts > 1:
            fused[target.key][target.part] = tensor
            continue
        if target.conv1x1 and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)
        if target.transpose:
            tensor = tensor.T
        out[target.key] = tensor.contiguous()
    for key, parts in fused.items():
        out[key] = torch.cat([parts[i] for i in sorted(parts)])
    return out
