"""Single-file conversion, judged by diffusers' own original->diffusers loader, and single-file base models."""
import json
import shutil

import pytest
import torch

from conftest import run_cli
from engine import config as cfg
from engine import events
from engine.models.convert import build_key_maps, convert_checkpoint, estimate_output_bytes
from engine.errors import UserError
from engine.models.keymap import (OPEN_CLIP_PREFIX, TEXT_ENCODER_PREFIX, UNET_PREFIX, VAE_PREFIX, text_encoder_key_map,
                           to_original, unet_key_map)
from engine.models.single_file import detect_family, empty_models, load_single_file_components
from engine.testing import tiny_config

COMPONENTS = ("unet", "vae", "text_encoder")


def load_single_file(path, config_dir):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_single_file(str(path), config=str(config_dir), local_files_only=True,
                                                    safety_checker=None, feature_extractor=None)


def assert_same_weights(expected, actual):
    want, got = expected.state_dict(), actual.state_dict()
    assert want.keys() == got.keys()
    for key, tensor in want.items():
        assert torch.equal(got[key].to(tensor.dtype), tensor), key


def file_tensors(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}


@pytest.fixture(scope="module")
def source_pipeline(tiny_model):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(tiny_model, safety_checker=None)


@pytest.fixture(scope="module")
def tiny_file(tmp_path_factory, tiny_model):
    return convert_checkpoint(tiny_model, tmp_path_factory.mktemp("converted") / "tiny.safetensors")


def test_tiny_model_round_trips_through_diffusers_single_file_loader(tiny_model, tiny_file, source_pipeline):
    loaded = load_single_file(tiny_file, tiny_model)
    for name in COMPONENTS:
        assert_same_weights(getattr(source_pipeline, name), getattr(loaded, name))
    keys = file_tensors(tiny_file).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    # The VAE's mid-block attention is stored as 1x1 convolutions, as the original layout has it.
    assert file_tensors(tiny_file)[VAE_PREFIX + "encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)


def perturbed(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.1)
    return model


def test_training_checkpoint_round_trips_with_trained_text_encoder_and_ema(tmp_path, tiny_model):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    from engine.checkpoints import save_checkpoint
    from engine.config import Ema
    from engine.ema import EMA_FOLDER, create_ema

    unet = perturbed(UNet2DConditionModel.from_pretrained(tiny_model / "unet"), 1)
    ema_unet = perturbed(UNet2DConditionModel.from_pretrained(tiny_model / "unet"), 2)
    ema = create_ema(ema_unet, Ema(enabled=True))  # saved the way training saves its EMA
    text_encoder = perturbed(CLIPTextModel.from_pretrained(tiny_model / "text_encoder"), 3)
    run_dir = tmp_path / "run-a"
    checkpoint = save_checkpoint(run_dir, 7, {"unet": unet, EMA_FOLDER: ema, "text_encoder": text_encoder},
                                 {}, {"base_model": str(tiny_model), "prediction_type": "v_prediction"}, keep=1)
    # The run trained with a separate VAE (config key vae): the file carries that one, not the base's.
    vae = perturbed(AutoencoderKL.from_pretrained(tiny_model / "vae"), 4)
    vae.save_pretrained(tmp_path / "own-vae")
    (run_dir / "config.yaml").write_text(f"vae: {tmp_path / 'own-vae'}\n")

    seen = []
    written = convert_checkpoint(checkpoint, tmp_path / "out", on_event=seen.append)
    assert written == tmp_path / "out" / "run-a-step-00000007.safetensors"
    progress = [e for e in seen if isinstance(e, events.Progress)]
    assert [e.done for e in progress] == list(range(1, 8)) and progress[-1].total == 7
    logs = [e for e in seen if isinstance(e, events.Log)]
    assert any("wrote" in e.message for e in logs)
    # Trained as v-prediction over an epsilon base: the checkpoint's own record decides the note.
    assert any(e.level == "warning" and "v-prediction" in e.message for e in logs)
    loaded = load_single_file(written, tiny_model)
    assert_same_weights(unet, loaded.unet)
    assert_same_weights(text_encoder, loaded.text_encoder)
    assert_same_weights(vae, loaded.vae)

    # A run folder converts its newest checkpoint; --ema takes the EMA UNet.
    from_ema = convert_checkpoint(run_dir, tmp_path / "ema.ckpt", ema=True)
    state = torch.load(from_ema, map_location="cpu", weights_only=True)["state_dict"]
    ema_state = ema_unet.state_dict()
    unet_keys = build_key_maps({"unet": ema_unet})["unet"]
    for key, target in unet_keys.items():
        assert torch.equal(state[target.key], ema_state[key]), key

    (checkpoint / EMA_FOLDER).rename(checkpoint / "kept")
    with pytest.raises(UserError, match="ema_unet"):
        convert_checkpoint(checkpoint, tmp_path / "none.safetensors", ema=True)
    assert not (tmp_path / "none.safetensors").exists()


def test_sd2_shaped_model_converts_to_open_clip_layout_and_round_trips(tmp_path, tiny_model, source_pipeline):
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    text_config = CLIPTextConfig(**{**source_pipeline.text_encoder.config.to_dict(), "hidden_act": "gelu"})
    unet_config = {**source_pipeline.unet.config, "use_linear_projection": True, "upcast_attention": True}
    scheduler = DDIMScheduler.from_config(source_pipeline.scheduler.config, prediction_type="v_prediction")
    folder = tmp_path / "tiny-sd2"
    StableDiffusionPipeline(
        unet=UNet2DConditionModel.from_config(unet_config), vae=source_pipeline.vae,
        text_encoder=CLIPTextModel(text_config), tokenizer=source_pipeline.tokenizer, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(folder)
    seen = []
    written = convert_checkpoint(folder, tmp_path / "sd2.safetensors", on_event=seen.append)
    assert any(e.level == "warning" and "v-prediction" in e.message for e in seen if isinstance(e, events.Log))
    tensors = file_tensors(written)
    hidden = text_config.hidden_size
    assert tensors[OPEN_CLIP_PREFIX + "transformer.resblocks.0.attn.in_proj_weight"].shape == (3 * hidden, hidden)
    assert not any(k.startswith(TEXT_ENCODER_PREFIX + "transformer.") for k in tensors)
    loaded = load_single_file(written, folder)
    source = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None)
    for name in COMPONENTS:
        assert_same_weights(getattr(source, name), getattr(loaded, name))


# Parameter counts of the public SD1.5 and SD2.1 checkpoints: the built-in configs are those architectures.
PARAMETERS = {"sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
              "sd21": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840}}


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_real_architectures_convert_back_to_the_same_keys_with_diffusers_converters(family):
    from diffusers.loaders.single_file_utils import (convert_ldm_clip_checkpoint, convert_ldm_unet_checkpoint,
                                                     convert_ldm_vae_checkpoint, convert_open_clip_checkpoint)

    models = empty_models(family)
    for name, model in models.items():
        assert sum(p.numel() for p in model.parameters()) == PARAMETERS[family][name], name
    maps = build_key_maps(models)
    original = {}
    for name, model in models.items():
        original[name] = to_original(model.state_dict(), maps[name])
    back = {"unet": convert_ldm_unet_checkpoint(original["unet"], dict(models["unet"].config)),
            "vae": convert_ldm_vae_checkpoint(original["vae"], dict(models["vae"].config))}
    if family == "sd21":
        text = convert_open_clip_checkpoint(models["text_encoder"], original["text_encoder"], prefix=OPEN_CLIP_PREFIX)
    else:
        text = convert_ldm_clip_checkpoint(original["text_encoder"])
    back["text_encoder"] = {key.removeprefix("text_model."): value for key, value in text.items()}
    for name, model in models.items():
        state = model.state_dict()
        assert back[name].keys() == state.keys(), name
        assert all(back[name][key].shape == state[key].shape for key in state), name
    shapes = {key: tuple(t.shape) for part in original.values() for key, t in part.items()}
    assert detect_family(shapes) == family


def test_sd15_single_file_sizes_from_the_real_architecture():
    models = empty_models("sd15")
    fp16, fp32 = torch.float16, torch.float32
    dtypes = {"unet": fp16, "vae": fp32, "text_encoder": fp16}
    without_text_encoder = estimate_output_bytes({"unet": models["unet"], "vae": models["vae"]}, dtypes)
    unet_only = estimate_output_bytes({"unet": models["unet"]}, dtypes)
    assert without_text_encoder == 1_719_041_928 + 334_615_452  # 2.05 GB (1.91 GiB)
    assert unet_only == 1_719_041_928  # 1.72 GB (1.60 GiB)
    assert 1.9e9 < without_text_encoder < 2.1e9 and 1.55 * 2**30 < unet_only < 1.65 * 2**30


def test_estimate_matches_the_written_file_and_dtype_flags_apply_per_component(tmp_path, tiny_model,
                                                                                source_pipeline, tiny_file):
    written = convert_checkpoint(tiny_model, tmp_path / "mixed.safetensors", unet_dtype="fp16", vae_dtype="bf16")
    dtypes = {"unet": torch.float16, "vae": torch.bfloat16, "text_encoder": torch.float32}
    models = {name: getattr(source_pipeline, name) for name in COMPONENTS}
    header = written.stat().st_size - estimate_output_bytes(models, dtypes)
    assert 0 < header < 64 * 1024
    prefixes = {UNET_PREFIX: torch.float16, VAE_PREFIX: torch.bfloat16, TEXT_ENCODER_PREFIX: torch.float32}
    for key, tensor in file_tensors(written).items():
        assert tensor.dtype == next(d for p, d in prefixes.items() if key.startswith(p)), key

    full = file_tensors(tiny_file).keys()
    no_vae = convert_checkpoint(tiny_model, tmp_path / "no-vae.safetensors", vae=False)
    assert file_tensors(no_vae).keys() == {k for k in full if not k.startswith(VAE_PREFIX)}
    no_text = convert_checkpoint(tiny_model, tmp_path / "no-text.ckpt", text_encoder=False)
    state = torch.load(no_text, map_location="cpu", weights_only=True)["state_dict"]
    assert state.keys() == {k for k in full if not k.startswith(TEXT_ENCODER_PREFIX)}


def test_cli_prints_the_size_and_never_overwrites_without_the_flag(tmp_path, tiny_model):
    out = tmp_path / "model.safetensors"
    out.write_bytes(b"keep me")
    refused = run_cli("convert", str(tiny_model), str(out))
    assert refused.returncode == 2 and "already exists" in refused.stderr and "--overwrite" in refused.stderr
    assert out.read_bytes() == b"keep me"
    replaced = run_cli("convert", str(tiny_model), str(out), "--overwrite", "--unet-dtype", "fp16")
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    assert replaced.stdout.strip() == f"{out} ({out.stat().st_size / 1e6:.1f} MB)"
    assert file_tensors(out)[UNET_PREFIX + "out.2.weight"].dtype == torch.float16
    with pytest.raises(UserError, match="does not match"):
        convert_checkpoint(tiny_model, tmp_path / "x.ckpt", fmt="safetensors")


def test_architectures_without_an_original_layout_are_refused():
    config = {"down_block_types": ["AttnDownBlock2D"], "up_block_types": ["AttnUpBlock2D"], "layers_per_block": 1}
    with pytest.raises(UserError, match="AttnDownBlock2D"):
        unet_key_map(config, ["conv_in.weight"])
    sd1 = {"down_block_types": ["DownBlock2D"], "up_block_types": ["UpBlock2D"], "layers_per_block": 1}
    with pytest.raises(UserError, match="class_embedding.linear_1.weight"):
        unet_key_map(sd1, ["conv_in.weight", "class_embedding.linear_1.weight"])
    cross = {**sd1, "down_block_types": ["CrossAttnDownBlock2D"]}
    attention = "down_blocks.0.attentions.0.transformer_blocks.0.attn1."
    assert unet_key_map(cross, [attention + "to_q.weight"])[attention + "to_q.weight"].key == (
        UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight")
    with pytest.raises(UserError, match="norm_q"):
        unet_key_map(cross, [attention + "norm_q.weight"])
    text = {"hidden_act": "quick_gelu", "num_hidden_layers": 1}
    with pytest.raises(UserError, match="text_projection.weight"):
        text_encoder_key_map(text, ["final_layer_norm.weight", "text_projection.weight"])
    assert text_encoder_key_map(text, ["text_model.final_layer_norm.weight"])[
        "text_model.final_layer_norm.weight"].key == "cond_stage_model.transformer.text_model.final_layer_norm.weight"


def write_fake_checkpoint(path, context_width, with_vae=False):
    """A file with the tensors that identify an architecture, too small to be a model."""
    from safetensors.torch import save_file

    tensors = {UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               UNET_PREFIX + "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": torch.zeros(8, context_width)}
    if with_vae:
        tensors[VAE_PREFIX + "encoder.conv_in.weight"] = torch.zeros(8, 3, 3, 3)
    save_file(tensors, str(path))
    return path


def without_metadata(path, target):
    """The file's tensors alone, as a file from elsewhere holds them."""
    from safetensors.torch import save_file

    save_file(file_tensors(path), str(target))
    return target


def test_single_file_needs_known_shapes_or_recorded_configs(tmp_path, tiny_model, tiny_file):
    sd15 = write_fake_checkpoint(tmp_path / "sd15.safetensors", 768)
    with pytest.raises(UserError, match="config key 'vae'"):
        load_single_file_components(sd15)
    sd21 = write_fake_checkpoint(tmp_path / "sd21.safetensors", 1024, with_vae=True)
    with pytest.warns(UserWarning, match="v-prediction"), pytest.raises(UserError, match="text encoder"):
        load_single_file_components(sd21, tokenizer=str(tiny_model / "tokenizer"))
    # A whole diffusers folder as tokenizer: supplies the configs, which these tensors do not fit.
    with pytest.raises(UserError, match="does not fit the configs in .*tiny-sd"):
        load_single_file_components(sd21, tokenizer=str(tiny_model))
    # Without the configs its conversion recorded, the tiny model's tensors fit no architecture known.
    bare = without_metadata(tiny_file, tmp_path / "tiny.safetensors")
    with pytest.raises(UserError, match="not an SD1.x or SD2.x checkpoint.*tiny/"):
        load_single_file_components(bare)


@pytest.mark.parametrize("arch", ["sd", "sd21", "sdxl"])
def test_a_converted_file_trains_samples_and_converts_with_nothing_beside_it(arch, tmp_path, demo_cache):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTokenizer

    from engine import checkpoints, paths
    from engine.models.family import family_for
    from engine.train import Trainer

    source = paths.demo_model_dir(arch)
    model = convert_checkpoint(source, tmp_path / "alone" / "model.safetensors")
    assert [p.name for p in model.parent.iterdir()] == ["model.safetensors"]
    config = cfg.from_dict(tiny_config(tmp_path / "out", **{
        "model": str(model), "trainer.max_steps": 2, "sampling.interval_steps": 2,
        "checkpoint.every_n_train_steps": 2, "prior_preservation.enabled": False, "optimizer.params.lr": 1e-2,
        "data.concepts[0].class_set.auto_generate.enabled": False}))
    components = family_for(config).load(config)
    # the source's prediction type (SD2.1 768: v_prediction) and tokenizers, padding included
    scheduler = json.loads((source / "scheduler" / "scheduler_config.json").read_text())
    assert components.noise_scheduler.config.prediction_type == scheduler["prediction_type"]
    tokenizers = {"tokenizer": components.tokenizer}
    if arch == "sdxl":
        tokenizers["tokenizer_2"] = components.text_encoder.tokenizer_2
    for name, tokenizer in tokenizers.items():
        expected = CLIPTokenizer.from_pretrained(source / name)
        assert tokenizer.get_vocab() == expected.get_vocab()
        assert tokenizer.pad_token == expected.pad_token
    result = Trainer(config).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    run_dir = next((tmp_path / "out" / "tiny-demo").iterdir())
    assert list(run_dir.glob("samples/*"))
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    written = convert_checkpoint(checkpoint, tmp_path / "trained.safetensors")
    assert_same_weights(UNet2DConditionModel.from_pretrained(checkpoint / "unet"),
                        load_single_file_components(written).unet)


def test_single_file_model_trains_two_steps_and_its_checkpoint_converts(tmp_path, tiny_model, tiny_file,
                                                                        class_images, source_pipeline):
    from engine.checkpoints import list_checkpoints, read_meta
    from engine.train import Trainer

    model_file = shutil.copy(tiny_file, tmp_path / "tiny.safetensors")
    # Beside the file, a folder of the same name with the configs and tokenizer but no weights.
    shutil.copytree(tiny_model, tmp_path / "tiny", ignore=shutil.ignore_patterns("*.safetensors"))
    values = tiny_config(tmp_path / "out", **{
        "model": str(model_file), "trainer.max_steps": 2, "sampling.interval_steps": 0,
        "checkpoint.every_n_train_steps": 2, "data.concepts[0].class_set.auto_generate.enabled": False})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    run_dir = next((tmp_path / "out" / "tiny-demo").iterdir())
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    checkpoint = list_checkpoints(run_dir)[-1]
    assert read_meta(checkpoint)["base_model"] == str(model_file)

    written = convert_checkpoint(checkpoint, tmp_path / "trained.safetensors")
    loaded = load_single_file(written, tiny_model)
    assert_same_weights(source_pipeline.vae, loaded.vae)
    assert_same_weights(source_pipeline.text_encoder, loaded.text_encoder)
    from diffusers import UNet2DConditionModel

    assert_same_weights(UNet2DConditionModel.from_pretrained(checkpoint / "unet"), loaded.unet)
