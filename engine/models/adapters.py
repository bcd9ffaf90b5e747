"""LoRA-family adapters (LoRA, LoCon, DoRA, LoHa, LoKr) through peft, and their files.

peft (diffusers' own adapter library) builds the layers: LoRA and DoRA with LoraConfig, LoHa and LoKr with
LoHaConfig and LoKrConfig. Its parameter names inside a module (lora_A/lora_B, hada_w1_a…, lokr_w1…) are
kept in checkpoints; the file users load in their UIs uses the kohya/LyCORIS layout, written by
`engine.models.kohya`.

The modules adapted are those kohya's sd-scripts adapts, so files from either trainer line up: every
Linear and 1x1 convolution inside the transformer blocks of the UNet, and the attention and MLP
projections of the text encoder (of both, for SDXL); with conv_rank > 0 (LoCon) also the ResNet blocks and
the down- and up-samplers, their 3x3 convolutions at conv_rank and their Linear and 1x1 layers at rank.
Flux.1's and Qwen-Image's transformers: the attention and MLP projections of their blocks (but for the layers of
Qwen-Image's last block that feed only its discarded text stream), and with network.modulation each block's
modulation layer too (refused for a model that has none). Z-Image's transformer: the attention and
feed-forward projections of its main blocks, and with network.modulation their adaLN modulation too.
FLUX.2 [klein]'s transformer: the attention and MLP projections of its blocks (a single block's fused
QKV-and-MLP input among them), and with network.modulation the three modulation layers its blocks share.
"""
from __future__ import annotations

import re
from typing import Optional

import torch

from ..config import Network
from ..errors import UserError

UNET_TRANSFORMER = re.compile(r"(^|\.)attentions\.\d+\.")
UNET_CONV_BLOCKS = re.compile(r"(^|\.)(resnets\.\d+|downsamplers\.\d+|upsamplers\.\d+)\.")
TEXT_PROJECTIONS = re.compile(r"(^|\.)layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])$")
# SDXL's second encoder is adapted as its first (and as SD's one) is; its pooled output's projection is not.
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# Flux.1's transformer: the attention and MLP projections of the double-stream blocks (image and text streams)
# and of the single-stream blocks; with network.modulation also each block's modulation layer (BFL's img_mod
# and txt_mod, a single block's modulation), which kohya's sd-scripts adapts as every other Linear of a block.
FLUX_DOUBLE = re.compile(r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                         r"add_v_proj|to_add_out)|ff\.net\.(0\.proj|2)|ff_context\.net\.(0\.proj|2))$")
FLUX_SINGLE = re.compile(r"^single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)$")
FLUX_MODULATION = re.compile(r"^(transformer_blocks\.\d+\.(norm1|norm1_context)|single_transformer_blocks\.\d+\.norm)"
                             r"\.linear$")
# Qwen-Image's blocks: Flux.1's double-stream attention, the image and text MLPs under their own names, and the
# modulation layers of the two streams (img_mod and txt_mod, a SiLU then this Linear).
QWEN_IMAGE_BLOCK = re.compile(r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                              r"add_v_proj|to_add_out)|(img|txt)_mlp\.net\.(0\.proj|2))$")
QWEN_IMAGE_MODULATION = re.compile(r"^transformer_blocks\.\d+\.(img|txt)_mod\.1$")

# Z-Image's transformer: the attention and SwiGLU projections of the main blocks, which kohya's musubi-tuner
# adapts (it leaves out the refiners and the modulation); with network.modulation also each main block's adaLN
# modulation.
ZIMAGE_BLOCK = re.compile(r"^layers\.\d+\.(attention\.(to_q|to_k|to_v|to_out\.0)|feed_forward\.(w1|w2|w3))$")
ZIMAGE_MODULATION = re.compile(r"^layers\.\d+\.adaLN_modulation\.0$")

# FLUX.2 [klein]'s transformer: a double-stream block's attention and MLP projections, a single-stream block's
# fused input (q, k, v and the MLP's input) and output; with network.modulation also the modulation layers every
# double-stream block (image and text streams) and every single-stream block share.
FLUX2_DOUBLE = re.compile(r"^transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|"
                          r"add_v_proj|to_add_out)|ff\.(linear_in|linear_out)|ff_context\.(linear_in|linear_out))$")
FLUX2_SINGLE = re.compile(r"^single_transformer_blocks\.\d+\.attn\.(to_qkv_mlp_proj|to_out)$")
FLUX2_MODULATION = re.compile(r"^(double_stream_modulation_(img|txt)|single_stream_modulation)\.linear$")


def _is_3x3(module: torch.nn.Module) -> bool:
    return isinstance(module, torch.nn.Conv2d) and module.kernel_size != (1, 1)


def _base_modules(model: torch.nn.Module):
    """(name, layer) of the model's own layers; an adapted one is seen as the layer it wraps."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    inside = None
    for name, module in model.named_modules():
        if inside is not None and name.startswith(inside):
            continue  # the adapter's own layers and the wrapped base layer
        if isinstance(module, BaseTunerLayer):
            inside = name + "."
            module = module.get_base_layer()
        yield name, module


def target_modules(model: torch.nn.Module, component: str, network: Network) -> dict[str, bool]:
    """The adapted modules' names, each with whether it is a 3x3 convolution (adapted at conv_rank)."""
    from .qwen_image import unused_modules

    found, modulation = {}, False
    unused = tuple(unused_modules(model))
    for name, module in _base_modules(model):
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) or name.startswith(unused):
            continue
        if component in TEXT_ENCODERS:
            if TEXT_PROJECTIONS.search(name):
                found[name] = False
        elif UNET_TRANSFORMER.search(name) and not _is_3x3(module):
            found[name] = False
        elif any(p.search(name) for p in (FLUX_DOUBLE, FLUX_SINGLE, ZIMAGE_BLOCK, QWEN_IMAGE_BLOCK, FLUX2_DOUBLE,
                                          FLUX2_SINGLE)):
            found[name] = False
        elif any(p.search(name) for p in (FLUX_MODULATION, ZIMAGE_MODULATION, QWEN_IMAGE_MODULATION,
                                          FLUX2_MODULATION)):
            modulation = True
            if network.modulation:
                found[name] = False
        elif network.conv_rank and UNET_CONV_BLOCKS.search(name):
            found[name] = _is_3x3(module)
    if network.modulation and component not in TEXT_ENCODERS and not modulation:
        raise UserError("config key 'network.modulation': only the Flux, Qwen-Image and Z-Image transformers have "
                        "modulation layers to adapt; set it to false for this model")
    return found


def peft_config(model: torch.nn.Module, component: str, network: Network):
    """The peft config of the network type over the model's target modules."""
    from peft import LoHaConfig, LoKrConfig, LoraConfig

    targets = target_modules(model, component, network)
    convs = [name for name, is_conv in targets.items() if is_conv]
    common = dict(r=network.rank, target_modules=sorted(targets),
                  rank_pattern={re.escape(name): network.conv_rank for name in convs},
                  alpha_pattern={re.escape(name): network.conv_alpha for name in convs})
    if network.type in ("lora", "dora"):
        return LoraConfig(lora_alpha=network.alpha, lora_dropout=network.dropout,
                          use_dora=network.type == "dora", init_lora_weights=True, **common)
    if network.type == "loha":
        return LoHaConfig(alpha=network.alpha, module_dropout=network.dropout, **common)
    return LoKrConfig(alpha=network.alpha, module_dropout=network.dropout, **common)


def add_adapter(model: torch.nn.Module, component: str, network: Network, seed: int) -> None:
    """Freeze the model and insert the network's adapter layers (in fp32, whatever the base dtype)."""
    from peft import inject_adapter_in_model

    model.requires_grad_(False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # the adapter's initial weights, the same on every rank and every run
        inject_adapter_in_model(peft_config(model, component, network), model)
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()  # peft gives them the base layer's dtype


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under peft's names, without the adapter name ("default")."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model).items()}


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor], key: str) -> None:
    """Put adapter weights into the model's adapter layers; refuses weights of another shape or module."""
    from peft import set_peft_model_state_dict

    own = adapter_state(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        detail = (f"{len(wrong)} of another shape (another rank or architecture), e.g. {wrong[0]}" if wrong else
                  f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing or unexpected)[0]}")
        raise UserError(f"config key '{key}': the adapter does not fit this model and network: {detail}")
    result = set_peft_model_state_dict(model, state)
    if getattr(result, "unexpected_keys", None):
        raise UserError(f"config key '{key}': unexpected adapter weights {result.unexpected_keys[:3]}")


def merge_adapter(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its adapter folded into the base weights and the adapter layers removed. A base
    stored in fewer bytes (base_dtype) is first dequantized into plain fp32 layers: the adapter is merged into
    the weights it trained over."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    from ..base_weights import dequantize_stored

    dequantize_stored(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    return model


def has_adapter(model: Optional[torch.nn.Module]) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return model is not None and any(isinstance(m, BaseTunerLayer) for m in model.modules())


ADAPTER_FILE = "adapter_model.safetensors"  # peft's name for an adapter's weights in a folder


class AdapterWeights:
    """An adapted model as a checkpoint stores it: only the adapter's weights, under peft's names."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    def save_pretrained(self, folder) -> None:
        from pathlib import Path

        from safetensors.torch import save_file

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_file(adapter_state(self.model), str(Path(folder) / ADAPTER_FILE))


def load_adapter_folder(model: torch.nn.Module, folder, key: str) -> None:
    from pathlib import Path

    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_FILE
    if not path.is_file():
        raise UserError(f"{key}: {folder} holds no adapter weights ({ADAPTER_FILE})")
    load_adapter_state(model, load_file(str(path)), key)
