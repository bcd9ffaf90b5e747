"""ComfyUI's fp8-scaled text-encoder files (qwen_2.5_vl_7b_fp8_scaled, t5xxl_fp8_e4m3fn_scaled, qwen_3_4b_fp8_mixed)
made from the tiny models' encoders as ComfyUI's code quantizes and lays them out, and read by each family's file
reader as ComfyUI reads them: every quantized weight its float8 values times its scale."""
import json

import pytest
import torch

from client_formulas import comfyui_fp8_dequantize, comfyui_fp8_layers, comfyui_fp8_quantize, comfyui_quant_record
from engine.errors import UserError
from test_zimage_files import zimage_files  # noqa: F401 (the fixture)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# ComfyUI's layouts: "first" (a scaled_fp8 marker and `.scale_weight`s: qwen_2.5_vl_7b_fp8_scaled, t5xxl's), "mixed"
# (`.weight_scale`s and `.comfy_quant` records: qwen_3_4b_fp8_mixed) and the records in the file's metadata instead
LAYOUTS = ("first", "mixed", "metadata")
# the Linear layers an fp8-scaled text encoder holds in float8: Qwen's attention and MLP projections, T5's
QUANTIZED = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "q", "k", "v", "o", "wi_0",
             "wi_1", "wo")
# how far an encoder's last hidden states from the fp8 file may lie from those from the bf16 file it was made from
# (relative L2 distance; per-tensor float8_e4m3fn weights keep 3 mantissa bits)
TOLERANCE = 0.1


def save(path, tensors: dict, metadata: dict):
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata or None)
    return path


def read(path) -> tuple[dict, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata() or {}


def fp8_files(folder, source, layout: str):
    """source (a bf16 text-encoder file) as ComfyUI's fp8-scaled file in layout, each QUANTIZED weight quantized by
    ComfyUI's routine, the other tensors kept; and the reference: source with those weights as ComfyUI reads them
    back (dequantized into fp32), in a plain file. Both keep source's metadata."""
    tensors, metadata = read(source)
    written, records = {}, {}
    for key, value in tensors.items():
        layer, _, name = key.rpartition(".")
        if name != "weight" or layer.rpartition(".")[2] not in QUANTIZED or value.ndim != 2:
            written[key] = value
            continue
        written[key], scale = comfyui_fp8_quantize(value)
        if layout == "first":  # the scales of ComfyUI's scaled_fp8 ops: the weight's, and the input's (unit)
            written |= {layer + ".scale_weight": scale, layer + ".scale_input": torch.ones((), dtype=torch.float32)}
        else:
            written[layer + ".weight_scale"] = scale
            records[layer] = {"format": "float8_e4m3fn"}
    if layout == "first":
        written["scaled_fp8"] = torch.tensor([], dtype=torch.float8_e4m3fn)
    elif layout == "mixed":
        written |= {layer + ".comfy_quant": comfyui_quant_record(record["format"]) for layer, record in records.items()}
    else:
        metadata = {**metadata, "_quantization_metadata": json.dumps({"layers": records})}
    layers = comfyui_fp8_layers(written, metadata)
    assert layers and {fmt for fmt, _, _ in layers.values()} == {"float8_e4m3fn"}
    reference = {**tensors, **{layer + ".weight": comfyui_fp8_dequantize(data, scale, torch.float32)
                               for layer, (_, data, scale) in layers.items()}}
    kept = {key: value for key, value in metadata.items() if key != "_quantization_metadata"}
    return (save(folder / f"fp8_scaled_{layout}.safetensors", written, metadata),
            save(folder / f"reference_{layout}.safetensors", reference, kept))


def bf16_file(path, tensors: dict, metadata: dict = None):
    return save(path, {key: value.to(torch.bfloat16) for key, value in tensors.items()}, metadata)


def assert_read_as_comfyui(loaded, reference, fp8_output, bf16_output):
    """Every weight the reference file's (float8 values times scale, exactly), and the output near the bf16 file's."""
    want, got = reference.state_dict(), loaded.state_dict()
    assert got.keys() == want.keys()
    assert all(got[key].dtype == torch.float32 and torch.equal(got[key], want[key]) for key in want)
    distance = ((fp8_output - bf16_output).norm() / bf16_output.norm()).item()
    assert 0 < distance < TOLERANCE


@pytest.fixture(scope="module")
def qwen25_source(tmp_path_factory, demo_cache):
    """The tiny Qwen-Image's Qwen2.5-VL as ComfyUI's bf16 file, its config recorded."""
    from engine import paths
    from test_qwen_image_files import text_encoder_file

    folder = tmp_path_factory.mktemp("qwen25-fp8")
    full, _ = text_encoder_file(folder, paths.demo_model_dir("qwen-image") / "text_encoder", head=False)
    return bf16_file(folder / "qwen_2.5_vl_7b.safetensors", *read(full))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen25_vl_fp8_scaled_file_loads_as_comfyui_reads_it(qwen25_source, tmp_path, layout):
    from engine.models.qwen_image_files import load_text_encoder_file

    fp8, reference = fp8_files(tmp_path, qwen25_source, layout)
    loaded, bf16 = load_text_encoder_file(fp8), load_text_encoder_file(qwen25_source)
    ids = torch.randint(0, bf16.config.text_config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = [model(input_ids=ids, output_hidden_states=True).hidden_states[-1] for model in (loaded, bf16)]
    assert_read_as_comfyui(loaded, load_text_encoder_file(reference), *outputs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen3_fp8_mixed_file_loads_with_the_zimage_files_as_comfyui_reads_it(zimage_files, tmp_path,  # noqa: F811
                                                                            layout):
    from safetensors.torch import load_file

    from engine.models.zimage_files import load_zimage_files

    _, transformer, qwen_file, vae_file = zimage_files
    source = bf16_file(tmp_path / "qwen_3_4b.safetensors", load_file(str(qwen_file)))
    fp8, reference = fp8_files(tmp_path, source, layout)
    loaded, bf16, want = (load_zimage_files(transformer, text_encoder=file, vae=vae_file)["text_encoder"]
                          for file in (fp8, source, reference))
    ids = torch.randint(0, bf16.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = [model(input_ids=ids).last_hidden_state for model in (loaded, bf16)]
    assert_read_as_comfyui(loaded, want, *outputs)


def read_t5(file, key: str = "text_encoder_2"):
    """T5-XXL as load_flux_files reads a text_encoder_2 file (load_chroma_files, its text_encoder), fp32."""
    from types import SimpleNamespace

    from engine.models.single_file import _flux_t5, _read_tensors

    return _flux_t5(_read_tensors(file, "", key, torch.float32), SimpleNamespace(joint_attention_dim=32), file.name,
                    torch.float32, key)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_t5xxl_fp8_scaled_file_loads_as_comfyui_reads_it(tmp_path, layout):
    from test_flux_files import encoder_tensors, tiny_t5

    source = bf16_file(tmp_path / "t5xxl_fp16.safetensors", encoder_tensors(tiny_t5()))
    fp8, reference = fp8_files(tmp_path, source, layout)
    loaded, bf16 = read_t5(fp8), read_t5(source)
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = [model(input_ids=ids).last_hidden_state for model in (loaded, bf16)]
    assert_read_as_comfyui(loaded, read_t5(reference), *outputs)


@pytest.mark.parametrize("fmt", ["nvfp4", "int8_tensorwise"])
def test_a_layer_quantized_otherwise_is_refused_naming_the_key(qwen25_source, tmp_path, fmt):
    """ComfyUI's mixed layout holds other formats too (4-bit, int8); one layer of them refuses the file in one line."""
    from engine.models.qwen_image_files import load_text_encoder_file

    fp8, _ = fp8_files(tmp_path, qwen25_source, "mixed")
    tensors, metadata = read(fp8)
    layer = next(key for key in tensors if key.endswith(".comfy_quant"))
    other = save(tmp_path / "other.safetensors", {**tensors, layer: comfyui_quant_record(fmt)}, metadata)
    with pytest.raises(UserError, match=f"^config key 'text_encoder': other.safetensors holds "
                                        f"{layer.removesuffix('.comfy_quant')}.weight quantized as {fmt}, which this "
                                        "app does not read") as refused:
        load_text_encoder_file(other)
    assert "\n" not in str(refused.value)


def test_a_quantized_layer_without_its_scale_is_refused_naming_the_key(tmp_path):
    from test_flux_files import encoder_tensors, tiny_t5

    fp8, _ = fp8_files(tmp_path, bf16_file(tmp_path / "t5.safetensors", encoder_tensors(tiny_t5())), "mixed")
    tensors, metadata = read(fp8)
    scale = next(key for key in tensors if key.endswith(".weight_scale"))
    del tensors[scale]
    broken = save(tmp_path / "broken.safetensors", tensors, metadata)
    with pytest.raises(UserError, match=f"^config key 'text_encoder_2': broken.safetensors records "
                                        f"{scale.removesuffix('.weight_scale')} as float8_e4m3fn but holds no "
                                        f"{scale}$"):
        read_t5(broken)
