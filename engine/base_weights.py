"""Frozen weights stored in fewer bytes: an adapter run's base and the frozen text encoders in bf16,
float8_e4m3fn, int8 or nf4 (`base_dtype`), computed in the step's own precision.

A stored layer keeps its weight as a frozen parameter of the storage dtype and upcasts it inside its own
autograd function: the upcast copy lives only while the layer computes, and backward upcasts again instead
of keeping it. fp8 keeps one fp32 scale per output channel, so each row uses fp8's full range; int8 is
bitsandbytes' row-wise absmax quantization (one fp32 scale per output channel); nf4 is bitsandbytes' 4-bit
NormalFloat (QLoRA's), two codes to a uint8 byte and one fp32 absmax per NF4_BLOCK weights, kept flat in
`nf4`, the layer's `weight` then only its shape on the meta device (peft's LoHa and LoKr read it). Layers
are replaced by stored ones explicitly, module by module (adapter layers keep their base layer object's
place: the stored layer becomes their `base_layer`); the adapters' own weights are never touched.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

# by base_dtype: the dtype of the stored weight (nf4's packed codes are uint8)
STORAGE = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn, "int8": torch.int8, "nf4": torch.uint8}
NF4_BLOCK = 64  # weights per absmax: QLoRA's block size
# the names peft gives an adapter's own layers (LoRA, DoRA, LoHa, LoKr): never stored
ADAPTER_PARTS = ("lora_", "hada_", "lokr_")


class _StoredOp(torch.autograd.Function):
    """op(x, weight (of `shape`) upcast to x's dtype, bias). No gradient reaches the stored weight."""

    @staticmethod
    def forward(ctx, x, stored, scale, shape, bias, op: Callable, options: dict):
        ctx.save_for_backward(stored, scale)
        ctx.op, ctx.options, ctx.shape, ctx.input_shape, ctx.input_dtype = op, options, shape, x.shape, x.dtype
        return op(x, upcast(stored, scale, shape, x.dtype), bias, **options)

    @staticmethod
    def backward(ctx, grad_output):
        stored, scale = ctx.saved_tensors
        weight = upcast(stored, scale, ctx.shape, grad_output.dtype)
        if ctx.op is F.linear:
            grad_input = grad_output @ weight
        else:
            grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad_output, **ctx.options)
        return grad_input.to(ctx.input_dtype), None, None, None, None, None, None


def upcast(stored: torch.Tensor, scale: torch.Tensor, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The weight of `shape` in `dtype` from what quantize stored."""
    if stored.dtype == torch.uint8:
        import bitsandbytes  # noqa: F401 (registers torch.ops.bitsandbytes)

        # flat, as quantize_4bit packed it: bitsandbytes' CPU kernel needs an even last dimension. One row of
        # them rather than a 1-D shape, which that kernel returns as one row while the op's shape function (what
        # a compiled block checks its outputs against) says 1-D.
        flat = torch.ops.bitsandbytes.dequantize_4bit(stored, scale, NF4_BLOCK, "nf4", [1, shape.numel()], dtype)
        return flat.view(shape)
    weight = stored.to(dtype)
    return weight if scale.numel() == 0 else weight * scale.to(dtype).view(-1, *[1] * (stored.dim() - 1))


def quantize(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored weight, its scales: per output channel for fp8 and int8, per NF4_BLOCK weights for nf4; empty
    where the dtype needs none)."""
    import bitsandbytes.functional as bnb

    if dtype == torch.uint8:
        packed, state = bnb.quantize_4bit(weight.detach().float(), blocksize=NF4_BLOCK, quant_type="nf4")
        return packed, state.absmax
    if dtype == torch.int8:
        # bitsandbytes quantizes fp16 rows (its CUDA kernel's input); a weight is far inside fp16's range
        stored, absmax, _ = bnb.int8_vectorwise_quant(weight.detach().flatten(1).half())
        return stored.view(weight.shape), absmax / 127  # bnb.int8_vectorwise_dequant's factor
    if dtype != torch.float8_e4m3fn:
        return weight.to(dtype), torch.empty(0)
    largest = weight.detach().abs().flatten(1).amax(dim=1).float()
    scale = torch.where(largest > 0, largest / torch.finfo(dtype).max, torch.ones_like(largest))
    return (weight.float() / scale.view(-1, *[1] * (weight.dim() - 1))).to(dtype), scale


class Stored:
    """What a stored layer adds to the layer it replaces: its weight in the storage dtype with its scale,
    the frozen bias, and the weight dequantized."""

    def _store(self, layer: torch.nn.Module, dtype: torch.dtype) -> None:
        stored, scale = quantize(layer.weight.data, dtype)
        # A parameter, as the weight it scales is: counted with the model's weights. Registered first:
        # diffusers takes a model's dtype from its first floating parameter and pipelines cast their latents
        # to it, which an fp8 weight first would make fp8 (the fp32 scale is what int8 and nf4 report too).
        self.scale = torch.nn.Parameter(scale.to(stored.device), requires_grad=False)
        if dtype == torch.uint8:
            self.nf4 = torch.nn.Parameter(stored, requires_grad=False)
            self.weight = torch.empty(layer.weight.shape, device="meta")
        else:
            self.weight = torch.nn.Parameter(stored, requires_grad=False)
        self.bias = None if layer.bias is None else torch.nn.Parameter(layer.bias.data, requires_grad=False)

    @property
    def stored(self) -> torch.Tensor:
        return getattr(self, "nf4", self.weight)

    def _apply_op(self, x: torch.Tensor, op: Callable, options: dict) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return _StoredOp.apply(x, self.stored, self.scale, self.weight.shape, bias, op, options)

    def dequantized(self) -> torch.Tensor:
        return upcast(self.stored, self.scale, self.weight.shape, torch.float32)

    def plain(self) -> torch.nn.Module:
        """The layer it replaced, with the dequantized weight in fp32 (what the adapter trained over)."""
        layer = self._plain()
        layer.weight = torch.nn.Parameter(self.dequantized(), requires_grad=False)
        layer.bias = None if self.bias is None else torch.nn.Parameter(self.bias.data.float(), requires_grad=False)
        return layer


class StoredLinear(Stored, torch.nn.Linear):
    """A frozen Linear whose weight is stored in `dtype`. A Linear still, so adapters wrap it as one."""

    def __init__(self, layer: torch.nn.Linear, dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._store(layer, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._apply_op(x, F.linear, {})

    def _plain(self) -> torch.nn.Linear:
        return torch.nn.Linear(self.in_features, self.out_features, device="meta")


class StoredConv2d(Stored, torch.nn.Conv2d):
    """A frozen Conv2d (zero padding given as numbers, the only kind _stored replaces) whose weight is stored
    in `dtype`."""

    def __init__(self, layer: torch.nn.Conv2d, dtype: torch.dtype):
        torch.nn.Module.__init__(self)
        for name in ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups",
                     "padding_mode", "transposed", "output_padding", "_reversed_padding_repeated_twice"):
            setattr(self, name, getattr(layer, name))
        self._store(layer, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        options = {"stride": self.stride, "padding": self.padding, "dilation": self.dilation, "groups": self.groups}
        return self._apply_op(x, F.conv2d, options)

    def _plain(self) -> torch.nn.Conv2d:
        return torch.nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                               self.dilation, self.groups, device="meta")


def _stored(layer: torch.nn.Module, dtype: torch.dtype):
    if type(layer) is torch.nn.Linear:
        return StoredLinear(layer, dtype)
    if type(layer) is torch.nn.Conv2d and layer.padding_mode == "zeros" and not isinstance(layer.padding, str):
        return StoredConv2d(layer, dtype)
    return None


def _adapter_part(name: str) -> bool:
    return any(part in name for part in ADAPTER_PARTS)


def _frozen(layer: torch.nn.Module) -> bool:
    return isinstance(layer, (torch.nn.Linear, torch.nn.Conv2d)) and not layer.weight.requires_grad


def store_frozen(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace every frozen Linear and Conv2d of model (an adapter's base layers included, its own layers
    not) by a stored one, and put the frozen tensors left (norms, embeddings, biases: small) in fp32, as a
    model read from disk in bf16 would otherwise compute them in bf16. Returns how many layers were
    replaced."""
    # transformers names the layers its code feeds inputs cast to their weight's dtype (T5's `wo`): stored in
    # a byte or less, those inputs would be rounded to that storage too, so they are stored in bf16 at most
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    replaced = 0
    for parent_name, parent in list(model.named_modules()):
        if _adapter_part(parent_name):
            continue
        for name, child in list(parent.named_children()):
            if _adapter_part(name) or not _frozen(child):
                continue
            stored = _stored(child, torch.bfloat16 if name in keep and dtype.itemsize < 2 else dtype)
            if stored is not None:
                setattr(parent, name, stored)
                replaced += 1
    for name, module in model.named_modules():
        if _adapter_part(name):
            continue
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            if tensor is not getattr(module, "weight", None) or not isinstance(module, Stored):
                if tensor.is_floating_point() and not tensor.requires_grad and tensor.dtype != torch.float32:
                    tensor.data = tensor.data.float()
    return replaced


def dequantize_stored(model: torch.nn.Module) -> None:
    """Replace every stored layer of model (an adapter's base layers included) by the plain layer it
    replaced, holding the dequantized weight in fp32: the weights an adapter trained over, which merging folds
    it into."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Stored):
                setattr(parent, name, child.plain())
