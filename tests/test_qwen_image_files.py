"""Qwen-Image as ComfyUI users keep it: the transformer's file (diffusion_models/), Qwen2.5-VL's
(text_encoders/qwen_2.5_vl_7b.safetensors) and the autoencoder's (vae/qwen_image_vae.safetensors), each file's
layout proven by the reader that loads it, and the three loaded for training."""
import json
import re

import pytest
import torch

from conftest import lora_checkpoint_over_files
from engine.errors import UserError

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The names ComfyUI gives Qwen2.5-VL-7B's parts (comfy/text_encoders/llama.py, Qwen25_7BVLI: the language model as
# `model`, the vision tower as `visual`), and the tensor its sd.py detect_te_model tells Qwen2.5 by.
COMFYUI_TEXT_ENCODER_PARTS = ("model.", "visual.")
COMFYUI_QWEN25_KEY = "model.layers.0.self_attn.k_proj.bias"
# comfy/sd.py tells Wan 2.1's autoencoder (Qwen-Image's) by this tensor, as diffusers' single_file_utils does
WAN_VAE_KEY = "decoder.middle.0.residual.0.gamma"
# diffusers' Wan converter reads an autoencoder of Wan's (and Qwen-Image's) real depth: two residual blocks a level
VAE = dict(base_dim=12, num_res_blocks=2)

_RESIDUAL = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
             "conv_shortcut": "shortcut"}
_TOP = {"quant_conv": "conv1", "post_quant_conv": "conv2", "encoder.conv_in": "encoder.conv1",
        "decoder.conv_in": "decoder.conv1", "encoder.norm_out": "encoder.head.0", "encoder.conv_out": "encoder.head.2",
        "decoder.norm_out": "decoder.head.0", "decoder.conv_out": "decoder.head.2"}
_MIDDLE = {"resnets.0": "0", "attentions.0": "1", "resnets.1": "2"}


def wan_key(key: str) -> str:
    """A Qwen-Image autoencoder's diffusers key in Wan's original layout: what diffusers' Wan converter
    (convert_wan_vae_to_diffusers) reads back to it, which the tests below check."""
    for diffusers_name, wan in _TOP.items():
        if key.startswith(diffusers_name + "."):
            return wan + key[len(diffusers_name):]
    part, rest = key.split(".", 1)
    match = re.match(r"mid_block\.(resnets\.\d|attentions\.\d)\.(.*)", rest)
    if match:
        head, tail = f"{part}.middle.{_MIDDLE[match[1]]}", match[2]
    elif (match := re.match(r"down_blocks\.(\d+)\.(.*)", rest)):
        head, tail = f"encoder.downsamples.{match[1]}", match[2]
    elif (match := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest)):
        head, tail = f"decoder.upsamples.{4 * int(match[1]) + int(match[2])}", match[3]
    else:
        match = re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.(.*)", rest)
        return f"decoder.upsamples.{4 * int(match[1]) + 3}.{match[2]}"
    for diffusers_name, wan in _RESIDUAL.items():
        if tail.startswith(diffusers_name + "."):
            tail = wan + tail[len(diffusers_name):]
    return f"{head}.{tail}"


def qwen_vae():
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(3)
    model = AutoencoderKLQwenImage(**VAE)
    with torch.no_grad():
        for parameter in model.parameters():  # no zero or unit initial values that would hide a misplaced tensor
            parameter.normal_(0, 0.2)
    return model.eval()


def save(path, tensors: dict, configs: dict = None):
    from safetensors.torch import save_file

    from engine.models.single_file import CONFIGS_KEY

    metadata = {CONFIGS_KEY: json.dumps({"files": configs})} if configs else None
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata=metadata)
    return path


def text_encoder_file(folder, source, head: bool):
    """The tiny Qwen2.5-VL saved by transformers (Qwen's release names) as one file, with or without its
    vocabulary head, recording its config (its sizes are no real model's)."""
    from safetensors.torch import load_file
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(source)
    model.save_pretrained(folder / "saved")
    tensors = load_file(folder / "saved" / "model.safetensors")
    if not head:
        tensors.pop("lm_head.weight")
    config = json.loads((folder / "saved" / "config.json").read_text())
    return save(folder / f"qwen_2.5_vl{'' if head else '-no-head'}.safetensors", tensors,
                {"text_encoder/config.json": config}), model


@pytest.fixture(scope="module")
def qwen_files(tmp_path_factory, demo_cache):
    from engine import paths
    from engine.models.convert import convert_checkpoint

    tiny = paths.demo_model_dir("qwen-image")
    folder = tmp_path_factory.mktemp("qwen-image-files")
    transformer = convert_checkpoint(tiny, folder / "qwen_image.safetensors")
    encoders = {head: text_encoder_file(folder, tiny / "text_encoder", head) for head in (True, False)}
    vae = qwen_vae()
    vae_file = save(folder / "qwen_image_vae.safetensors", {wan_key(k): v for k, v in vae.state_dict().items()})
    return tiny, transformer, encoders, (vae_file, vae)


def cfg_from(model, **values):
    from engine import config as cfg

    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, "data": {"resolution": 512},
                          **values})


def test_the_text_encoder_file_has_comfyuis_parts_and_transformers_reads_it_as_the_model(qwen_files):
    from engine.models.qwen_image_files import load_text_encoder_file
    from engine.models.single_file import read_shapes

    _, _, encoders, _ = qwen_files
    for head, (file, model) in encoders.items():
        shapes = read_shapes(file)
        assert {key.split(".")[0] + "." for key in shapes} == set(COMFYUI_TEXT_ENCODER_PARTS) | (
            {"lm_head."} if head else set())
        assert COMFYUI_QWEN25_KEY in shapes
        loaded = load_text_encoder_file(file, torch.bfloat16)
        want, got = model.state_dict(), loaded.state_dict()
        assert got.keys() == want.keys()
        assert all(got[k].dtype == torch.bfloat16 and torch.equal(got[k], want[k].to(torch.bfloat16))
                   for k in want if head or k != "lm_head.weight")
        if not head:  # the head Qwen-Image never runs shares the embedding rather than being drawn at random
            assert loaded.lm_head.weight is loaded.model.language_model.embed_tokens.weight


def test_the_autoencoder_file_is_wans_layout_that_diffusers_single_file_loader_reads_bit_equal(qwen_files, tmp_path):
    from diffusers import AutoencoderKLWan

    from engine.models.qwen_image_files import load_vae_file
    from engine.models.single_file import read_shapes

    _, _, _, (vae_file, vae) = qwen_files
    assert WAN_VAE_KEY in read_shapes(vae_file)
    AutoencoderKLWan(**VAE).save_config(tmp_path / "configs" / "vae")
    read = AutoencoderKLWan.from_single_file(str(vae_file), config=str(tmp_path / "configs"), subfolder="vae",
                                             local_files_only=True)
    want = vae.state_dict()
    assert read.state_dict().keys() == want.keys()
    assert all(torch.equal(read.state_dict()[k], want[k]) for k in want)
    loaded = load_vae_file(vae_file).state_dict()
    assert loaded.keys() == want.keys() and all(torch.equal(loaded[k], want[k]) for k in want)


def test_the_three_files_load_for_training_as_the_models_written(qwen_files):
    from engine.models.family import family_for

    tiny, transformer, encoders, (vae_file, vae) = qwen_files
    text_file, text_model = encoders[True]
    config = cfg_from(transformer, text_encoder=str(text_file), vae=str(vae_file))
    family = family_for(config)
    assert family.name == "qwen-image"
    ours, folder = family.load(config), family.load(cfg_from(tiny))
    for got, want in ((ours.unet, folder.unet), (ours.text_encoder.text_encoder, text_model), (ours.vae.model, vae)):
        got, want = got.state_dict(), want.state_dict()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    ids = ours.tokenizer(["a photo of sks toy"], padding="max_length", return_tensors="pt").input_ids
    assert torch.equal(ids, folder.tokenizer(["a photo of sks toy"], padding="max_length",
                                             return_tensors="pt").input_ids)
    with torch.no_grad():  # the same conditioning as the diffusers folder's
        for got, want in zip(ours.text_encoder(ids), folder.text_encoder(ids)):
            assert torch.equal(got, want)


@pytest.mark.parametrize("missing", ["text_encoder", "vae"])
def test_a_transformer_file_without_a_part_is_refused_naming_its_key(qwen_files, missing):
    from engine.models.family import family_for

    _, transformer, encoders, (vae_file, _) = qwen_files
    given = {"text_encoder": str(encoders[True][0]), "vae": str(vae_file)}
    given.pop(missing)
    config = cfg_from(transformer, **given)
    with pytest.raises(UserError, match=f"^config key '{missing}': a single-file Qwen-Image model holds the "
                                        "transformer only"):
        family_for(config).load(config)


@pytest.mark.parametrize("key", ["text_encoder", "vae"])
def test_the_other_part_given_for_a_key_is_refused_naming_it(qwen_files, key):
    from engine.models.family import family_for

    _, transformer, encoders, (vae_file, _) = qwen_files
    given = {"text_encoder": str(vae_file), "vae": str(vae_file)} if key == "text_encoder" else {
        "text_encoder": str(encoders[True][0]), "vae": str(encoders[True][0])}
    config = cfg_from(transformer, **given)
    with pytest.raises(UserError, match=f"^config key '{key}': .* is not .* in the layout ComfyUI keeps it"):
        family_for(config).load(config)


def test_a_text_encoder_file_of_other_sizes_than_its_config_is_refused_naming_the_key(qwen_files, tmp_path):
    """Without a recorded config the file is read as Qwen2.5-VL-7B, whose sizes the tiny one's are not."""
    from safetensors.torch import load_file

    from engine.models.qwen_image_files import load_text_encoder_file

    _, _, encoders, _ = qwen_files
    bare = save(tmp_path / "bare.safetensors", load_file(encoders[True][0]))
    with pytest.raises(UserError, match="^config key 'text_encoder': bare.safetensors does not fit Qwen2.5-VL"):
        load_text_encoder_file(bare)


# -- Qwen-Image-Edit: Qwen-Image's files, the transformer's telling the edit model ----------------------------------
@pytest.fixture(scope="module")
def edit_files(tmp_path_factory, demo_cache, qwen_files):
    from engine import paths

    tiny = paths.demo_model_dir("qwen-image-edit")
    folder = tmp_path_factory.mktemp("qwen-image-edit-files")
    text_file, text_model = text_encoder_file(folder, tiny / "text_encoder", head=True)
    return tiny, text_file, text_model, qwen_files[3][0]


def edit_checkpoint(folder, tiny, zero_cond_t: bool, base=None, family: str = "qwen-image-edit"):
    """A full fine-tune's checkpoint of the tiny edit model (as 2511 with zero_cond_t), every weight moved, over
    `base` (the tiny edit folder where not given) and trained as `family`."""
    from diffusers import QwenImageTransformer2DModel

    model = QwenImageTransformer2DModel.from_pretrained(tiny / "transformer", zero_cond_t=zero_cond_t)
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    checkpoint = folder / "run" / "checkpoints" / "step-00000002"
    model.save_pretrained(checkpoint / "unet")
    (checkpoint / "meta.json").write_text(json.dumps({"step": 2, "epoch": 0, "base_model": str(base or tiny),
                                                      "trained": ["unet"], "network": "full", "family": family}))
    return checkpoint, model


def edit_cfg(model, files, **values):
    _, text_file, _, vae_file = files
    return cfg_from(model, text_encoder=str(text_file), vae=str(vae_file), cache={"text_embeddings": False}, **values)


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511"])
def test_a_full_edit_run_converts_to_the_file_comfyui_and_diffusers_read_and_trains_again_as_the_edit_model(
        edit_files, tmp_path, zero_cond_t):
    """The edit model's transformer becomes Qwen-Image's file; 2511's bears the mark ComfyUI's model_detection
    reads as its timestep-zero reference (and diffusers' single-file loader passes over), and the family loads it
    back as Qwen-Image-Edit with the same weights and zero_cond_t."""
    from diffusers import QwenImageTransformer2DModel

    from engine.models.convert import convert_checkpoint
    from engine.models.family import family_for
    from engine.models.qwen_image import TIMESTEP_ZERO_MARK
    from engine.models.single_file import read_shapes

    tiny = edit_files[0]
    checkpoint, model = edit_checkpoint(tmp_path, tiny, zero_cond_t)
    written = convert_checkpoint(checkpoint, tmp_path / "edit.safetensors", unet_dtype="bf16")
    shapes = read_shapes(written)
    assert "txt_norm.weight" in shapes  # ComfyUI's test for a Qwen-Image model
    assert (TIMESTEP_ZERO_MARK in shapes) == zero_cond_t
    model.save_config(tmp_path / "configs" / "transformer")
    read = QwenImageTransformer2DModel.from_single_file(str(written), config=str(tmp_path / "configs"),
                                                        subfolder="transformer", torch_dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert read.state_dict().keys() == want.keys()
    assert all(torch.equal(read.state_dict()[k], want[k]) for k in want)

    config = edit_cfg(written, edit_files)
    family = family_for(config)
    assert family.name == "qwen-image-edit"
    unet = family.load(config).unet
    assert unet.config.zero_cond_t == zero_cond_t
    assert all(torch.equal(unet.state_dict()[k].to(torch.bfloat16), want[k]) for k in want)


@pytest.mark.parametrize("family", ["qwen-image-edit", "qwen-image"])
def test_a_run_over_a_plain_qwen_image_file_converts_to_the_file_of_the_model_it_trained_as(
        edit_files, qwen_files, tmp_path, family):
    """A run that trained the edit model from Qwen-Image's plain file (told by its control images) converts to a file
    that says it is the edit model; a Qwen-Image run's does not."""
    from engine.models.convert import convert_checkpoint
    from engine.models.family import family_for

    checkpoint, _ = edit_checkpoint(tmp_path, edit_files[0], False, base=qwen_files[1], family=family)
    written = convert_checkpoint(checkpoint, tmp_path / "out.safetensors")
    assert family_for(edit_cfg(written, edit_files)).name == family


def test_comfyuis_edit_files_read_each_prompt_with_its_control_as_the_diffusers_folder_does(edit_files, tmp_path):
    """A transformer file with ComfyUI's 2511 mark and no record of its pipeline is the edit model; without the
    mark it is one when the config gives control images. Its conditioning is the folder's for the same caption
    and control."""
    from PIL import Image
    from safetensors.torch import load_file

    from engine.models.family import family_for
    from engine.models.qwen_image import TIMESTEP_ZERO_MARK, TRANSFORMER_CONFIG

    tiny = edit_files[0]
    state = load_file(next((tiny / "transformer").glob("*.safetensors")))
    recorded = {TRANSFORMER_CONFIG: json.loads((tiny / "transformer" / "config.json").read_text())}
    marked = save(tmp_path / "marked.safetensors", {**state, TIMESTEP_ZERO_MARK: torch.tensor([])}, recorded)
    plain = save(tmp_path / "plain.safetensors", state, recorded)
    assert family_for(edit_cfg(plain, edit_files)).name == "qwen-image"
    control = tmp_path / "control.png"
    Image.new("RGB", (64, 64), (200, 40, 40)).save(control)
    sampling = {"sampling": {"concepts": [{"prompt": "make it blue", "control_image": str(control)}]}}
    assert family_for(edit_cfg(plain, edit_files, **sampling)).name == "qwen-image-edit"
    config = edit_cfg(marked, edit_files)
    family = family_for(config)
    assert family.name == "qwen-image-edit"
    ours = family.load(config)
    assert ours.unet.config.zero_cond_t
    folder = family.load(cfg_from(tiny, cache={"text_embeddings": False}))
    ids = ours.tokenizer(["make the disc blue"], padding="max_length", return_tensors="pt").input_ids
    assert torch.equal(ids, folder.tokenizer(["make the disc blue"], padding="max_length",
                                             return_tensors="pt").input_ids)
    controls = torch.rand(1, 1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        got, want = (family.encode_text(c.text_encoder, ids, 1, controls) for c in (ours, folder))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_lora_run_over_the_files_converts_to_the_merged_file(qwen_files, tmp_path, sample_data):
    """Two steps of a LoRA over the three files; the merged conversion reads its base from the transformer file and
    changes exactly the adapted layers' weights."""
    from engine import checkpoints
    from engine.config import Network
    from engine.models.adapters import target_modules
    from engine.models.convert import convert_checkpoint
    from engine.models.qwen_image import load_transformer_file

    _, transformer, encoders, (vae_file, _) = qwen_files
    checkpoint = lora_checkpoint_over_files(tmp_path, transformer, encoders[False][0], vae_file)
    assert checkpoints.read_meta(checkpoint)["family"] == "qwen-image"  # what convert tells an edit run's file by
    merged_file = convert_checkpoint(checkpoint, tmp_path / "merged.safetensors", adapter_output="merged")
    base_model = load_transformer_file(transformer, torch.float32)
    base, merged = base_model.state_dict(), load_transformer_file(merged_file, torch.float32).state_dict()
    assert merged.keys() == base.keys()
    changed = {key.rpartition(".")[0] for key in base if not torch.equal(base[key], merged[key])}
    assert changed == set(target_modules(base_model, "unet", Network(type="lora")))
