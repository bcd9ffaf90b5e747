"""Flux.1's transformer in Black Forest Labs' original layout (the flux1-dev.safetensors users keep, and what
ComfyUI's diffusion_models/ folder and Forge load), and back.

diffusers' FluxTransformer2DModel splits what BFL fuses: a double block's image and text attention each
compute q, k and v with one `qkv` linear, and a single block computes q, k, v and its MLP input with one
`linear1`; both are the diffusers weights concatenated on the output axis in that order. The final
modulation (`final_layer.adaLN_modulation.1`) holds shift then scale, diffusers' `norm_out.linear` scale then
shift. The q/k RMSNorms' weights are called `scale`.

Chroma's transformer is Flux.1's blocks without their modulation layers, whose outputs one network computes
(`distilled_guidance_layer`, the same name in both layouts): its residual blocks' two linears are `in_layer`
and `out_layer` there and its RMSNorms' weights `scale` (lodestones' layout, which ComfyUI and
diffusers' convert_chroma_transformer_checkpoint_to_diffusers read).

Original -> diffusers is diffusers' own single-file converter (what from_single_file runs). It assumes
Flux.1's width (3072, MLP ratio 4) for the single blocks, so it reads only full-width models; this module's
own direction (diffusers -> original) takes any width.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch

from ..errors import UserError

PREFIX = "model.diffusion_model."  # the transformer's prefix in an all-in-one checkpoint (ComfyUI's)
NORM_OUT = "norm_out.linear"

# diffusers module -> original module, inside each double block
_DOUBLE = {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj", "ff.net.0.proj": "img_mlp.0",
           "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0", "ff_context.net.2": "txt_mlp.2",
           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
           "attn.norm_q": "img_attn.norm.query_norm", "attn.norm_k": "img_attn.norm.key_norm",
           "attn.norm_added_q": "txt_attn.norm.query_norm", "attn.norm_added_k": "txt_attn.norm.key_norm"}
# the diffusers modules fused into one original module, in their order on its output axis
_DOUBLE_FUSED = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE = {"proj_out": "linear2", "norm.linear": "modulation.lin", "attn.norm_q": "norm.query_norm",
           "attn.norm_k": "norm.key_norm"}
_SINGLE_FUSED = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
_TOP = {"x_embedder": "img_in", "context_embedder": "txt_in",
        "time_text_embed.timestep_embedder.linear_1": "time_in.in_layer",
        "time_text_embed.timestep_embedder.linear_2": "time_in.out_layer",
        "time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
        "time_text_embed.text_embedder.linear_2": "vector_in.out_layer",
        "time_text_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
        "time_text_embed.guidance_embedder.linear_2": "guidance_in.out_layer",
        "proj_out": "final_layer.linear", NORM_OUT: "final_layer.adaLN_modulation.1"}
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")
APPROXIMATOR = "distilled_guidance_layer."  # Chroma's modulation network
_APPROXIMATOR_LAYER = {"linear_1": "in_layer", "linear_2": "out_layer"}


@dataclass(frozen=True)
class Layout:
    """A BFL transformer's names: diffusers module -> original module at the top level, inside each double
    block and inside each single block, and the original modules that fuse several diffusers ones."""
    top: Mapping[str, str]
    double: Mapping[str, str]
    double_fused: Mapping[str, tuple[str, ...]]
    single: Mapping[str, str]
    single_fused: Mapping[str, tuple[str, ...]]


FLUX1 = Layout(_TOP, _DOUBLE, _DOUBLE_FUSED, _SINGLE, _SINGLE_FUSED)


def _blocks(keys: Iterable[str]) -> tuple[set[int], set[int]]:
    double, single = set(), set()
    for key in keys:
        match = _BLOCK.match(key)
        if match:
            (double if match.group(1) == "transformer_blocks" else single).add(int(match.group(2)))
    return double, single


def module_map(keys: Iterable[str], layout: Layout = FLUX1) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Each diffusers module of a transformer with these state-dict keys -> (its original module, the
    diffusers modules that original module concatenates, in order; just itself when not fused)."""
    keys = list(keys)
    double, single = _blocks(keys)
    result = {module: (original, (module,)) for module, original in layout.top.items()}
    for key in keys:
        if key.startswith(APPROXIMATOR):
            module = key.rpartition(".")[0]
            *path, last = module.split(".")
            result[module] = (".".join([*path, _APPROXIMATOR_LAYER.get(last, last)]), (module,))
    for kind, indices, plain, fused in (("transformer_blocks", double, layout.double, layout.double_fused),
                                        ("single_transformer_blocks", single, layout.single, layout.single_fused)):
        target = "double_blocks" if kind == "transformer_blocks" else "single_blocks"
        for index in indices:
            source, original = f"{kind}.{index}.", f"{target}.{index}."
            result.update({source + m: (original + o, (source + m,)) for m, o in plain.items()})
            for o, members in fused.items():
                group = tuple(source + m for m in members)
                result.update({m: (original + o, group) for m in group})
    return result


def _swap_halves(tensor: torch.Tensor) -> torch.Tensor:
    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def to_original(state_dict: Mapping[str, torch.Tensor], layout: Layout = FLUX1) -> dict[str, torch.Tensor]:
    """A FluxTransformer2DModel state dict (or another layout's transformer) in the original layout (no
    prefix). Every key must have a place: a model with parts this layout has no name for is refused instead of
    written wrong."""
    modules = module_map(state_dict, layout)
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        module, _, param = key.rpartition(".")
        if module not in modules or param not in ("weight", "bias"):
            raise UserError(f"cannot convert the transformer to Flux's original layout: no name for '{key}'")
        original, group = modules[module]
        if original.endswith("_norm") or original.startswith(APPROXIMATOR + "norms."):
            param = "scale"
        if len(group) > 1:
            if module != group[0]:
                continue  # written with the group's first member
            tensor = torch.cat([state_dict[f"{member}.{param}"] for member in group], dim=0)
        elif module == NORM_OUT:
            tensor = _swap_halves(tensor)
        out[f"{original}.{param}"] = tensor
    return out


def from_original(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout Flux.1 or Chroma transformer (with or without PREFIX) as diffusers' state dict, by
    diffusers' own single-file converter of that model (full-width models only, see the module's docstring)."""
    from diffusers.loaders.single_file_utils import (convert_chroma_transformer_checkpoint_to_diffusers,
                                                     convert_flux_transformer_checkpoint_to_diffusers)

    if any(key.startswith(PREFIX) for key in state_dict):  # an all-in-one file: only its transformer
        state_dict = {key[len(PREFIX):]: tensor for key, tensor in state_dict.items() if key.startswith(PREFIX)}
    if any(key.startswith(APPROXIMATOR) for key in state_dict):
        return convert_chroma_transformer_checkpoint_to_diffusers(dict(state_dict))
    return convert_flux_transformer_checkpoint_to_diffusers(dict(state_dict))
