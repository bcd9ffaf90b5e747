"""ComfyUI's fp8-scaled files read as plain weights, as ComfyUI itself reads them (comfy/utils.py convert_old_quants,
then its mixed-precision Linear layers).

Two layouts are in users' hands:
- the first one (qwen_2.5_vl_7b_fp8_scaled.safetensors, t5xxl_fp8_e4m3fn_scaled.safetensors): a `scaled_fp8` marker
  tensor, and beside each quantized Linear's float8 weight its scale `<layer>.scale_weight` (and an input scale
  `<layer>.scale_input` where the file has one);
- the mixed one (qwen_3_4b_fp8_mixed.safetensors, qwen_3_8b_fp8mixed.safetensors): beside each quantized weight its
  `<layer>.weight_scale` (and `<layer>.input_scale`) and its record `<layer>.comfy_quant`, the JSON of its format as
  bytes; or the same records in the file's metadata under `_quantization_metadata`.

A quantized weight is its float8 values times its scale. The input scales serve only fp8 matrix multiplication and
are dropped with the scales, the records and the marker. A format other than a float8 one (nvfp4, int8, ...) is
refused naming the config key.
"""
from __future__ import annotations

import json

import torch

from ..errors import UserError

MARKER = "scaled_fp8"
METADATA_KEY = "_quantization_metadata"
RECORD = "comfy_quant"
# a quantized layer's tensors besides its weight: its record and its weight's and input's scales, under the mixed
# layout's names and the first layout's
BESIDE = (RECORD, "weight_scale", "input_scale", "scale_weight", "scale_input")
# the formats whose weight is float8 values times one scale (comfy/quant_ops.py, TensorCoreFP8Layout)
FLOAT8_FORMATS = ("float8_e4m3fn", "float8_e5m2")


def _record(tensor: torch.Tensor) -> dict:
    return json.loads(bytes(tensor.tolist()).decode("utf-8"))


def quantized_layers(state: dict, metadata: dict, prefix: str = "") -> dict[str, dict]:
    """Each quantized layer's record by its name in `state` (the file's tensors under prefix, without it): the
    `.comfy_quant` tensors, with the records of the file's metadata over them, or where the metadata has none and
    the marker is there, the first layout's layers (each one with a `.scale_weight`), float8_e4m3fn all."""
    layers = {key[:-len(RECORD) - 1]: _record(value) for key, value in state.items() if key.endswith("." + RECORD)}
    if METADATA_KEY in metadata:
        recorded = json.loads(metadata[METADATA_KEY])["layers"]
        layers |= {name[len(prefix):]: record for name, record in recorded.items() if name.startswith(prefix)}
    elif MARKER in state:
        layers |= {key[:-len(".scale_weight")]: {"format": "float8_e4m3fn"} for key in state
                   if key.endswith(".scale_weight")}
    return layers


def plain_weights(state: dict, metadata: dict, prefix: str, dtype: torch.dtype, key: str,
                  source: str) -> dict[str, torch.Tensor]:
    """state with each quantized weight as its float8 values times its scale, computed in fp32 and given in dtype,
    and without the marker, scales and records; a state without them unchanged. A layer of another format, or
    without its scale, is refused naming key."""
    layers = quantized_layers(state, metadata, prefix)
    if not layers and MARKER not in state:
        return state
    plain = {name: value for name, value in state.items() if name != MARKER}
    for layer, record in layers.items():
        if record.get("format") not in FLOAT8_FORMATS:
            raise UserError(f"config key '{key}': {source} holds {layer}.weight quantized as {record.get('format')}, "
                            f"which this app does not read (it reads {' and '.join(FLOAT8_FORMATS)} with one scale "
                            "per weight); use the file's bf16 or fp8-scaled version")
        beside = {name: plain.pop(f"{layer}.{name}") for name in BESIDE if f"{layer}.{name}" in plain}
        scale, weight = beside.get("weight_scale", beside.get("scale_weight")), plain.get(f"{layer}.weight")
        if weight is None or scale is None:
            raise UserError(f"config key '{key}': {source} records {layer} as {record['format']} but holds no "
                            f"{layer}.{'weight' if weight is None else 'weight_scale'}")
        value = weight.float() * scale.float()
        if value.shape != weight.shape:
            raise UserError(f"config key '{key}': {source} holds a scale of shape {tuple(scale.shape)} for "
                            f"{layer}.weight of shape {tuple(weight.shape)}")
        plain[f"{layer}.weight"] = value.to(dtype)
    return plain
