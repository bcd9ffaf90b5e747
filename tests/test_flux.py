"""The Flux.1 family on the tiny FLUX.1-dev and -schnell stand-ins: the shipped real configs, T5's real
vocabulary, prompts encoded exactly as FluxPipeline encodes them, the transformer's packed input, samples
equal to FluxPipeline's, LoRA and full fine-tuning through the real Trainer, and the refusals."""
import json

import pytest
import torch

from engine import config as cfg
from engine import events, notices, paths
from engine.errors import UserError
from engine.models import t5_vocab
from engine.models.tiny import REAL_CONFIGS
from engine.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of sks toy", "", "(masterpiece:1.2), [blue sky]; a|b \\ c!! #tag", "café naïve 日本語 テスト 🙂",
           " ".join(f"word{i}" for i in range(40)),    # past CLIP's 77 tokens, within T5's
           " ".join(f"word{i}" for i in range(300))]   # past T5's 512 tokens too


@pytest.fixture(scope="module")
def tiny_flux(demo_cache):
    return paths.demo_model_dir("flux")


@pytest.fixture(scope="module")
def tiny_schnell(demo_cache):
    return paths.demo_model_dir("flux-schnell")


def _config(model, **values):
    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, **values})


def _real(name, component, file="config.json"):
    return json.loads((REAL_CONFIGS / name / component / file).read_text())


def test_the_shipped_configs_are_flux1s_own_and_dev_has_11_9_billion_parameters():
    from diffusers import FluxTransformer2DModel

    dev, schnell = _real("flux1-dev", "transformer"), _real("flux1-schnell", "transformer")
    assert (dev["guidance_embeds"], schnell["guidance_embeds"]) == (True, False)
    assert {k: v for k, v in dev.items() if k != "guidance_embeds"} == \
        {k: v for k, v in schnell.items() if k != "guidance_embeds"}
    assert (dev["num_layers"], dev["num_single_layers"], dev["num_attention_heads"] * dev["attention_head_dim"],
            dev["in_channels"], dev["joint_attention_dim"], dev["pooled_projection_dim"]) == (
        19, 38, 3072, 64, 4096, 768)
    assert sum(dev["axes_dims_rope"]) == dev["attention_head_dim"]
    clip, t5 = _real("flux1-dev", "text_encoder"), _real("flux1-dev", "text_encoder_2")
    assert (clip["bos_token_id"], clip["eos_token_id"], clip["pad_token_id"]) == (0, 2, 1)  # FLUX.1-dev's own quirk
    assert (t5["d_model"], t5["d_ff"], t5["num_layers"], t5["num_heads"], t5["vocab_size"], t5["feed_forward_proj"],
            t5["pad_token_id"], t5["eos_token_id"]) == (4096, 10240, 24, 64, 32128, "gated-gelu", 0, 1)
    vae = _real("flux1-dev", "vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"], vae["use_quant_conv"]) == (
        16, 0.3611, 0.1159, False)
    dev_schedule = _real("flux1-dev", "scheduler", "scheduler_config.json")
    schnell_schedule = _real("flux1-schnell", "scheduler", "scheduler_config.json")
    assert (dev_schedule["use_dynamic_shifting"], dev_schedule["shift"]) == (True, 3.0)
    assert (schnell_schedule["use_dynamic_shifting"], schnell_schedule["shift"]) == (False, 1.0)
    with torch.device("meta"):
        transformer = FluxTransformer2DModel.from_config(dev)
    assert abs(sum(p.numel() for p in transformer.parameters()) - 11.9e9) < 0.05e9


def test_t5s_vocabulary_is_installed_and_tokenizes_as_t5_v1_1():
    tokenizer = t5_vocab.t5_tokenizer(512)
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (32100, 0, 1, 2)
    # the example of transformers' T5 documentation, tokenized by google/t5-v1_1's SentencePiece model
    assert tokenizer("Studies have shown that owning a dog is good for you").input_ids == \
        [6536, 43, 2008, 24, 293, 53, 3, 9, 1782, 19, 207, 21, 25, 1]
    assert t5_vocab.install() == t5_vocab.tokenizer_file()  # present: nothing is downloaded


def test_the_c_array_decodes_to_its_bytes():
    source = 'static const unsigned char other[] = {0x41};\nstatic const unsigned char t5_tokenizer_json_str[] = {\n' \
             '    0x7b,\n    0x22, 0x61,\n    0x22, 0x3A, 0x31, 0x7d};\n'
    assert t5_vocab.decode_array(source) == b'{"a":1}'


@pytest.mark.parametrize("arch, t5_length", [("flux", 512), ("flux-schnell", 256)])
def test_prompts_reach_the_encoders_as_flux_pipeline_encode_prompt_sends_them(arch, t5_length, demo_cache):
    from diffusers import FluxPipeline

    from engine.data.dataset import Collate, tokenize
    from engine.models.family import family_for

    model = paths.demo_model_dir(arch)
    config = _config(model)
    family = family_for(config)
    assert family.name == "flux1"
    components = family.load(config)
    tokenizer = components.tokenizer
    assert (tokenizer.model_max_length, tokenizer.pad_token_id) == (77 + t5_length, 0)
    pipeline = FluxPipeline.from_pretrained(model)
    collate = Collate(tokenizer.pad_token_id, tokenizer.model_max_length, pad_to_max=config.pad_tokens)
    with torch.no_grad():
        for prompt in PROMPTS:
            example = {"input_ids": tokenize(tokenizer, prompt), "pixel_values": torch.zeros(1), "caption": prompt,
                       "path": "", "sample_key": 0, "time_ids": [0] * 6}
            ids = collate([{"instance": example}])["input_ids"]
            ours = family.encode_text(components.text_encoder, ids, config.clip_stop_at_layer)
            embeds, pooled, _ = pipeline.encode_prompt(prompt, None, device="cpu", max_sequence_length=t5_length)
            assert ours["encoder_hidden_states"].shape == (1, t5_length, 32)
            torch.testing.assert_close(ours["encoder_hidden_states"], embeds, atol=1e-6, rtol=0, msg=prompt)
            torch.testing.assert_close(ours["pooled_projections"], pooled, atol=1e-6, rtol=0, msg=prompt)


def test_the_transformer_sees_the_latents_packed_as_flux_pipeline_packs_them(tiny_flux):
    from diffusers import FluxPipeline

    from engine.models.flux import Flux1, image_ids, pack, unpack

    latents = torch.randn(2, 16, 6, 10)
    assert torch.equal(unpack(pack(latents), 6, 10), latents)
    assert torch.equal(pack(latents), FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(image_ids(6, 10, "cpu", torch.float32), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu",
                                                                                                      torch.float32))
    family = Flux1()
    components = family.load(_config(tiny_flux, flow={"guidance": 3.5}))
    assert family.guidance == 3.5
    conditioning = {"encoder_hidden_states": torch.randn(2, 7, 32), "pooled_projections": torch.randn(2, 32)}
    timesteps = torch.tensor([250.0, 875.0])
    with torch.no_grad():
        ours = family.predict(components.unet, latents, timesteps, conditioning, None)
        theirs = components.unet(
            hidden_states=FluxPipeline._pack_latents(latents, 2, 16, 6, 10), timestep=timesteps / 1000,
            guidance=torch.full((2,), 3.5), pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=conditioning["encoder_hidden_states"], txt_ids=torch.zeros(7, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32), return_dict=False)[0]
        other_guidance = components.unet(
            hidden_states=pack(latents), timestep=timesteps / 1000, guidance=torch.full((2,), 1.0),
            pooled_projections=conditioning["pooled_projections"],
            encoder_hidden_states=conditioning["encoder_hidden_states"], txt_ids=torch.zeros(7, 3),
            img_ids=image_ids(6, 10, "cpu", torch.float32), return_dict=False)[0]
    assert torch.equal(ours, FluxPipeline._unpack_latents(theirs, 6 * 8, 10 * 8, 8))
    assert not torch.allclose(theirs, other_guidance, atol=1e-4)  # the guidance value reaches the model


def test_a_sample_rendered_by_the_family_is_flux_pipelines_image(tiny_flux):
    from diffusers import FluxPipeline

    from engine.models.family import family_for
    from engine.sampling import PromptEncoder, render

    config = _config(tiny_flux)
    family = family_for(config)
    components = family.load(config)
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    options = dict(num_inference_steps=3, guidance_scale=2.5, width=64, height=48, output_type="np")
    ours = render(pipeline, encoder, ["a red circle"], [""], generator=torch.Generator().manual_seed(3), **options)
    reference = FluxPipeline.from_pretrained(tiny_flux)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a red circle", generator=torch.Generator().manual_seed(3), **options).images
    assert ours.shape == theirs.shape == (1, 48, 64, 3)
    assert abs(ours - theirs).max() < 1e-5
    other = render(pipeline, encoder, ["a red circle"], [""], generator=torch.Generator().manual_seed(3),
                   **{**options, "guidance_scale": 6.0})
    assert abs(ours - other).max() > 1e-3  # the sample's cfg_scale is dev's guidance


def _train(output_dir, **overrides):
    """Fine-tune the tiny FLUX.1-dev on the sample subject; the validation loss is scored on the same images
    with fixed timesteps and noise, so it is comparable across steps."""
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": "demo:tiny-flux", "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "sampling.interval_steps": 0, "optimizer.lr_scheduler.warmup.enabled": False,
        "validation.path": "demo:sample-data/instance", "validation.prompt": "sks toy", **overrides})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer.run_dir, [m["val_loss"] for m in metrics if "val_loss" in m]


def test_a_lora_on_the_transformer_lowers_the_loss_and_adapts_kohyas_modules(tmp_path, sample_data):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = _train(tmp_path, **{
        "network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "optimizer.params.lr": 1e-2,
        "trainer.max_steps": 12, "checkpoint.every_n_train_steps": 12, "validation.every_n_steps": 4})
    assert len(validation) == 3 and validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    adapted = {key.split(".lora_")[0] for key in load_file(checkpoint / "unet" / "adapter_model.safetensors")}
    assert adapted == {*(f"transformer_blocks.0.{m}" for m in (
        "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
        "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
        "ff_context.net.2")), *(f"single_transformer_blocks.0.{m}" for m in (
            "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out"))}


# Each block's modulation layer (BFL's img_mod, txt_mod and a single block's modulation) in diffusers' names,
# and in the kohya file's
MODULATION = {"transformer_blocks.0.norm1.linear": "lora_unet_double_blocks_0_img_mod_lin",
              "transformer_blocks.0.norm1_context.linear": "lora_unet_double_blocks_0_txt_mod_lin",
              "single_transformer_blocks.0.norm.linear": "lora_unet_single_blocks_0_modulation_lin"}


@pytest.mark.parametrize("modulation", [False, True], ids=["default", "modulation"])
def test_network_modulation_also_trains_each_blocks_modulation_layer(tmp_path, sample_data, modulation):
    """With network.modulation the modulation layers get adapters that train (their lora_B leaves zero) and
    reach the kohya file under kohya's names; without it they have none."""
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, _ = _train(tmp_path, **{
        "network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "network.modulation": modulation,
        "optimizer.params.lr": 1e-2, "trainer.max_steps": 2, "checkpoint.every_n_train_steps": 2,
        "validation.every_n_steps": 2})
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    weights = load_file(checkpoint / "unet" / "adapter_model.safetensors")
    kohya = load_file(checkpoint / "adapter.safetensors")
    adapted = {key.split(".lora_")[0] for key in weights}
    assert "transformer_blocks.0.attn.to_q" in adapted and "single_transformer_blocks.0.proj_out" in adapted
    if not modulation:
        assert not set(MODULATION) & adapted
        assert not any(key.startswith(tuple(MODULATION.values())) for key in kohya)
        return
    assert set(MODULATION) <= adapted
    for module, name in MODULATION.items():
        assert weights[f"{module}.lora_B.weight"].abs().max() > 0, module  # peft starts lora_B at zero
        assert torch.equal(kohya[f"{name}.lora_up.weight"], weights[f"{module}.lora_B.weight"]), name
        assert torch.equal(kohya[f"{name}.lora_down.weight"], weights[f"{module}.lora_A.weight"]), name


def test_network_modulation_is_refused_for_sd_which_has_no_modulation_layers(tmp_path, tiny_model):
    from engine.train import Trainer

    values = tiny_config(tmp_path, **{
        "model": str(tiny_model), "network.type": "lora", "network.modulation": True,
        "prior_preservation.enabled": False, "trainer.max_steps": 1, "sampling.interval_steps": 0,
        "data.concepts[0].class_set.auto_generate.enabled": False})
    result = Trainer(cfg.from_dict(values)).run()
    assert isinstance(result, events.Failed) and result.user_error, result
    assert result.error.startswith("config key 'network.modulation':"), result.error
    assert "\n" not in result.error.strip()


def test_full_fine_tuning_trains_the_transformer_and_clip_but_never_t5(tmp_path, sample_data, tiny_flux):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = _train(tmp_path, **{
        "train_text_encoder": True, "optimizer.params.lr": 1e-3, "trainer.max_steps": 8,
        "checkpoint.every_n_train_steps": 8, "validation.every_n_steps": 4})
    assert validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["text_encoder", "unet"]
    base = load_file(tiny_flux / "text_encoder" / "model.safetensors")
    trained = load_file(checkpoint / "text_encoder" / "model.safetensors")
    assert any(not torch.equal(base[k], trained[k]) for k in base)


@pytest.mark.parametrize("values, key", [
    ({"tokenizer": "demo:tiny-sd"}, "tokenizer"),
    ({"clip_stop_at_layer": 2}, "clip_stop_at_layer"),
    ({"train_text_encoder": True, "train_text_encoder_2": True}, "train_text_encoder_2"),
    ({"data": {"resolution": 72}}, "data.resolution"),
    ({"data": {"resolution": 64}, "aspect_ratio_bucket": {"enabled": True, "c_div": 8}}, "aspect_ratio_bucket.c_div"),
    ({"aspect_ratio_bucket": {"enabled": True, "manual": {"base_res": 512, "divisor": 72}}},
     "aspect_ratio_bucket.manual.divisor"),
    ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
    ({"text_encoder_2": "t5xxl_fp16.safetensors"}, "text_encoder_2"),  # a diffusers folder has its own
    ({"network": {"type": "lora", "conv_rank": 4, "conv_alpha": 4.0}}, "network.conv_rank"),
])
def test_what_flux_cannot_train_is_refused_naming_the_key(tiny_flux, values, key):
    from engine.models.family import family_for

    config = _config(tiny_flux, **values)
    family = family_for(config)
    with pytest.raises(UserError, match=f"config key '{key}'"):
        components = family.load(config)
        family.objective(config, components.noise_scheduler)


def test_guidance_is_refused_for_schnell_which_has_no_guidance_embedding(tiny_schnell):
    from engine.models.flux import Flux1

    family = Flux1()
    family.load(_config(tiny_schnell))
    assert family.guidance is None  # no guidance input at all
    with pytest.raises(UserError, match="config key 'flow.guidance'"):
        Flux1().load(_config(tiny_schnell, flow={"guidance": 3.5}))


def test_a_resolution_far_below_flux1s_warns_naming_the_key(tiny_flux):
    from engine.models.flux import Flux1

    for resolution, warns in ((64, True), (512, False)):
        warned = []
        with notices.collect(warned.append):
            Flux1().load(_config(tiny_flux, data={"resolution": resolution}))
        assert any("config key 'data.resolution'" in str(w) for w in warned) == warns, resolution


def test_the_vram_estimate_traces_a_flux_step_from_the_models_own_configs(tiny_flux):
    from safetensors.torch import load_file

    from engine import vram

    values = {"network": {"type": "lora", "rank": 4}, "data": {"resolution": 64}}
    architecture = vram.resolve_architecture(_config(tiny_flux, **values))
    assert (architecture.family, architecture.unet["_class_name"]) == ("flux1", "FluxTransformer2DModel")
    assert vram.guess_architecture("flux1-schnell-fp8.safetensors") == "flux1-schnell"
    estimate = vram.estimate(_config(tiny_flux, **values))
    # with cached embeddings both encoders wait off the GPU; the step still gets their outputs' shapes
    cached = vram.estimate(_config(tiny_flux, cache={"text_embeddings": True}, **values))
    encoders = sum(t.numel() * 4 for name in ("text_encoder", "text_encoder_2")
                   for t in load_file(tiny_flux / name / "model.safetensors").values()) / vram.GIB
    assert estimate.parameters - cached.parameters == pytest.approx(encoders, rel=1e-3)


def test_a_single_flux_file_loads_through_the_single_file_loader_with_the_configs_encoder_files(
        tiny_flux, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel

    from engine.models import single_file
    from engine.models.family import family_for

    checkpoint = tmp_path / "flux1-dev.safetensors"
    checkpoint.write_bytes(b"")
    calls = []

    def load_flux_files(path, text_encoder, text_encoder_2, vae, dtypes):
        calls.append((path, text_encoder, text_encoder_2, vae, dtypes))
        return {"transformer": FluxTransformer2DModel.from_pretrained(tiny_flux / "transformer"),
                "text_encoder": CLIPTextModel.from_pretrained(tiny_flux / "text_encoder"),
                "text_encoder_2": T5EncoderModel.from_pretrained(tiny_flux / "text_encoder_2"),
                "vae": AutoencoderKL.from_pretrained(tiny_flux / "vae")}

    monkeypatch.setattr(single_file, "read_shapes", lambda path: {})
    monkeypatch.setattr(single_file, "detect_family", lambda shapes: "flux1")
    monkeypatch.setattr(single_file, "load_flux_files", load_flux_files, raising=False)
    config = _config(checkpoint, text_encoder="clip_l.safetensors", text_encoder_2="t5xxl_fp16.safetensors",
                     vae="ae.safetensors", base_dtype="fp8", network={"type": "lora"})
    family = family_for(config)
    components = family.load(config)
    # an adapter run over a base stored in fp8 reads the transformer and the frozen encoders in bf16
    bf16, fp32 = torch.bfloat16, torch.float32
    assert calls == [(str(checkpoint), "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors",
                      {"transformer": bf16, "text_encoder": bf16, "text_encoder_2": bf16, "vae": fp32})]
    assert (family.name, family.guidance, components.tokenizer.model_max_length) == ("flux1", 1.0, 77 + 512)
    assert components.noise_scheduler.config.use_dynamic_shifting  # dev's shipped schedule


def test_install_writes_the_tokenizer_decoded_from_the_sdist_and_refuses_another_file(tmp_path, monkeypatch):
    import hashlib
    import io
    import tarfile

    vocabulary = t5_vocab.tokenizer_file().read_bytes()
    source = ("static const unsigned char t5_tokenizer_json_str[] = {\n"
              + ",\n".join(f"    0x{byte:02x}" for byte in vocabulary) + "};\n").encode("ascii")
    sdist = tmp_path / "stable_diffusion_cpp_python-0.4.7.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        member = tarfile.TarInfo("stable_diffusion_cpp_python-0.4.7/" + t5_vocab.MEMBER)
        member.size = len(source)
        archive.addfile(member, io.BytesIO(source))
    monkeypatch.setattr(t5_vocab, "install_dir", lambda: tmp_path / "share")
    with pytest.raises(ValueError, match="sha256"):
        t5_vocab.install(sdist)
    monkeypatch.setattr(t5_vocab, "SDIST_SHA256", hashlib.sha256(sdist.read_bytes()).hexdigest())
    assert t5_vocab.install(sdist).read_bytes() == vocabulary
    assert [p.name for p in (tmp_path / "share").iterdir()] == ["tokenizer.json"]  # no partial file left
