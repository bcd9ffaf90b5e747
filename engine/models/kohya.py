"""The kohya/LyCORIS adapter file: the layout ComfyUI, AUTOMATIC1111/Forge and diffusers load.

Each adapted module is named after its diffusers module path with dots as underscores, behind
`lora_unet_` or `lora_te_text_model_` (the text encoder's names as the original CLIPTextModel nested them,
which transformers 5 no longer does). SDXL's are named as kohya's SDXL trainer names them: the text
encoders behind `lora_te1_`/`lora_te2_`, the UNet's modules by their original-layout paths
(`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), since that trainer adapts its own copy of
the original UNet. Flux.1's transformer (and Chroma's, of the same blocks) is named as kohya's Flux trainer
names it, by Black Forest Labs' original modules (`lora_unet_double_blocks_0_img_attn_qkv`,
`lora_unet_single_blocks_0_linear1`), the diffusers modules that the original fuses (q/k/v; a single block's
q/k/v and MLP input) fused exactly (FLUX_FUSED); a type that cannot be fused (LoKr) keeps those modules apart,
each under its diffusers path behind `lora_transformer_` (OneTrainer's names), which ComfyUI maps to its slice
of the fused weight. FLUX.2 [klein]'s transformer is named by BFL's original modules the same way
(`keymap_flux2`: a double block's q/k/v fused into `img_attn.qkv`/`txt_attn.qkv`; a single block's fused input
is already one module), which ComfyUI's Flux.2 model and diffusers' Flux2 LoRA loader both read. Z-Image's
transformer is named by its diffusers module paths behind `diffusion_model.`, dots kept: ComfyUI maps those to
its own layout (q, k and v slices of its fused `qkv`) and diffusers' Z-Image loader reads them, where ComfyUI
maps no attention module's diffusers path behind `lora_unet_`.
Its tensors are `lora_down.weight`/`lora_up.weight` (LoRA, LoCon) plus `dora_scale`
(DoRA), `hada_w1_a`… (LoHa) or `lokr_w1`… (LoKr), and a scalar `alpha`: the UIs scale the update by
alpha / rank, as the trainer did. The `ss_*` metadata are kohya's, read by the UIs and model sites.

A DoRA layer's weight is m / ‖W + ΔW‖ · (W + ΔW): W the base weight, ΔW the low-rank update, m the trained
magnitude and ‖·‖ the norm of each output channel. ComfyUI (and Forge) apply a `dora_scale` d laid out on the
output axis as d / (‖W‖ + ε) · (W + ΔW) instead, dividing by the norm of the base weight plus the machine
epsilon of the dtype they patch in. The file holds d = m · (‖W‖ + ε) / ‖W + ΔW‖ with fp32's ε, so that they
compute the trained weight; reading a file back undoes it. AUTOMATIC1111 normalises DoRA per input channel of
W + ΔW, which no per-output-channel scale can match (DORA_NOTE).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Mapping

import torch

from .. import paths
from ..config import Config
from ..errors import UserError
from .adapters import adapter_state, load_adapter_state, target_modules
from .keymap_flux import module_map as flux_module_map
from .keymap_sdxl import is_sdxl_models, unet_module_names

ADAPTER_EXPORT = "adapter.safetensors"  # in each checkpoint of an adapter run
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
SDXL_PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
SDXL_VERSION = "sdxl_base_v1-0"  # ss_base_model_version of kohya's SDXL files
# ss_base_model_version of kohya's Flux.1 files (sd-scripts, library/flux_utils.py MODEL_VERSION_FLUX_V1)
FLUX_VERSION = "flux1"
# ss_base_model_version of a Z-Image adapter: kohya's musubi-tuner's name of the architecture
# (ARCHITECTURE_Z_IMAGE_FULL)
ZIMAGE_VERSION = "z_image"
ZIMAGE_PREFIXES = {"unet": "diffusion_model."}
CHROMA_VERSION = "chroma"  # and of its Chroma files (MODEL_VERSION_CHROMA there), laid out as Flux.1's
# Qwen-Image's name in musubi-tuner's files (its ARCHITECTURE_QWEN_IMAGE_FULL). Its modules are named as SD's,
# lora_unet_ and the diffusers path, since ComfyUI's Qwen-Image keys are diffusers' own
QWEN_IMAGE_VERSION = "qwen_image"
# ss_base_model_version of a FLUX.2 [klein] adapter: the family's name
FLUX2_KLEIN_VERSION = "flux2-klein"
FLUX_PREFIXES = {"text_encoder": "lora_te1_"}  # a Flux run's CLIP-L adapter, as kohya's Flux trainer names it
FLUX_PREFIX = "lora_unet_"  # an original-layout module of the transformer
FLUX_PART_PREFIX = "lora_transformer_"  # a diffusers module that the original layout fuses with others
# Adapter types whose update of fused modules is one adapter of the same type: the fused module's (rank, in)
# factors stacked, its (out, rank) factors block-diagonal, its alpha times the number of parts (alpha / rank
# unchanged), and DoRA's per-output-row scale concatenated. LoKr's Kronecker product has no such form.
FLUX_FUSED = ("lora", "dora", "loha")
_BLOCK_DIAGONAL = ("lora_B.weight", "hada_w1_a", "hada_w2_a")  # the (out, rank) factors; the others stack
_OUTPUT_ROWS = ("lora_magnitude_vector",)  # (out,) in peft, (out, 1) in the file
# peft's parameter names inside an adapted module -> kohya/LyCORIS names
PARAMETERS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
              "lora_magnitude_vector": "dora_scale"}
NETWORK_MODULES = {"lora": "networks.lora", "dora": "networks.lora", "loha": "lycoris.kohya",
                   "lokr": "lycoris.kohya"}
ADAPTER = "default"  # the name peft gives the one adapter of each layer
NORM_EPS = torch.finfo(torch.float32).eps  # what ComfyUI adds to a norm it divides by, computing in fp32
# Where a DoRA file does not give the trained weights: in its metadata, the converter's warnings and the README.
DORA_NOTE = ("AUTOMATIC1111 (and ComfyUI or Forge versions without output-axis DoRA) rescales DoRA per input "
             "channel and cannot give this file's trained weights: there, load the merged model that "
             "`python -m engine convert --merge` writes.")


def is_flux(model: torch.nn.Module) -> bool:
    """A transformer of Flux's blocks, named by BFL's original modules in the file: Flux.1's own, Chroma's
    (named alike) or FLUX.2's."""
    from diffusers import ChromaTransformer2DModel, Flux2Transformer2DModel, FluxTransformer2DModel

    return isinstance(model, (FluxTransformer2DModel, ChromaTransformer2DModel, Flux2Transformer2DModel))


def _original_layout(model: torch.nn.Module):
    from diffusers import Flux2Transformer2DModel

    from . import keymap_flux, keymap_flux2

    return keymap_flux2.LAYOUT if isinstance(model, Flux2Transformer2DModel) else keymap_flux.FLUX1


def is_zimage(model: torch.nn.Module) -> bool:
    from diffusers import ZImageTransformer2DModel

    return isinstance(model, ZImageTransformer2DModel)


def is_qwen_image(model: torch.nn.Module) -> bool:
    from diffusers import QwenImageTransformer2DModel

    return isinstance(model, QwenImageTransformer2DModel)


def prefixes(models: Mapping[str, torch.nn.Module]) -> dict[str, str]:
    """Each component's name prefix in the file of these models (SD's, SDXL's, Z-Image's or, for the text
    encoder, a Flux run's)."""
    if any(is_flux(model) for model in models.values()):
        return FLUX_PREFIXES
    if any(is_zimage(model) for model in models.values()):
        return ZIMAGE_PREFIXES
    return SDXL_PREFIXES if is_sdxl_models(models) else PREFIXES


def component_prefixes(models: Mapping[str, torch.nn.Module], component: str) -> tuple[str, ...]:
    """The name prefixes of models[component]'s modules in the file (a Flux transformer's are two)."""
    if is_flux(models[component]):
        return FLUX_PREFIX, FLUX_PART_PREFIX
    return (prefixes(models)[component],)


def kohya_module_name(component: str, module: str, prefix: str = "") -> str:
    """A module's name from its diffusers path (prefix: the component's, SD's by default)."""
    if component != "unet":
        module = "text_model." + module.removeprefix("text_model.")
    return (prefix or PREFIXES[component]) + module.replace(".", "_")


def module_names(models: Mapping[str, torch.nn.Module], component: str, modules) -> dict[str, str]:
    """The file's name of each of models[component]'s adapted modules."""
    prefix = prefixes(models)[component]
    if is_zimage(models[component]):
        return {module: prefix + module for module in modules}
    if component == "unet" and is_sdxl_models(models):
        original = unet_module_names(models["unet"].config, modules)
        return {module: prefix + original[module].replace(".", "_") for module in modules}
    return {module: kohya_module_name(component, module, prefix) for module in modules}


def _file_key_parts(file_key: str) -> tuple[str, str]:
    """A file key -> (module name, tensor name). The tensor names hold no dot but LoRA's two factors; a module
    name may (Z-Image's)."""
    for factor in ("lora_down.weight", "lora_up.weight"):
        if file_key.endswith("." + factor):
            return file_key[:-len(factor) - 1], factor
    name, _, parameter = file_key.rpartition(".")
    return name, parameter


def _split(key: str, modules: Mapping[str, str]) -> tuple[str, str]:
    """A peft state key -> (module path, parameter name inside the adapter)."""
    for module in sorted(modules, key=len, reverse=True):
        if key.startswith(module + "."):
            return module, key[len(module) + 1:]
    raise UserError(f"adapter weight {key} belongs to no adapted module")


def _channel_norms(weight: torch.Tensor) -> torch.Tensor:
    """The norm of each output channel (over all the other axes), shaped (out, 1, …) to broadcast over it."""
    return weight.flatten(1).norm(dim=1).reshape(weight.shape[0], *([1] * (weight.dim() - 1)))


@torch.no_grad()
def _dora_file_ratio(layer: torch.nn.Module) -> torch.Tensor:
    """(‖W‖ + ε) / ‖W + ΔW‖ per output channel of a DoRA layer: its file's dora_scale over its magnitude."""
    base = layer.get_base_layer().weight.float()
    updated = base + layer.get_delta_weight(ADAPTER).float().to(base.device)
    return (_channel_norms(base) + NORM_EPS) / _channel_norms(updated)


def _dora_scale(magnitude: torch.Tensor, layer: torch.nn.Module) -> torch.Tensor:
    """The file's dora_scale of a DoRA layer's trained magnitude: shaped to broadcast over the weight, as
    kohya/LyCORIS store it, and times _dora_file_ratio."""
    ratio = _dora_file_ratio(layer).to(magnitude.device)
    return magnitude.reshape(ratio.shape) * ratio


def _magnitude_from_file(layer: torch.nn.Module) -> None:
    """Turn the dora_scale loaded into a DoRA layer back into peft's magnitude (the inverse of _dora_scale)."""
    magnitude = layer.lora_magnitude_vector[ADAPTER].weight
    ratio = _dora_file_ratio(layer).to(magnitude.device)
    with torch.no_grad():
        magnitude.copy_((magnitude.reshape(ratio.shape) / ratio).reshape(magnitude.shape))


def _bake_lokr_scale(state: dict, name: str, trained_scale: float, inverse: bool = False) -> None:
    """peft scales a LoKr update by alpha / rank always; the UIs only when a factor is a low-rank product
    (by alpha over that product's rank), else not at all. The difference goes into the second factor
    (and comes out again, inverse, when a file is read back)."""
    low = state.get(f"{name}.lokr_w2_b", state.get(f"{name}.lokr_w1_b"))
    read_scale = float(state[f"{name}.alpha"]) / low.shape[0] if low is not None else 1.0
    factor = f"{name}.lokr_w2" if f"{name}.lokr_w2" in state else f"{name}.lokr_w2_a"
    ratio = trained_scale / read_scale
    state[factor] = state[factor] / ratio if inverse else state[factor] * ratio


def _adapted(model: torch.nn.Module) -> list[str]:
    """The names of the model's adapted modules (its peft layers)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]


def flux_layout(model: torch.nn.Module, network_type: str) -> dict[str, tuple[str, ...]]:
    """The file's module names of an adapted Flux transformer, each with the diffusers modules it holds
    (several when fused)."""
    adapted = _adapted(model)
    places = flux_module_map(model.state_dict().keys(), _original_layout(model))
    layout: dict[str, tuple[str, ...]] = {}
    for module in adapted:
        if module not in places:
            raise UserError(f"the adapted module {module} has no place in Flux's original layout")
        original, group = places[module]
        if len(group) == 1:
            layout[FLUX_PREFIX + original.replace(".", "_")] = group
        elif network_type in FLUX_FUSED and set(group) <= set(adapted):
            layout[FLUX_PREFIX + original.replace(".", "_")] = group
        else:
            layout[FLUX_PART_PREFIX + module.replace(".", "_")] = (module,)
    return layout


def _flux_to_kohya(model: torch.nn.Module, network) -> dict[str, torch.Tensor]:
    """An adapted Flux transformer's tensors in the file's layout (flux_layout)."""
    modules = {name: None for name in _adapted(model)}
    per_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in adapter_state(model).items():
        module, parameter = _split(key, modules)
        if parameter == "lora_magnitude_vector":
            tensor = _dora_scale(tensor, model.get_submodule(module))
        per_module.setdefault(module, {})[parameter] = tensor.float()
    out: dict[str, torch.Tensor] = {}
    for name, group in flux_layout(model, network.type).items():
        for parameter in per_module[group[0]]:
            parts = [per_module[module][parameter] for module in group]
            tensor = torch.block_diag(*parts) if parameter in _BLOCK_DIAGONAL else torch.cat(parts, dim=0)
            out[f"{name}.{PARAMETERS.get(parameter, parameter)}"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(network.alpha * len(group)))
        if network.type == "lokr":
            _bake_lokr_scale(out, name, network.alpha / network.rank)
    return out


def _flux_from_kohya(state: Mapping[str, torch.Tensor], model: torch.nn.Module, network,
                     key: str) -> dict[str, torch.Tensor]:
    """The peft weights of a Flux transformer's adapter from the file's (the inverse of _flux_to_kohya). A
    fused module whose update is not block-diagonal (trained fused, as kohya's trainer does) is refused:
    it has no exact split into this network's modules."""
    renamed = {kohya: peft for peft, kohya in PARAMETERS.items()}
    shapes = {k: v.shape for k, v in adapter_state(model).items()}
    layout = flux_layout(model, network.type)
    if network.type == "lokr":
        state = dict(state)
        for name in layout:
            if f"{name}.alpha" in state:
                _bake_lokr_scale(state, name, float(state[f"{name}.alpha"]) / network.rank, inverse=True)
    own: dict[str, torch.Tensor] = {}
    for file_key, tensor in state.items():
        name, _, parameter = file_key.partition(".")
        if not name.startswith((FLUX_PREFIX, FLUX_PART_PREFIX)) or parameter == "alpha":
            continue
        if name not in layout:
            raise UserError(f"config key '{key}': {file_key} names no module of this model (another "
                            "architecture, or modules this network does not adapt)")
        group = layout[name]
        alpha, wanted = state.get(f"{name}.alpha"), network.alpha * len(group)
        if alpha is not None and float(alpha) != float(wanted):
            fused = f" times its {len(group)} fused parts" if len(group) > 1 else ""
            raise UserError(f"config key '{key}': {name} was trained with alpha {float(alpha):g}, this network "
                            f"has {wanted:g} (network.alpha{fused})")
        parameter = renamed.get(parameter, parameter)
        own_shapes = [shapes.get(f"{module}.{parameter}") for module in group]
        if None in own_shapes:  # not a weight of this network: load_adapter_state names it
            own[f"{group[0]}.{parameter}"] = tensor
            continue
        rows = [shape[0] for shape in own_shapes]
        if sum(rows) != tensor.shape[0]:
            raise UserError(f"config key '{key}': {file_key} has {tensor.shape[0]} rows, this network's "
                            f"{len(group)} fused parts {sum(rows)} (another rank or architecture)")
        pieces = list(tensor.split(rows, dim=0))
        if parameter in _BLOCK_DIAGONAL:
            ranks = [shape[1] for shape in own_shapes]
            blocks = [piece.split(ranks, dim=1) for piece in pieces]
            if any(blocks[i][j].any() for i in range(len(group)) for j in range(len(group)) if i != j):
                raise UserError(f"config key '{key}': {name} was trained as one fused module and cannot be "
                                "split into this network's separate modules")
            pieces = [blocks[i][i] for i in range(len(group))]
        for module, piece, shape in zip(group, pieces, own_shapes):
            own[f"{module}.{parameter}"] = piece.reshape(shape) if parameter in _OUTPUT_ROWS else piece
    return own


def to_kohya(models: Mapping[str, torch.nn.Module], config: Config) -> dict[str, torch.Tensor]:
    """The adapters of models ({"unet": …, "text_encoder": …}) in the kohya/LyCORIS layout."""
    network = config.network
    out: dict[str, torch.Tensor] = {}
    for component, model in models.items():
        if is_flux(model):
            out.update(_flux_to_kohya(model, network))
            continue
        targets = target_modules(model, component, network)
        names = module_names(models, component, targets)
        for key, tensor in adapter_state(model).items():
            module, parameter = _split(key, targets)
            name = names[module]
            if parameter == "lora_magnitude_vector":
                tensor = _dora_scale(tensor, model.get_submodule(module))
            out[f"{name}.{PARAMETERS.get(parameter, parameter)}"] = tensor.float().contiguous()
        for module, is_conv in targets.items():
            alpha = network.conv_alpha if is_conv else network.alpha
            name = names[module]
            out[f"{name}.alpha"] = torch.tensor(float(alpha))
            if network.type == "lokr":
                _bake_lokr_scale(out, name, alpha / (network.conv_rank if is_conv else network.rank))
    return out


def read_file(location: str, key: str) -> dict[str, torch.Tensor]:
    """The tensors of the adapter file config key `key` names. A path that is no .safetensors file (a folder,
    a .ckpt, a file cut short) is refused naming the key, not left to fail inside safetensors."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = paths.existing_file(location, key)
    try:
        return load_file(str(path))
    except SafetensorError as error:
        raise UserError(f"config key '{key}': {path} is not a .safetensors adapter file ({error})") from None


def from_kohya(state: Mapping[str, torch.Tensor], models: Mapping[str, torch.nn.Module], config: Config,
               key: str) -> None:
    """Load a kohya/LyCORIS file's adapter weights into the models' adapters (training goes on from them): the
    adapter that gives the weights ComfyUI computes from the file."""
    network = config.network
    renamed = {kohya: peft for peft, kohya in PARAMETERS.items()}
    state = dict(state)
    for component, model in models.items():
        if is_flux(model):
            load_adapter_state(model, _flux_from_kohya(state, model, network, key), key)
            if network.type == "dora":
                for module in _adapted(model):
                    _magnitude_from_file(model.get_submodule(module))
            continue
        targets = target_modules(model, component, network)
        by_name = {name: module for module, name in module_names(models, component, targets).items()}
        prefix = prefixes(models)[component]
        shapes = {key: tensor.shape for key, tensor in adapter_state(model).items()}
        if network.type == "lokr":
            for name, module in by_name.items():
                if f"{name}.alpha" in state:
                    rank = network.conv_rank if targets[module] else network.rank
                    _bake_lokr_scale(state, name, float(state[f"{name}.alpha"]) / rank, inverse=True)
        own: dict[str, torch.Tensor] = {}
        for file_key, tensor in state.items():
            name, parameter = _file_key_parts(file_key)
            if not name.startswith(prefix) or parameter == "alpha":
                continue
            if name not in by_name:
                raise UserError(f"config key '{key}': {file_key} names no module of this model (another "
                                "architecture, or modules this network does not adapt)")
            key_in_model = f"{by_name[name]}.{renamed.get(parameter, parameter)}"
            if parameter == "dora_scale" and key_in_model in shapes:
                tensor = tensor.reshape(shapes[key_in_model])  # back to peft's magnitude shape
            own[key_in_model] = tensor
            alpha = state.get(f"{name}.alpha")
            wanted = network.conv_alpha if targets[by_name[name]] else network.alpha
            if alpha is not None and float(alpha) != float(wanted):
                raise UserError(f"config key '{key}': {name} was trained with alpha {float(alpha):g}, this "
                                f"network has {wanted:g} (network.alpha / network.conv_alpha)")
        load_adapter_state(model, own, key)
        if network.type == "dora":
            for module in targets:  # the norms need the file's update, now in the layers
                _magnitude_from_file(model.get_submodule(module))


def base_model_version(config: Config, models: Mapping[str, torch.nn.Module]) -> str:
    from diffusers import ChromaTransformer2DModel, Flux2Transformer2DModel

    if isinstance(models.get("unet"), ChromaTransformer2DModel):
        return CHROMA_VERSION
    if isinstance(models.get("unet"), Flux2Transformer2DModel):
        return FLUX2_KLEIN_VERSION
    if any(is_flux(model) for model in models.values()):
        return FLUX_VERSION
    if any(is_zimage(model) for model in models.values()):
        return ZIMAGE_VERSION
    if is_sdxl_models(models):
        return SDXL_VERSION
    if any(is_qwen_image(model) for model in models.values()):
        return QWEN_IMAGE_VERSION
    width = models["unet"].config.cross_attention_dim
    return "sd_v2" if width == 1024 else "sd_v1"


def training_comment(network_type: str) -> str:
    """ss_training_comment, the comment the UIs and model sites show: the trainer, and for DoRA DORA_NOTE."""
    return f"SCAL-SDT. {DORA_NOTE}" if network_type == "dora" else "SCAL-SDT"


def metadata(config: Config, models: Mapping[str, torch.nn.Module], step: int, epoch: int,
             images: int) -> dict[str, str]:
    """kohya's training metadata, all strings (safetensors metadata are str -> str)."""
    network = config.network
    args = {"conv_dim": str(network.conv_rank), "conv_alpha": str(network.conv_alpha)} if network.conv_rank else {}
    if network.type in ("loha", "lokr"):
        args["algo"] = network.type
    if network.type == "dora":
        args["dora_wd"] = "True"
    trigger_words = {}
    for concept in config.data.concepts:
        words = [w for w in re.split(r"[,\s]+", concept.instance_set.prompt) if w and "{" not in w]
        folder = Path(concept.instance_set.path).name or concept.instance_set.path
        trigger_words[folder] = {word: 1 for word in words}
    version = base_model_version(config, models)
    return {
        "ss_network_module": NETWORK_MODULES[network.type], "ss_network_dim": str(network.rank),
        "ss_network_alpha": str(network.alpha), "ss_network_args": json.dumps(args),
        "ss_base_model_version": version, "ss_v2": str(version == "sd_v2"),
        "ss_sd_model_name": Path(config.model).name, "ss_resolution": f"({config.data.resolution}, "
                                                                      f"{config.data.resolution})",
        "ss_steps": str(step), "ss_epoch": str(epoch), "ss_num_train_images": str(images),
        "ss_tag_frequency": json.dumps(trigger_words), "ss_clip_skip": str(config.clip_stop_at_layer),
        "ss_text_encoder_lr": str(network.text_encoder_lr or config.optimizer.params.lr),
        "ss_unet_lr": str(config.optimizer.params.lr), "ss_training_comment": training_comment(network.type),
        # this trainer's own key: the storage of the base the adapter trained over (an nf4 base's rounding is
        # part of what the adapter learned)
        "ss_base_dtype": config.base_dtype,
    }


def save(path: Path, models: Mapping[str, torch.nn.Module], config: Config, step: int, epoch: int,
         images: int) -> Path:
    from safetensors.torch import save_file

    save_file(to_kohya(models, config), str(path), metadata=metadata(config, models, step, epoch, images))
    return path
