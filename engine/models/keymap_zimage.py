"""Z-Image's transformer: diffusers' keys <-> the original layout (Tongyi-MAI's own, the file ComfyUI loads from
its diffusion_models/ folder and diffusers' single-file loader reads).

The layouts differ in names and in one fusion: each block's attention holds q, k and v as one `qkv` (q's rows,
then k's, then v's), its output projection is `out`, its norms `q_norm`/`k_norm`, and the patch embedder and
final layer of the only patch size (2, one frame) are `x_embedder`/`final_layer`. Every other key is the same.
"""
from __future__ import annotations

import torch

# (diffusers, original): a key that starts with the first (the embedder and final layer) or holds it (a block's
# attention) is the other's
_PREFIXES = (("all_x_embedder.2-1.", "x_embedder."), ("all_final_layer.2-1.", "final_layer."))
_INSIDE = ((".attention.to_out.0.", ".attention.out."), (".attention.norm_q.", ".attention.q_norm."),
           (".attention.norm_k.", ".attention.k_norm."))
_QKV = (".attention.to_q.", ".attention.to_k.", ".attention.to_v.")
_FUSED = ".attention.qkv."


def _renamed(key: str, forward: bool) -> str:
    for diffusers, original in _PREFIXES:
        source, target = (diffusers, original) if forward else (original, diffusers)
        if key.startswith(source):
            return target + key[len(source):]
    for diffusers, original in _INSIDE:
        source, target = (diffusers, original) if forward else (original, diffusers)
        if source in key:
            return key.replace(source, target)
    return key


def to_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ZImageTransformer2DModel state dict in the original layout."""
    out = {}
    for key, tensor in state.items():
        if _QKV[1] in key or _QKV[2] in key:
            continue  # joined with q's below
        if _QKV[0] in key:
            parts = [state[key.replace(_QKV[0], part)] for part in _QKV]
            out[key.replace(_QKV[0], _FUSED)] = torch.cat(parts, dim=0)
        else:
            out[_renamed(key, forward=True)] = tensor
    return out


def from_original(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original-layout Z-Image transformer's tensors under diffusers' keys (the inverse of to_original)."""
    out = {}
    for key, tensor in state.items():
        if _FUSED in key:
            for part, piece in zip(_QKV, tensor.chunk(3, dim=0)):
                out[key.replace(_FUSED, part)] = piece
        else:
            out[_renamed(key, forward=False)] = tensor
    return out
