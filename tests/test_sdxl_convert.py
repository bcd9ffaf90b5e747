"""SDXL single files: conversion of SDXL runs judged by diffusers' own single-file loader, the key names of
the real SDXL architecture, and loading an SDXL single file as a base model."""
import shutil
from pathlib import Path

import pytest
import torch

from conftest import run_cli
from engine import checkpoints
from engine import config as cfg
from engine import events
from engine.errors import UserError
from engine.models.convert import build_key_maps, convert_checkpoint
from engine.models.keymap import UNET_PREFIX, VAE_PREFIX, to_original
from engine.models.keymap_sdxl import CLIP_PREFIX, CONDITIONER_PREFIX, OPEN_CLIP_PREFIX
from engine.models.single_file import detect_family, empty_models, load_single_file_components
from engine.testing import tiny_config
from test_adapter_convert import library_messages

ENCODERS = ("text_encoder", "text_encoder_2")
COMPONENTS = ("unet", "vae") + ENCODERS
PREFIXES = {"unet": UNET_PREFIX, "vae": VAE_PREFIX, "text_encoder": CONDITIONER_PREFIX + "0.",
            "text_encoder_2": CONDITIONER_PREFIX + "1."}


def train_sdxl(output_dir: Path, **overrides) -> Path:
    """A two-step run of the tiny SDXL model, both text encoders trained, at a learning rate that moves
    every weight."""
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": "demo:tiny-sdxl", "trainer.max_steps": 2, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": 2, "train_text_encoder": True, "optimizer.params.lr": 1e-2,
        "optimizer.lr_scheduler.warmup.enabled": False, "prior_preservation.enabled": False,
        "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    return next((output_dir / "tiny-demo").iterdir())


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, tiny_sdxl):
    return train_sdxl(tmp_path_factory.mktemp("sdxl-full"), **{"ema.enabled": True, "ema.decay": 0.5})


def run_models(run: Path, tiny_sdxl: Path, unet_folder: str = "unet") -> dict:
    """The run's weights: what it trained from its checkpoint, the VAE from its base model."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    checkpoint = checkpoints.latest_checkpoint(run)
    return {"unet": UNet2DConditionModel.from_pretrained(checkpoint / unet_folder),
            "vae": AutoencoderKL.from_pretrained(tiny_sdxl / "vae"),
            "text_encoder": CLIPTextModel.from_pretrained(checkpoint / "text_encoder"),
            "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(checkpoint / "text_encoder_2")}


def read_back(path: Path, config_dir: Path, **components):
    """The file through diffusers' SDXL single-file loader, refusing any word of unused or missing keys."""
    from diffusers import StableDiffusionXLPipeline

    with library_messages() as messages:
        pipeline = StableDiffusionXLPipeline.from_single_file(str(path), config=str(config_dir),
                                                              local_files_only=True, **components)
    problems = [m for m in messages if any(word in m.lower() for word in ("unexpected", "missing", "not used"))]
    assert not problems, problems
    return pipeline


def file_tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(expected, actual, dtype=None):
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        tensor = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        assert torch.equal(got[key].to(tensor.dtype), tensor), key


def assert_nothing_stray(tensors: dict, models: dict):
    """Every number in the file belongs to a model weight: with every weight read back equal, the file holds
    exactly the models (the fused q/k/v of the second encoder counted as its three parts)."""
    for name, model in models.items():
        written = sum(t.numel() for k, t in tensors.items() if k.startswith(PREFIXES[name]))
        assert written == sum(t.numel() for t in model.state_dict().values()), name


def test_full_run_converts_to_one_file_diffusers_reads_back_bit_equal(full_run, tiny_sdxl, tmp_path):
    written = convert_checkpoint(full_run, tmp_path)
    tensors = file_tensors(written)
    assert {key.split(".")[0] for key in tensors} == {"model", "first_stage_model", "conditioner"}
    models = run_models(full_run, tiny_sdxl)
    hidden_2 = models["text_encoder_2"].config.hidden_size
    assert tensors[OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden_2, hidden_2)
    # OpenCLIP multiplies by its projection; transformers' Linear holds the transpose
    assert torch.equal(tensors[OPEN_CLIP_PREFIX + "text_projection"],
                       models["text_encoder_2"].text_projection.weight.T)
    assert CLIP_PREFIX + "encoder.layers.0.self_attn.q_proj.weight" in tensors
    assert_nothing_stray(tensors, models)
    loaded = read_back(written, tiny_sdxl)
    for name in COMPONENTS:
        assert_same_weights(models[name], getattr(loaded, name))


def test_fp16_unet_and_no_text_encoder_variants(full_run, tiny_sdxl, tmp_path):
    models = run_models(full_run, tiny_sdxl)
    half = convert_checkpoint(full_run, tmp_path / "half.safetensors", unet_dtype="fp16")
    tensors = file_tensors(half)
    assert {t.dtype for k, t in tensors.items() if k.startswith(UNET_PREFIX)} == {torch.float16}
    assert {t.dtype for k, t in tensors.items() if not k.startswith(UNET_PREFIX)} == {torch.float32}
    loaded = read_back(half, tiny_sdxl)
    assert_same_weights(models["unet"], loaded.unet, dtype=torch.float16)
    for name in ("vae",) + ENCODERS:
        assert_same_weights(models[name], getattr(loaded, name))

    without = convert_checkpoint(full_run, tmp_path / "no-te.safetensors", text_encoder=False)
    keys = file_tensors(without).keys()
    assert not any(key.startswith(CONDITIONER_PREFIX) for key in keys)
    assert keys == {k for k in file_tensors(convert_checkpoint(full_run, tmp_path)) if not k.startswith("conditioner.")}


def test_ema_file_holds_the_average(full_run, tiny_sdxl, tmp_path):
    written = convert_checkpoint(full_run, tmp_path / "ema.safetensors", ema=True)
    average = run_models(full_run, tiny_sdxl, unet_folder="ema_unet")["unet"]
    trained = run_models(full_run, tiny_sdxl)["unet"]
    assert not all(torch.equal(a, b) for a, b in zip(average.parameters(), trained.parameters()))
    assert_same_weights(average, read_back(written, tiny_sdxl).unet)


def test_cli_converts_an_sdxl_run(full_run, tmp_path):
    out = tmp_path / "cli.safetensors"
    result = run_cli("convert", str(full_run), str(out), "--no-text-encoder", "--unet-dtype", "fp16")
    assert result.returncode == 0, result.stderr[-2000:]
    tensors = file_tensors(out)
    assert tensors[UNET_PREFIX + "label_emb.0.0.weight"].dtype == torch.float16
    assert not any(key.startswith(CONDITIONER_PREFIX) for key in tensors)


# Parameter counts of the public SDXL base 1.0 model: the built-in configs are that architecture.
SDXL_PARAMETERS = {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480,
                   "text_encoder_2": 694_659_840}
SDXL_BASE_KEYS = 2515  # tensors in sd_xl_base_1.0.safetensors
# ...of which two are no weights of the diffusers models: a position-id buffer transformers no longer saves,
# and OpenCLIP's contrastive logit scale, which no text encoding uses. Loaders skip both when present.
NOT_WRITTEN = {CLIP_PREFIX + "embeddings.position_ids", OPEN_CLIP_PREFIX + "logit_scale"}
SDXL_BASE_NAMES = (
    UNET_PREFIX + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight",
    UNET_PREFIX + "input_blocks.8.1.transformer_blocks.9.ff.net.2.weight",
    UNET_PREFIX + "middle_block.1.transformer_blocks.9.attn2.to_k.weight",
    UNET_PREFIX + "output_blocks.2.2.conv.weight",
    UNET_PREFIX + "label_emb.0.0.weight",
    UNET_PREFIX + "label_emb.0.2.bias",
    VAE_PREFIX + "decoder.up.3.block.2.conv2.weight",
    CONDITIONER_PREFIX + "0.transformer.text_model.encoder.layers.11.mlp.fc2.weight",
    CONDITIONER_PREFIX + "0.transformer.text_model.final_layer_norm.weight",
    CONDITIONER_PREFIX + "1.model.transformer.resblocks.31.attn.in_proj_weight",
    CONDITIONER_PREFIX + "1.model.transformer.resblocks.31.mlp.c_proj.bias",
    CONDITIONER_PREFIX + "1.model.text_projection",
    CONDITIONER_PREFIX + "1.model.positional_embedding",
    CONDITIONER_PREFIX + "1.model.token_embedding.weight",
    CONDITIONER_PREFIX + "1.model.ln_final.weight",
)


def test_real_sdxl_architecture_has_the_base_model_keys_and_converts_back_with_diffusers():
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    models = empty_models("sdxl")
    for name, model in models.items():
        assert sum(p.numel() for p in model.parameters()) == SDXL_PARAMETERS[name], name
    maps = build_key_maps(models)
    original = {name: to_original(model.state_dict(), maps[name]) for name, model in models.items()}
    keys = {key for part in original.values() for key in part}
    assert len(keys) + len(NOT_WRITTEN) == SDXL_BASE_KEYS and not keys & NOT_WRITTEN
    assert set(SDXL_BASE_NAMES) <= keys
    shapes = {key: tuple(t.shape) for part in original.values() for key, t in part.items()}
    assert shapes[OPEN_CLIP_PREFIX + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[UNET_PREFIX + "label_emb.0.0.weight"] == (1280, 2816)
    assert detect_family(shapes) == "sdxl"

    back = {"unet": convert_ldm_unet_checkpoint(original["unet"], dict(models["unet"].config)),
            "vae": convert_ldm_vae_checkpoint(original["vae"], dict(models["vae"].config)),
            "text_encoder": {key.removeprefix("text_model."): value
                             for key, value in convert_ldm_clip_checkpoint(original["text_encoder"]).items()},
            "text_encoder_2": convert_open_clip_checkpoint(models["text_encoder_2"], original["text_encoder_2"],
                                                           prefix=OPEN_CLIP_PREFIX)}
    for name, model in models.items():
        state = model.state_dict()
        assert back[name].keys() == state.keys(), name
        assert all(back[name][key].shape == state[key].shape for key in state), name


def test_sdxl_text_encoders_of_another_kind_are_refused():
    from engine.models.keymap_sdxl import text_encoder_2_key_map, text_encoder_key_map

    with pytest.raises(UserError, match="text_encoder_2.*gelu"):
        text_encoder_2_key_map({"hidden_act": "quick_gelu", "num_hidden_layers": 1}, ["final_layer_norm.weight"])
    with pytest.raises(UserError, match="text_projection.weight"):
        text_encoder_key_map({"hidden_act": "quick_gelu", "num_hidden_layers": 1}, ["text_projection.weight"])


# -- an SDXL single file as the base model -----------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_sdxl_file(tmp_path_factory, tiny_sdxl):
    """The tiny SDXL model as one file, beside a folder of its name with its configs and tokenizers but
    no weights (the tiny model's configs are not the built-in SDXL ones)."""
    folder = tmp_path_factory.mktemp("sdxl-file")
    written = convert_checkpoint(tiny_sdxl, folder / "tiny-sdxl.safetensors")
    shutil.copytree(tiny_sdxl, folder / "tiny-sdxl", ignore=shutil.ignore_patterns("*.safetensors"))
    return written


def test_sdxl_single_file_loads_with_its_companion_folder(tiny_sdxl_file, tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    from engine.models.sdxl import TextEncoders

    components = load_single_file_components(tiny_sdxl_file)
    source = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    assert isinstance(components.text_encoder, TextEncoders)
    for name, model in {"unet": components.unet, "vae": components.vae,
                        **components.text_encoder.parts()}.items():
        assert_same_weights(getattr(source, name), model)
    assert components.text_encoder.pad_token_id_2 == source.tokenizer_2.pad_token_id
    assert components.tokenizer.get_vocab() == source.tokenizer.get_vocab()


def test_second_tokenizer_falls_back_to_the_first_padding_with_exclamation_mark(tiny_sdxl_file, tiny_sdxl,
                                                                                 tmp_path):
    from transformers import CLIPTokenizer

    model = Path(shutil.copy(tiny_sdxl_file, tmp_path / "model.safetensors"))
    shutil.copytree(tiny_sdxl_file.with_suffix(""), tmp_path / "model", ignore=shutil.ignore_patterns("tokenizer*"))
    components = load_single_file_components(model, tokenizer=str(tiny_sdxl / "tokenizer"))
    tokenizer_2 = CLIPTokenizer.from_pretrained(tiny_sdxl / "tokenizer_2")
    assert tokenizer_2.pad_token == "!"
    assert components.text_encoder.pad_token_id_2 == tokenizer_2.pad_token_id


def test_sdxl_file_without_text_encoders_takes_them_from_the_companion_folder(full_run, tiny_sdxl, tmp_path):
    model = convert_checkpoint(full_run, tmp_path / "unet-only.safetensors", text_encoder=False)
    shutil.copytree(tiny_sdxl, tmp_path / "unet-only")
    components = load_single_file_components(model)
    source = run_models(full_run, tiny_sdxl)
    assert_same_weights(source["unet"], components.unet)
    from transformers import CLIPTextModelWithProjection

    assert_same_weights(CLIPTextModelWithProjection.from_pretrained(tiny_sdxl / "text_encoder_2"),
                        components.text_encoder.text_encoder_2)


def test_wrong_tokenizer_folder_and_unknown_files_are_refused_naming_the_key(tiny_sdxl_file, tiny_sdxl,
                                                                            tiny_model, tmp_path):
    from safetensors.torch import save_file

    wrong_family = r"^config key 'tokenizer': .* is an SD1.x/SD2.x model, but .* is SDXL"
    with pytest.raises(UserError, match=wrong_family) as error:
        load_single_file_components(tiny_sdxl_file, tokenizer=str(tiny_model))
    assert "\n" not in str(error.value)
    # an SD1.5-shaped file with an SDXL folder as its tokenizer
    sd15 = tmp_path / "sd15.safetensors"
    save_file({UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, 768)}, str(sd15))
    with pytest.raises(UserError, match=r"^config key 'tokenizer': .* is an SDXL model"):
        load_single_file_components(sd15, tokenizer=str(tiny_sdxl))
    unknown = tmp_path / "unknown.safetensors"
    save_file({UNET_PREFIX + "conv_in.weight": torch.zeros(8, 4, 3, 3)}, str(unknown))
    with pytest.raises(UserError, match=r"^config key 'model': .*unknown.safetensors is not an SD1.x or SD2.x "
                                        r"checkpoint, nor an SDXL one") as error:
        load_single_file_components(unknown, tokenizer=str(tiny_sdxl / "tokenizer"))
    assert "\n" not in str(error.value)
    # The tiny SDXL file's tensors alone, without its companion or recorded configs: the built-in SDXL
    # configs, which they do not fit.
    from safetensors import safe_open

    with safe_open(str(tiny_sdxl_file), "pt") as handle:
        save_file({key: handle.get_tensor(key) for key in handle.keys()}, str(tmp_path / "alone.safetensors"))
    alone = tmp_path / "alone.safetensors"
    with pytest.raises(UserError, match=r"^config key 'model': alone.safetensors does not fit the configs in .*sdxl"):
        load_single_file_components(alone, tokenizer=str(tiny_sdxl / "tokenizer"))


def test_sdxl_single_file_trains_and_its_checkpoint_converts(tiny_sdxl_file, tiny_sdxl, tmp_path):
    run = train_sdxl(tmp_path / "out", **{"model": str(tiny_sdxl_file), "trainer.max_steps": 1,
                                          "checkpoint.every_n_train_steps": 1})
    checkpoint = checkpoints.latest_checkpoint(run)
    assert checkpoints.read_meta(checkpoint)["base_model"] == str(tiny_sdxl_file)
    written = convert_checkpoint(checkpoint, tmp_path / "trained.safetensors")
    models = run_models(run, tiny_sdxl)
    loaded = read_back(written, tiny_sdxl)
    for name in COMPONENTS:
        assert_same_weights(models[name], getattr(loaded, name))
