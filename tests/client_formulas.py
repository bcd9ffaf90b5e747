"""The weights UIs compute from a kohya/LyCORIS adapter file, transcribed from their source: only the arithmetic
and the tensor names each reads, without the plumbing (device casts, the `function` hook, padding, Tucker
factors), at strength 1 and in fp32. Tests judge the engine's files by these, never by the engine's own
statement of the formulas. The last functions are how ComfyUI writes and reads its fp8-scaled weights.

Each function names the file, function and commit it was read from, in comfyanonymous/ComfyUI. A function
returns the patched weight and the file's keys it read for the module; ComfyUI logs any other key of the file as
"lora key not loaded" and ignores it.
"""
import json

import torch


def comfyui_weight_decompose(dora_scale, weight, lora_diff, alpha):
    """comfy/weight_adapter/base.py, weight_decompose, at 9c0cf36cd7964978850fd40f8cf76ac2cf9f9e15: a
    dora_scale whose first axis has the weight's output size is read as a per-output-channel magnitude and
    divided by the norm of the base weight, not of the updated one; otherwise per input channel of the updated
    weight. lllyasviel/stable-diffusion-webui-forge has the same arithmetic (backend/patcher/lora.py,
    weight_decompose, read at dfdcbab685e57677014f05a3309b48cc87383167, since 0ced1d0c)."""
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    wd_on_output_axis = dora_scale.shape[0] == weight_calc.shape[0]
    if wd_on_output_axis:
        weight_norm = (weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
                       .reshape(weight.shape[0], *[1] * (weight.dim() - 1)))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / weight_norm)


def _common(lora, x):
    """comfy/lora.py, load_lora, at 41444b5236c613ee5ff7d09aa620f94b702f30eb: `{x}.alpha` as a number and
    `{x}.dora_scale`, read for every module before its adapter."""
    loaded = set()
    alpha = dora_scale = None
    if f"{x}.alpha" in lora:
        alpha = lora[f"{x}.alpha"].item()
        loaded.add(f"{x}.alpha")
    if f"{x}.dora_scale" in lora:
        dora_scale = lora[f"{x}.dora_scale"].float()
        loaded.add(f"{x}.dora_scale")
    return alpha, dora_scale, loaded


def _apply(weight, lora_diff, alpha, dora_scale):
    # each adapter's calculate_weight ends so: weight_decompose with a dora_scale, else weight + alpha · diff
    if dora_scale is not None:
        return comfyui_weight_decompose(dora_scale, weight, lora_diff, alpha)
    return weight + alpha * lora_diff


def comfyui_lora(lora, x, weight):
    """comfy/weight_adapter/lora.py, LoRAAdapter.load and calculate_weight, at
    6fd406fb14ca663225b88c6f75d7a7f2b997e5a0: up and down flattened to matrices, their product reshaped to the
    weight's shape (a convolution's too), scaled by alpha over down's rank, or by 1 without alpha."""
    alpha, dora_scale, loaded = _common(lora, x)
    mat1, mat2 = lora[f"{x}.lora_up.weight"].float(), lora[f"{x}.lora_down.weight"].float()
    loaded |= {f"{x}.lora_up.weight", f"{x}.lora_down.weight"}
    alpha = alpha / mat2.shape[0] if alpha is not None else 1.0
    lora_diff = torch.mm(mat1.flatten(start_dim=1), mat2.flatten(start_dim=1)).reshape(weight.shape)
    return _apply(weight, lora_diff, alpha, dora_scale), loaded


def comfyui_loha(lora, x, weight):
    """comfy/weight_adapter/loha.py, LoHaAdapter.load and calculate_weight, at
    183b377588102d00131247aec399f8b34e1122b4: the Hadamard product of two low-rank products, scaled by alpha
    over the rank of the first (hada_w1_b's rows)."""
    alpha, dora_scale, loaded = _common(lora, x)
    w1a, w1b, w2a, w2b = (lora[f"{x}.hada_{name}"].float() for name in ("w1_a", "w1_b", "w2_a", "w2_b"))
    loaded |= {f"{x}.hada_{name}" for name in ("w1_a", "w1_b", "w2_a", "w2_b")}
    alpha = alpha / w1b.shape[0] if alpha is not None else 1.0
    lora_diff = (torch.mm(w1a, w1b) * torch.mm(w2a, w2b)).reshape(weight.shape)
    return _apply(weight, lora_diff, alpha, dora_scale), loaded


def comfyui_lokr(lora, x, weight):
    """comfy/weight_adapter/lokr.py, LoKrAdapter.load and calculate_weight, at
    e8f3bc5ab766ba0149ac8ba8f67c328f8bb3da7d: the Kronecker product of two factors, each stored whole
    (lokr_w1) or as a low-rank product (lokr_w1_a @ lokr_w1_b); scaled by alpha over the rank of the last
    low-rank factor, and not at all when both are whole."""
    alpha, dora_scale, loaded = _common(lora, x)
    names = ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b")
    v = {name: lora[f"{x}.lokr_{name}"].float() if f"{x}.lokr_{name}" in lora else None for name in names}
    loaded |= {f"{x}.lokr_{name}" for name in names if v[name] is not None}
    dim = None
    w1, w2 = v["w1"], v["w2"]
    if w1 is None:
        dim = v["w1_b"].shape[0]
        w1 = torch.mm(v["w1_a"], v["w1_b"])
    if w2 is None:
        dim = v["w2_b"].shape[0]
        w2 = torch.mm(v["w2_a"], v["w2_b"])
    if len(w2.shape) == 4:
        w1 = w1.unsqueeze(2).unsqueeze(2)
    alpha = alpha / dim if alpha is not None and dim is not None else 1.0
    lora_diff = torch.kron(w1, w2).reshape(weight.shape)
    return _apply(weight, lora_diff, alpha, dora_scale), loaded


def comfyui_weight(lora, x, weight):
    """The module's weight as ComfyUI patches it, by the first adapter whose keys the file has, in the order
    of the adapters list in comfy/weight_adapter/__init__.py at dc05edb5b27f0abbec88cd3994c2be8838a82059
    (LoRA, LoHa, LoKr first)."""
    if f"{x}.lora_up.weight" in lora:
        return comfyui_lora(lora, x, weight)
    if f"{x}.hada_w1_a" in lora:
        return comfyui_loha(lora, x, weight)
    return comfyui_lokr(lora, x, weight)


def comfyui_flux_lora_keys(original_keys, depth, depth_single_blocks, hidden_size):
    """The adapter-file module names ComfyUI maps for a Flux model whose original-layout state dict (without
    `diffusion_model.`) has original_keys, each to its target: a weight key of the model, or (key, (axis,
    offset, size)) for a slice of a fused weight, or (key, None, fn) for one stored transformed.

    comfy/lora.py, model_lora_keys_unet, at 41444b5236c613ee5ff7d09aa620f94b702f30eb: `lora_unet_` plus every
    `.weight` key's module path with dots as underscores; for Flux, each diffusers `.weight` key of
    flux_to_diffusers as `transformer.<path>`, `lycoris_<path_>` and `lora_transformer_<path_>`.
    comfy/utils.py, flux_to_diffusers, in Comfy-Org/ComfyUI at b3be02d6e766a8d3743dcf99cc967118f3ec8e3e (the
    weight keys only): q, k, v of a double block's image and text attention are slices of `img_attn.qkv` and
    `txt_attn.qkv`, hidden_size rows each; a single block's q, k, v and proj_mlp slices of `linear1` (the MLP
    4 x hidden_size rows); `norm_out.linear` is `final_layer.adaLN_modulation.1` with its halves swapped.
    lllyasviel/stable-diffusion-webui-forge builds the same Flux map (packages_3rdparty/comfyui_lora_collection/
    lora.py, model_lora_keys_unet, at 5e1dcd35a8535564884a4116f6bbb37dbb8dfc46) and patches a slice as ComfyUI
    does (backend/patcher/lora.py, merge_lora_to_weight, at cea9f37fa5fd5b4c372b95bd46635f4241f60d26)."""
    key_map = {}
    for key in original_keys:
        if key.endswith(".weight"):
            key_map["lora_unet_" + key[:-len(".weight")].replace(".", "_")] = "diffusion_model." + key

    def swap_scale_shift(weight):
        shift, scale = weight.chunk(2, dim=0)
        return torch.cat([scale, shift], dim=0)

    out = "diffusion_model."
    diffusers = {}
    for i in range(depth):
        source, target = f"transformer_blocks.{i}.", f"{out}double_blocks.{i}."
        for stream, names in (("img", ("to_q", "to_k", "to_v")), ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"))):
            for n, name in enumerate(names):
                diffusers[f"{source}attn.{name}.weight"] = (f"{target}{stream}_attn.qkv.weight",
                                                           (0, n * hidden_size, hidden_size))
        for name, original in (("attn.to_out.0", "img_attn.proj"), ("norm1.linear", "img_mod.lin"),
                               ("norm1_context.linear", "txt_mod.lin"), ("attn.to_add_out", "txt_attn.proj"),
                               ("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                               ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
            diffusers[f"{source}{name}.weight"] = f"{target}{original}.weight"
    for i in range(depth_single_blocks):
        source, target = f"single_transformer_blocks.{i}.", f"{out}single_blocks.{i}."
        for n, name in enumerate(("attn.to_q", "attn.to_k", "attn.to_v")):
            diffusers[f"{source}{name}.weight"] = (f"{target}linear1.weight", (0, n * hidden_size, hidden_size))
        diffusers[f"{source}proj_mlp.weight"] = (f"{target}linear1.weight", (0, 3 * hidden_size, 4 * hidden_size))
        for name, original in (("norm.linear", "modulation.lin"), ("proj_out", "linear2")):
            diffusers[f"{source}{name}.weight"] = f"{target}{original}.weight"
    for name, original in (("proj_out", "final_layer.linear"), ("x_embedder", "img_in"),
                           ("context_embedder", "txt_in"),
                           ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer"),
                           ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer"),
                           ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer"),
                           ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer"),
                           ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer"),
                           ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer")):
        diffusers[f"{name}.weight"] = f"{out}{original}.weight"
    diffusers["norm_out.linear.weight"] = (f"{out}final_layer.adaLN_modulation.1.weight", None, swap_scale_shift)
    for key, target in diffusers.items():
        path = key[:-len(".weight")]
        key_map["transformer." + path] = target
        key_map["lycoris_" + path.replace(".", "_")] = target
        key_map["lora_transformer_" + path.replace(".", "_")] = target
    return key_map


def comfyui_zimage_lora_keys(n_layers, dim, n_refiner_layers):
    """The adapter-file module names ComfyUI maps for a Z-Image model (its Lumina2 class, the NextDiT layout), each
    to its target: a weight key of the model, or (key, (axis, offset, size)) for a slice of a fused weight.

    comfy/lora.py, model_lora_keys_unet, in Comfy-Org/ComfyUI at ec93dcacb96b922f7cb1417b3ba22bccb082df32:
    `lora_unet_` plus every `.weight` key's module path with dots as underscores, and that path behind
    `diffusion_model.`; for Lumina2, each diffusers `.weight` key of z_image_to_diffusers as
    `diffusion_model.<path>`, `transformer.<path>`, `lycoris_<path_>` and `<path>`.
    comfy/utils.py, z_image_to_diffusers, in Comfy-Org/ComfyUI at 09708eae709a992a5684bed3595ce4d07e705b4e (the
    weight keys of the blocks' linear layers, which adapters reach): q, k and v of a block's attention are
    slices of `attention.qkv`, dim rows each; `attention.to_out.0` is `attention.out`; the feed-forward's
    w1/w2/w3 and the adaLN modulation (main blocks and noise refiner) keep their names."""
    out = "diffusion_model."
    diffusers = {}

    def block(prefix, has_adaln):
        for n, name in enumerate(("to_q", "to_k", "to_v")):
            diffusers[f"{prefix}.attention.{name}.weight"] = (f"{out}{prefix}.attention.qkv.weight", (0, n * dim, dim))
        diffusers[f"{prefix}.attention.to_out.0.weight"] = f"{out}{prefix}.attention.out.weight"
        for name in ("feed_forward.w1", "feed_forward.w2", "feed_forward.w3") + (
                ("adaLN_modulation.0",) if has_adaln else ()):
            diffusers[f"{prefix}.{name}.weight"] = f"{out}{prefix}.{name}.weight"

    for i in range(n_layers):
        block(f"layers.{i}", True)
    for i in range(n_refiner_layers):
        block(f"context_refiner.{i}", False)  # ComfyUI's map names an adaLN here too, which the model lacks
        block(f"noise_refiner.{i}", True)
    key_map = {}
    for target in diffusers.values():
        key = target if isinstance(target, str) else target[0]
        path = key[len(out):-len(".weight")]
        key_map["lora_unet_" + path.replace(".", "_")] = key
        key_map[out + path] = key
    for key, target in diffusers.items():
        path = key[:-len(".weight")]
        for name in (out + path, "transformer." + path, "lycoris_" + path.replace(".", "_"), path):
            key_map[name] = target
    return key_map


def comfyui_chroma_lora_keys(original_keys, depth, depth_single_blocks, hidden_size):
    """The adapter-file module names ComfyUI maps for a Chroma model: Flux's (comfyui_flux_lora_keys) over
    Chroma's own original-layout keys. Comfy-Org/ComfyUI comfy/model_base.py at
    26adb81a01b879fb50094c11fce4076039b83dd5 declares `class Chroma(Flux)`, so model_lora_keys_unet's
    `isinstance(model, comfy.model_base.Flux)` branch maps it with flux_to_diffusers, whose depth,
    depth_single_blocks and hidden_size comfy/model_detection.py reads from a Chroma file as from a Flux one
    (the `distilled_guidance_layer.*` keys only set image_model to chroma). The map's modulation and guidance
    entries name weights Chroma does not have; no file of its blocks names them."""
    return comfyui_flux_lora_keys(original_keys, depth, depth_single_blocks, hidden_size)


def comfyui_qwen_image_lora_keys(model_keys):
    """The adapter-file module names ComfyUI maps for a Qwen-Image model whose state dict (without
    `diffusion_model.`) has model_keys, each to the weight key it patches.

    comfy/lora.py, model_lora_keys_unet, in Comfy-Org/ComfyUI at ec93dcacb96b922f7cb1417b3ba22bccb082df32: for
    every `diffusion_model.` key ending in `.weight`, `lora_unet_` plus its module path with dots as underscores,
    and the module path itself; for a QwenImage model also `transformer.<path>` and `lycoris_<path_>` (the
    `img_mlp.gate_up` split belongs to Qwen-Image 2.1, whose blocks have no `net`). ComfyUI's Qwen-Image module
    paths are diffusers' (comfy/ldm/qwen_image/model.py in comfyanonymous/ComfyUI at
    c708d0a433c2f93e97d6e149ccda313192ee4f1e: transformer_blocks.N.attn.to_q … to_add_out, img_mod.1,
    img_mlp.net.0.proj, img_mlp.net.2, txt_…, norm_out.linear, proj_out), so model_keys are the diffusers
    transformer's."""
    key_map = {}
    for key in model_keys:
        if key.endswith(".weight"):
            path = key[:-len(".weight")]
            target = "diffusion_model." + key
            for name in ("lora_unet_" + path.replace(".", "_"), path, "transformer." + path,
                         "lycoris_" + path.replace(".", "_")):
                key_map[name] = target
    return key_map


# -- fp8-scaled files: how ComfyUI writes and reads them ----------------------------------------------------------
def comfyui_fp8_quantize(tensor):
    """comfy/quant_ops.py, TensorCoreFP8Layout.quantize, in comfyanonymous/ComfyUI at
    0411153ac63b0983342bca73362a8f95e1da59ac, without a given scale: one scale for the whole tensor, its largest
    magnitude over float8_e4m3fn's largest (computed in the tensor's dtype, kept in fp32), and the tensor times the
    scale's reciprocal (in the tensor's dtype) cast to float8_e4m3fn, unclamped. Returns (float8 data, scale)."""
    fp8 = torch.float8_e4m3fn
    scale = (torch.amax(tensor.abs()) / torch.finfo(fp8).max).to(torch.float32)
    return (tensor * (1.0 / scale).to(tensor.dtype)).to(fp8, memory_format=torch.contiguous_format), scale


def comfyui_fp8_dequantize(data, scale, orig_dtype):
    """The same file's TensorCoreFP8Layout.dequantize: the float8 data cast to the compute dtype, times the scale."""
    return data.to(orig_dtype) * scale


def comfyui_quant_record(fmt: str):
    """A quantized layer's `<layer>.comfy_quant` tensor: the bytes of the JSON {"format": fmt}, uint8, as
    comfy/ops.py mixed_precision_ops' Linear.state_dict writes it beside `<layer>.weight` (the float8 data) and
    `<layer>.weight_scale` (comfyanonymous/ComfyUI at 003124c1f6ca4b93066c672cb3f247007c17a038), and
    comfy/utils.py convert_old_quants makes it from a metadata record."""
    return torch.tensor(list(json.dumps({"format": fmt}).encode("utf-8")), dtype=torch.uint8)


def comfyui_fp8_layers(state, metadata):
    """The quantized layers ComfyUI reads from a text-encoder file, {layer: (format, float8 data, scale)}.

    comfy/utils.py, convert_old_quants, in Comfy-Org/ComfyUI at 09708eae709a992a5684bed3595ce4d07e705b4e, which the
    text-encoder loader runs on each file with no prefix: with `_quantization_metadata` in the file's metadata, each
    of its "layers" records becomes that layer's `comfy_quant` tensor; else, with a `scaled_fp8` tensor (the first
    layout, whose marker comfy/sd1_clip.py puts at the root of a text encoder's keys as an empty tensor of the float8
    dtype, comfyanonymous/ComfyUI at b55c2247654476fbc744e572ba7a834fd9378745), the marker is dropped, each
    `<layer>.scale_weight` becomes `<layer>.weight_scale` with a float8_e4m3fn record, and each
    `<layer>.scale_input` becomes `<layer>.input_scale` unless it is 1. comfy/ops.py's mixed-precision Linear
    (003124c1f6ca4b93066c672cb3f247007c17a038) then reads a layer with a record as its weight and `weight_scale`."""
    state = dict(state)
    records = {}
    if "_quantization_metadata" in metadata:
        records = json.loads(metadata["_quantization_metadata"])["layers"]
    elif "scaled_fp8" in state:
        del state["scaled_fp8"]
        for key in list(state):
            if key.endswith(".scale_weight"):
                layer = key[:-len(".scale_weight")]
                state[layer + ".weight_scale"] = state.pop(key)
                records[layer] = {"format": "float8_e4m3fn"}
            elif key.endswith(".scale_input"):
                scale = state.pop(key)
                if scale.item() != 1.0:
                    state[key[:-len(".scale_input")] + ".input_scale"] = scale
    for layer, record in records.items():
        state[layer + ".comfy_quant"] = comfyui_quant_record(record["format"])
    layers = {}
    for key in [key for key in state if key.endswith(".comfy_quant")]:
        layer = key[:-len(".comfy_quant")]
        layers[layer] = (json.loads(state[key].numpy().tobytes())["format"], state[layer + ".weight"],
                         state.get(layer + ".weight_scale"))
    return layers
