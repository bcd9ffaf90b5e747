"""The Chroma family on the tiny Chroma1-HD stand-in: the shipped real configs, prompts and masks encoded as
ChromaPipeline encodes them, the transformer's packed and masked input, samples equal to ChromaPipeline's,
LoRA and full fine-tuning through the real Trainer, the model's own timestep shift, and the refusals; the
adapter file judged by ComfyUI's key map and ChromaPipeline's LoRA loader, and the converted transformer file
by diffusers' single-file loader and the family's own."""
import json
import math

import pytest
import torch

from engine import config as cfg
from engine import events, paths
from engine.errors import UserError
from engine.models.tiny import REAL_CONFIGS
from engine.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of sks toy", "", "(masterpiece:1.2), [blue sky]; a|b \\ c!! #tag", "café naïve 日本語 🙂",
           " ".join(f"word{i}" for i in range(300))]  # past T5's 512 tokens: no padding token left to keep


@pytest.fixture(scope="module")
def tiny_chroma(demo_cache):
    return paths.demo_model_dir("chroma")


def _config(model, **values):
    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, **values})


def _real(component, file="config.json"):
    return json.loads((REAL_CONFIGS / "chroma" / component / file).read_text())


def test_the_shipped_configs_are_chroma1_hds_own_and_it_has_8_9_billion_parameters():
    """The transformer's numbers are diffusers' ChromaTransformer2DModel defaults, which are Chroma1-HD's (and
    ComfyUI's model_detection reads the same from the file: 19 double and 38 single blocks, a 64 -> 5120 x 5
    -> 3072 modulation network); T5 and the VAE are FLUX.1's, and so is the schedule ChromaPipeline shifts by
    resolution. The model card says 8.9 B parameters."""
    from diffusers import ChromaTransformer2DModel

    transformer = _real("transformer")
    assert (transformer["num_layers"], transformer["num_single_layers"],
            transformer["num_attention_heads"] * transformer["attention_head_dim"], transformer["in_channels"],
            transformer["joint_attention_dim"], transformer["approximator_num_channels"],
            transformer["approximator_hidden_dim"], transformer["approximator_layers"]) == (
        19, 38, 3072, 64, 4096, 64, 5120, 5)
    assert "pooled_projection_dim" not in transformer and "guidance_embeds" not in transformer
    flux = REAL_CONFIGS / "flux1-dev"
    assert _real("text_encoder") == json.loads((flux / "text_encoder_2" / "config.json").read_text())
    assert _real("vae") == json.loads((flux / "vae" / "config.json").read_text())
    schedule = _real("scheduler", "scheduler_config.json")
    assert (schedule["use_dynamic_shifting"], schedule["base_shift"], schedule["max_shift"]) == (True, 0.5, 1.15)
    with torch.device("meta"):
        model = ChromaTransformer2DModel.from_config(transformer)
    assert sum(p.numel() for p in model.parameters()) == 8_899_983_424  # 8.9 B
    # the modulation table: 3 per single block, 6 per stream of each double block, 2 for the last layer
    assert model.time_text_embed.mod_proj.shape[0] == 3 * 38 + 2 * 6 * 19 + 2 == 344


def test_the_family_is_recognised_from_the_folder_and_by_name(tiny_chroma):
    from engine.models.family import family_for, family_named

    assert family_for(_config(tiny_chroma)).name == "chroma"
    assert family_named("chroma").name == "chroma"
    assert family_for(_config(paths.demo_model_dir("flux-schnell"))).name == "flux1"


def test_prompts_and_masks_are_chroma_pipeline_encode_prompts(tiny_chroma):
    from diffusers import ChromaPipeline

    from engine.data.dataset import Collate, tokenize
    from engine.models.family import family_for

    config = _config(tiny_chroma)
    family = family_for(config)
    components = family.load(config)
    tokenizer = components.tokenizer
    assert (tokenizer.model_max_length, tokenizer.pad_token_id) == (512, 0)
    pipeline = ChromaPipeline.from_pretrained(tiny_chroma)
    collate = Collate(tokenizer.pad_token_id, tokenizer.model_max_length, pad_to_max=False)
    with torch.no_grad():
        for prompt in PROMPTS:
            example = {"input_ids": tokenize(tokenizer, prompt), "pixel_values": torch.zeros(1), "caption": prompt,
                       "path": "", "sample_key": 0, "time_ids": [0] * 6}
            ids = collate([{"instance": example}])["input_ids"]
            ours = family.encode_text(components.text_encoder, ids, config.clip_stop_at_layer)
            embeds, _, mask, *_ = pipeline.encode_prompt(prompt, None, device="cpu",
                                                         do_classifier_free_guidance=False)
            assert ours["encoder_hidden_states"].shape == (1, 512, 32)
            torch.testing.assert_close(ours["encoder_hidden_states"], embeds, atol=1e-6, rtol=0, msg=prompt)
            assert ours["attention_mask"].dtype == torch.bool
            assert torch.equal(ours["attention_mask"], mask.bool()), prompt
    # "" is T5's end token: it and one padding token are attended to
    assert mask.sum() == 512 and ours["attention_mask"].sum() == 512
    empty = family.encode_text(components.text_encoder, torch.tensor([tokenize(tokenizer, "")]), 1)
    assert empty["attention_mask"][0, :3].tolist() == [True, True, False]


def _conditioning(batch=2, length=7):
    hidden = torch.randn(batch, length, 32)
    mask = torch.arange(length) <= torch.tensor([[2], [4]])
    return {"encoder_hidden_states": hidden, "attention_mask": mask}


def test_the_transformer_sees_packed_latents_and_the_mask_as_chroma_pipeline_passes_them(tiny_chroma):
    from diffusers import ChromaPipeline

    from engine.models.chroma import Chroma

    family = Chroma()
    components = family.load(_config(tiny_chroma))
    latents, timesteps = torch.randn(2, 16, 6, 10), torch.tensor([250.0, 875.0])
    conditioning = _conditioning()
    pipeline = ChromaPipeline.from_pretrained(tiny_chroma)
    image_tokens = 3 * 5
    mask = pipeline._prepare_attention_mask(2, image_tokens, torch.float32, conditioning["attention_mask"])

    def theirs(mask):
        return components.unet(
            hidden_states=ChromaPipeline._pack_latents(latents, 2, 16, 6, 10), timestep=timesteps / 1000,
            encoder_hidden_states=conditioning["encoder_hidden_states"], txt_ids=torch.zeros(7, 3),
            img_ids=ChromaPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32), attention_mask=mask,
            return_dict=False)[0]

    with torch.no_grad():
        ours = family.predict(components.unet, latents, timesteps, conditioning, None)
        masked, unmasked = theirs(mask), theirs(None)
        # a row whose conditioning uncond.cond: zeros dropped, mask included, attends to all its tokens
        kept = torch.tensor([False, True])
        dropped = {name: value * kept.view(-1, *[1] * (value.dim() - 1)).to(value.dtype)
                   for name, value in conditioning.items()}
        ours_dropped = family.predict(components.unet, latents, timesteps, dropped, None)
    assert torch.equal(ours, ChromaPipeline._unpack_latents(masked, 6 * 8, 10 * 8, 8))
    assert not torch.allclose(masked, unmasked, atol=1e-4)  # the mask reaches the model
    assert torch.isfinite(ours_dropped).all()
    assert torch.equal(ours_dropped[1], ours[1])


def test_a_sample_rendered_by_the_family_is_chroma_pipelines_image(tiny_chroma):
    """ChromaPipeline, given its own encode_prompt's embeddings and masks (as booleans), renders the same
    image from the same latents; the sample's cfg_scale is its true classifier-free guidance."""
    from diffusers import ChromaPipeline

    from engine.models.family import family_for
    from engine.sampling import PromptEncoder, render

    config = _config(tiny_chroma)
    family = family_for(config)
    components = family.load(config)
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    options = dict(num_inference_steps=3, guidance_scale=2.5, width=64, height=48, output_type="np")
    ours = render(pipeline, encoder, ["a red circle"], ["blurry"], generator=torch.Generator().manual_seed(3),
                  **options)
    reference = ChromaPipeline.from_pretrained(tiny_chroma)
    reference.set_progress_bar_config(disable=True)
    embeds, _, mask, negative, _, negative_mask = reference.encode_prompt("a red circle", "blurry", device="cpu")
    theirs = reference(prompt_embeds=embeds, prompt_attention_mask=mask.bool(), negative_prompt_embeds=negative,
                       negative_prompt_attention_mask=negative_mask.bool(),
                       generator=torch.Generator().manual_seed(3), **options).images
    assert ours.shape == theirs.shape == (1, 48, 64, 3)
    assert abs(ours - theirs).max() < 1e-5
    other = render(pipeline, encoder, ["a red circle"], ["blurry"], generator=torch.Generator().manual_seed(3),
                   **{**options, "guidance_scale": 6.0})
    assert abs(ours - other).max() > 1e-3


def test_the_default_timestep_shift_is_chroma_pipelines_resolution_shift(tiny_chroma):
    from diffusers.pipelines.chroma.pipeline_chroma import calculate_shift

    from engine.models.family import family_for

    config = _config(tiny_chroma)
    family = family_for(config)
    objective = family.objective(config, family.load(config).noise_scheduler)
    schedule = _real("scheduler", "scheduler_config.json")
    for side, tokens in ((128, 4096), (64, 1024)):  # 1024 px and 512 px
        expected = math.exp(calculate_shift(tokens, schedule["base_image_seq_len"], schedule["max_image_seq_len"],
                                            schedule["base_shift"], schedule["max_shift"]))
        assert objective.shift_for((16, side, side)) == pytest.approx(expected, rel=1e-9)
    assert objective.shift_for((16, 128, 128)) == pytest.approx(math.exp(1.15))


def _train(output_dir, **overrides):
    """Train the tiny Chroma on the sample subject; the validation loss is scored on the same images with fixed
    timesteps and noise, so it is comparable across steps."""
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": "demo:tiny-chroma", "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "sampling.interval_steps": 0, "optimizer.lr_scheduler.warmup.enabled": False,
        "validation.path": "demo:sample-data/instance", "validation.prompt": "sks toy", **overrides})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer.run_dir, [m["val_loss"] for m in metrics if "val_loss" in m]


def test_a_lora_on_the_transformer_lowers_the_loss(tmp_path, sample_data):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = _train(tmp_path, **{
        "network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "optimizer.params.lr": 1e-2,
        "trainer.max_steps": 12, "checkpoint.every_n_train_steps": 12, "validation.every_n_steps": 4})
    assert len(validation) == 3 and validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    adapted = {key.split(".lora_")[0] for key in load_file(checkpoint / "unet" / "adapter_model.safetensors")}
    assert "transformer_blocks.0.attn.to_q" in adapted and "single_transformer_blocks.0.proj_out" in adapted
    assert not any(name.startswith("distilled_guidance_layer") for name in adapted)
    # --merge: the base transformer with the adapter merged in, in BFL's layout
    from engine.models import keymap_flux
    from engine.models.convert import convert_checkpoint

    merged = load_file(convert_checkpoint(checkpoint, tmp_path / "merged.safetensors", adapter_output="merged"))
    base = keymap_flux.to_original(load_file(paths.demo_model_dir("chroma") / "transformer" /
                                             "diffusion_pytorch_model.safetensors"))
    assert merged.keys() == base.keys()
    untouched, adapted = "distilled_guidance_layer.in_proj.weight", "double_blocks.0.img_attn.qkv.weight"
    assert torch.equal(merged[untouched], base[untouched]) and not torch.equal(merged[adapted], base[adapted])


def test_full_fine_tuning_trains_the_transformer_with_cached_embeddings(tmp_path, sample_data, tiny_chroma):
    """The text cache stores both parts (hidden states and mask); the transformer trains, T5 never does."""
    from safetensors.torch import load_file

    from engine import checkpoints

    from safetensors import safe_open

    from engine.data.cache import ids_key
    from engine.models import t5_vocab

    run_dir, validation = _train(tmp_path, **{
        "optimizer.params.lr": 1e-3, "trainer.max_steps": 8, "cache.text_embeddings": True,
        "cache.dir": str(tmp_path / "cache"), "checkpoint.every_n_train_steps": 8, "validation.every_n_steps": 4})
    assert validation[-1] < validation[0] - 0.02, validation
    caption = t5_vocab.t5_tokenizer(512)("sks toy").input_ids  # its tokens and its end token
    key = ids_key(caption, t5_vocab.PAD_ID)
    (shard,) = (tmp_path / "cache").glob("text-*/*.safetensors")
    with safe_open(shard, "pt") as cached:
        mask, hidden = (cached.get_tensor(f"{key}/{part}") for part in ("attention_mask", "encoder_hidden_states"))
    assert hidden.shape == (512, 32) and mask.dtype == torch.bool
    assert mask.tolist() == [True] * (len(caption) + 1) + [False] * (512 - len(caption) - 1)  # and one pad
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    base = load_file(tiny_chroma / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    assert not torch.equal(base["distilled_guidance_layer.in_proj.weight"],
                           trained["distilled_guidance_layer.in_proj.weight"])


@pytest.mark.parametrize("values, key", [
    ({"tokenizer": "demo:tiny-sd"}, "tokenizer"),
    ({"clip_stop_at_layer": 2}, "clip_stop_at_layer"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"flow": {"guidance": 3.5}}, "flow.guidance"),
    ({"data": {"resolution": 72}}, "data.resolution"),
    ({"text_encoder": "t5xxl_fp16.safetensors"}, "text_encoder"),  # a diffusers folder has its own
    ({"network": {"type": "lora", "conv_rank": 4, "conv_alpha": 4.0}}, "network.conv_rank"),
    ({"network": {"type": "lora", "modulation": True}}, "network.modulation"),
    ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
])
def test_what_chroma_cannot_train_is_refused_naming_the_key(tiny_chroma, values, key):
    from engine.models.family import family_for

    config = _config(tiny_chroma, **values)
    family = family_for(config)
    with pytest.raises(UserError, match=f"config key '{key}'"):
        components = family.load(config)
        family.objective(config, components.noise_scheduler)


# -- the kohya adapter file: Flux.1's layout, read by ComfyUI and by ChromaPipeline's LoRA loader --------------
# narrow and two blocks deep; a full-width single block for diffusers' kohya converter, which splits a single
# block's fused linear1 at Flux.1's width (see tests/test_flux_files.py)
NARROW = dict(patch_size=1, in_channels=64, num_layers=2, num_single_layers=2, attention_head_dim=8,
              num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(2, 2, 4), approximator_num_channels=16,
              approximator_hidden_dim=16, approximator_layers=1)
FULL_WIDTH_SINGLE = dict(NARROW, num_layers=0, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                         axes_dims_rope=(16, 56, 56))


def chroma_model(seed: int = 0, **config):
    """A random ChromaTransformer2DModel, built on the CPU: its modulation-index table is a buffer that the
    state dict does not hold."""
    from diffusers import ChromaTransformer2DModel
    from test_flux_files import filled

    return filled(ChromaTransformer2DModel(**{**NARROW, **config}), seed)


def chroma_output(model, seed: int = 5):
    """The transformer on a fixed small input: 4 image tokens, 3 text tokens."""
    config = model.config
    generator = torch.Generator().manual_seed(seed)
    hidden = torch.randn(1, 4, config.in_channels, generator=generator)
    text = torch.randn(1, 3, config.joint_attention_dim, generator=generator)
    image_ids = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1]], dtype=torch.float32)
    with torch.no_grad():
        return model(hidden_states=hidden, encoder_hidden_states=text, timestep=torch.tensor([0.4]),
                     img_ids=image_ids, txt_ids=torch.zeros(3, 3)).sample


@pytest.mark.parametrize("network_type", ["lora", "dora", "loha", "lokr"])
def test_comfyui_maps_every_key_of_the_file_and_computes_the_adapted_weights(network_type):
    from client_formulas import comfyui_chroma_lora_keys
    from test_flux_files import adapt, comfyui_patched, merged, settings, sizes

    from engine.models import keymap_flux
    from engine.models.kohya import base_model_version, to_kohya

    config = settings(network_type)
    model = adapt(chroma_model(), config.network)
    assert base_model_version(config, {"unet": model}) == "chroma"
    file = to_kohya({"unet": model}, config)
    names = {key.partition(".")[0] for key in file}
    assert not any("distilled_guidance_layer" in name or "_mod_" in name for name in names)
    base = keymap_flux.to_original(chroma_model().state_dict())
    assert "distilled_guidance_layer.norms.0.scale" in base and "double_blocks.1.img_mod.lin.weight" not in base
    patched, loaded = comfyui_patched(file, base, comfyui_chroma_lora_keys(base, *sizes(model)))
    assert loaded == set(file), f"ComfyUI leaves keys unloaded: {sorted(set(file) - loaded)[:3]}"
    want = keymap_flux.to_original(merged(model).state_dict())
    assert max((want[key] - base[key]).abs().max().item() for key in want) > 1e-3
    for key in want:
        assert (patched[key] - want[key]).abs().max().item() <= 1e-5, key


@pytest.mark.parametrize("config", [dict(num_single_layers=0), FULL_WIDTH_SINGLE],
                         ids=["double-blocks", "full-width-single-block"])
def test_chroma_pipelines_load_lora_weights_reads_every_key_to_the_merged_models_output(config):
    from diffusers import ChromaPipeline
    from peft.tuners.tuners_utils import BaseTunerLayer
    from test_adapter_convert import library_messages
    from test_flux_files import adapt, merged, settings, targets

    from engine.models.kohya import to_kohya

    network = settings("lora")
    model = adapt(chroma_model(**config), network.network)
    file = to_kohya({"unet": model}, network)
    pipeline = ChromaPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None,
                              transformer=chroma_model(**config))
    with library_messages() as messages:
        pipeline.load_lora_weights(dict(file))
    # the loader also looks for CLIP keys (Flux.1's text encoder), which a Chroma file has none of
    assert [m for m in messages if "prefix='text_encoder'" not in m] == [], messages
    adapted = {name for name, m in pipeline.transformer.named_modules() if isinstance(m, BaseTunerLayer)}
    assert adapted == set(targets(model))
    want = chroma_output(merged(model))
    assert (want - chroma_output(chroma_model(**config))).abs().max().item() > 1e-3
    assert (chroma_output(pipeline.transformer) - want).abs().max().item() <= 1e-4


# -- Chroma as ComfyUI users keep it: the transformer alone in BFL's layout, T5-XXL and ae.safetensors beside it -
# one block of each kind at Chroma's full width, which diffusers' Chroma converter assumes
FULL_WIDTH = dict(NARROW, num_layers=1, num_single_layers=1, attention_head_dim=128, num_attention_heads=24,
                  axes_dims_rope=(16, 56, 56))


def test_a_full_run_converts_to_the_file_comfyui_loads_and_the_family_trains_from_again(tiny_chroma, tmp_path):
    """A full fine-tune's transformer (the checkpoint's unet/) becomes one BFL-layout file without prefix,
    told from Flux.1 by its modulation network, which diffusers' single-file loader and the family's own
    loader (with T5-XXL and the autoencoder as separate files) read back bit-equal."""
    from diffusers import ChromaTransformer2DModel
    from safetensors.torch import load_file
    from test_adapter_convert import library_messages
    from test_flux_files import assert_loaded, comfyui_parts, save, tiny_t5, tiny_vae

    from engine.models.convert import convert_checkpoint
    from engine.models.family import family_for
    from engine.models.single_file import detect_family, read_shapes

    model = chroma_model(**FULL_WIDTH).to(torch.bfloat16)
    checkpoint = tmp_path / "run" / "checkpoints" / "step-00000002"
    model.save_pretrained(checkpoint / "unet")
    (checkpoint / "meta.json").write_text(json.dumps({"step": 2, "epoch": 0, "base_model": str(tiny_chroma),
                                                      "trained": ["unet"], "network": "full"}))
    written = convert_checkpoint(checkpoint, tmp_path / "out", unet_dtype="bf16")
    tensors = load_file(written)
    assert {"distilled_guidance_layer.norms.0.scale", "double_blocks.0.img_attn.qkv.weight",
            "single_blocks.0.linear1.weight", "final_layer.linear.weight"} <= tensors.keys()
    assert not any("_mod" in key or key.startswith(("vector_in", "guidance_in")) for key in tensors)
    assert {tensor.dtype for tensor in tensors.values()} == {torch.bfloat16}
    assert detect_family(read_shapes(written)) == "chroma"
    model.save_config(tmp_path / "configs" / "transformer")
    with library_messages() as messages:
        loaded = ChromaTransformer2DModel.from_single_file(str(written), config=str(tmp_path / "configs"),
                                                           subfolder="transformer", local_files_only=True,
                                                           torch_dtype=torch.bfloat16)
    assert not [m for m in messages if any(w in m.lower() for w in ("unexpected", "missing", "not used"))]
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(loaded.state_dict()[key], want[key]) for key in want)

    encoders = {"text_encoder": tiny_t5(), "vae": tiny_vae()}
    parts = comfyui_parts({"transformer": model, **encoders})
    files = {name: save(tmp_path / f"{name}.safetensors", parts[name]) for name in encoders}
    config = _config(written, **{name: str(file) for name, file in files.items()})
    family = family_for(config)
    assert family.name == "chroma"
    components = family.load(config)
    assert components.tokenizer.model_max_length == 512 and components.noise_scheduler.config.use_dynamic_shifting
    assert_loaded({"transformer": components.unet, "text_encoder": components.text_encoder,
                   "vae": components.vae}, {"transformer": model, **encoders})
    with pytest.raises(UserError, match="config key 'text_encoder': .* holds no text encoder"):
        family.load(_config(written, vae=str(files["vae"])))
    with pytest.raises(UserError, match="config key 'vae': .* holds no vae"):
        family.load(_config(written, text_encoder=str(files["text_encoder"])))
