"""The FLUX.2 [klein] family on its tiny 4B stand-in: the shipped real configs (4B and 9B), Qwen3's tokens and
turn format, prompts encoded exactly as Flux2KleinPipeline.encode_prompt encodes them, the latents normalised
and packed as the pipeline does, samples equal to the pipeline's, LoRA and full fine-tuning through the real
Trainer, and the refusals."""
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

PROMPTS = ["a photo of sks toy", "", "(masterpiece:1.2), [blue sky]; a|b \\ c!! #tag", "café naïve 日本語 テスト 🙂",
           " ".join(f"word{i}" for i in range(300))]  # past the 512 tokens


@pytest.fixture(scope="module")
def tiny_klein(demo_cache):
    return paths.demo_model_dir("flux2-klein")


def _config(model, **values):
    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, **values})


def _real(name, component, file="config.json"):
    return json.loads((REAL_CONFIGS / name / component / file).read_text())


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize("arch, transformer_size, qwen, qwen_size", [
    ("flux2-klein-4b", 3.876e9, (2560, 9728, True), 4.022e9),
    ("flux2-klein-9b", 9.079e9, (4096, 12288, False), 8.191e9)], ids=["4b", "9b"])
def test_the_shipped_configs_are_kleins_own_with_their_real_parameter_counts(arch, transformer_size, qwen,
                                                                             qwen_size):
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    transformer, text_encoder = _real(arch, "transformer"), _real(arch, "text_encoder")
    assert (transformer["in_channels"], transformer["guidance_embeds"], transformer["patch_size"],
            sum(transformer["axes_dims_rope"])) == (128, False, 1, transformer["attention_head_dim"])
    # the transformer reads three Qwen3 hidden states side by side
    assert transformer["joint_attention_dim"] == 3 * text_encoder["hidden_size"]
    assert (text_encoder["hidden_size"], text_encoder["intermediate_size"], text_encoder["tie_word_embeddings"]) == qwen
    assert (text_encoder["num_hidden_layers"], text_encoder["vocab_size"], text_encoder["eos_token_id"]) == (
        36, 151936, 151645)
    assert _real(arch, "vae") == {"_class_name": "AutoencoderKLFlux2", **json.loads(json.dumps(
        {k: v for k, v in AutoencoderKLFlux2.from_config({}).config.items() if not k.startswith("_")}))}
    schedule = _real(arch, "scheduler", "scheduler_config.json")
    assert (schedule["use_dynamic_shifting"], schedule["shift"]) == (True, 3.0)
    assert json.loads((REAL_CONFIGS / arch / "model_index.json").read_text())["is_distilled"] is True
    with torch.device("meta"):
        assert abs(_count(Flux2Transformer2DModel.from_config(transformer)) - transformer_size) < 0.001e9
        assert abs(_count(Qwen3ForCausalLM(Qwen3Config.from_dict(text_encoder))) - qwen_size) < 0.001e9


def test_captions_become_qwen3s_user_turn_with_thinking_off_in_qwens_real_ids(tiny_klein):
    from engine.models.flux2_klein import KleinTokenizer
    from engine.models.qwen3_text import load_qwen_tokenizer

    qwen = load_qwen_tokenizer(tiny_klein / "tokenizer", "FLUX.2 [klein]")
    tokenizer = KleinTokenizer(qwen)
    assert tokenizer.turn("a cat") == \
        "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert [qwen.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>",
                                                    "</think>")] == [151643, 151644, 151645, 151667, 151668]
    ids = tokenizer("a cat").input_ids
    # <|im_start|> user \n a cat <|im_end|> \n <|im_start|> assistant \n <think> \n\n </think> \n\n, then padding
    assert ids[:15] == [151644, 872, 198, 64, 8251, 151645, 198, 151644, 77091, 198, 151667, 271, 151668, 271,
                        151643]
    assert len(ids) == 512 and set(ids[14:]) == {151643}
    with pytest.raises(ValueError):
        tokenizer("a cat", max_length=77)


def test_prompts_are_encoded_as_flux2_klein_pipeline_encode_prompt_encodes_them(tiny_klein):
    from diffusers import Flux2KleinPipeline

    from engine.data.dataset import Collate, tokenize
    from engine.models.family import family_for

    config = _config(tiny_klein)
    family = family_for(config)
    assert family.name == "flux2-klein"
    components = family.load(config)
    tokenizer = components.tokenizer
    assert (tokenizer.model_max_length, tokenizer.pad_token_id) == (512, 151643)
    pipeline = Flux2KleinPipeline.from_pretrained(tiny_klein)
    for pad in (True, False):  # the ids are always 512 long, as the pipeline's
        collate = Collate(tokenizer.pad_token_id, tokenizer.model_max_length, pad_to_max=pad)
        with torch.no_grad():
            for prompt in PROMPTS:
                example = {"input_ids": tokenize(tokenizer, prompt), "pixel_values": torch.zeros(1),
                           "caption": prompt, "path": "", "sample_key": 0, "time_ids": [0] * 6}
                ids = collate([{"instance": example}])["input_ids"]
                ours = family.encode_text(components.text_encoder, ids, config.clip_stop_at_layer)
                theirs, _ = pipeline.encode_prompt(prompt, device="cpu")
                assert ours["encoder_hidden_states"].shape == (1, 512, 96)
                torch.testing.assert_close(ours["encoder_hidden_states"], theirs, atol=1e-6, rtol=0, msg=prompt)


def test_the_transformer_sees_the_latents_normalised_and_packed_as_the_pipeline_does(tiny_klein):
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel

    from engine.models.flux2_klein import Flux2Klein, image_ids, normalized_latents, text_ids

    latents = torch.randn(2, 32, 6, 10)
    vae = AutoencoderKLFlux2.from_pretrained(tiny_klein / "vae")
    assert vae.bn.running_mean.abs().max() > 0.1  # the tiny model's statistics are not the identity's
    # the pipeline's normalisation of an encoded image (Flux2KleinPipeline._encode_vae_image after the encoder)
    patches = Flux2KleinPipeline._patchify_latents(latents)
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    normalised = normalized_latents(vae, latents)
    torch.testing.assert_close(Flux2KleinPipeline._patchify_latents(normalised), (patches - mean) / std)
    # and back, as the pipeline does before decoding
    torch.testing.assert_close(Flux2KleinPipeline._unpatchify_latents(
        Flux2KleinPipeline._patchify_latents(normalised) * std + mean), latents, atol=1e-5, rtol=0)

    transformer = Flux2Transformer2DModel.from_pretrained(tiny_klein / "transformer")
    hidden = torch.randn(2, 7, 96)
    timesteps = torch.tensor([250.0, 875.0])
    packed = Flux2KleinPipeline._pack_latents(Flux2KleinPipeline._patchify_latents(latents))
    latent_ids = Flux2KleinPipeline._prepare_latent_ids(Flux2KleinPipeline._patchify_latents(latents))
    assert torch.equal(image_ids(6, 10, "cpu"), latent_ids[0])
    assert torch.equal(text_ids(7, "cpu"), Flux2KleinPipeline._prepare_text_ids(hidden)[0])
    with torch.no_grad():
        ours = Flux2Klein().predict(transformer, latents, timesteps, {"encoder_hidden_states": hidden}, None)
        theirs = transformer(hidden_states=packed, timestep=timesteps / 1000, guidance=None,
                             encoder_hidden_states=hidden, txt_ids=Flux2KleinPipeline._prepare_text_ids(hidden),
                             img_ids=latent_ids, return_dict=False)[0]
    unpacked = Flux2KleinPipeline._unpack_latents_with_ids(theirs, latent_ids, 3, 5)
    assert torch.equal(ours, Flux2KleinPipeline._unpatchify_latents(unpacked))


@pytest.mark.parametrize("distilled, guidance", [(True, 1.0), (False, 4.0)], ids=["distilled", "base-cfg"])
def test_a_sample_rendered_by_the_family_is_the_pipelines_image(tiny_klein, distilled, guidance):
    from diffusers import Flux2KleinPipeline

    from engine.models.family import family_for
    from engine.sampling import PromptEncoder, render

    config = _config(tiny_klein)
    family = family_for(config)
    components = family.load(config)
    family.distilled = distilled
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    options = dict(num_inference_steps=3, guidance_scale=guidance, width=64, height=48, output_type="np")
    ours = render(pipeline, encoder, ["a red circle"], [""], generator=torch.Generator().manual_seed(3), **options)
    reference = Flux2KleinPipeline.from_pretrained(tiny_klein, is_distilled=distilled)
    reference.set_progress_bar_config(disable=True)
    theirs = reference(prompt="a red circle", generator=torch.Generator().manual_seed(3), **options).images
    assert ours.shape == theirs.shape == (1, 48, 64, 3)
    assert abs(ours - theirs).max() < 1e-5
    if not distilled:  # the negative prompt's embeddings take part in the base model's guidance
        other = render(pipeline, encoder, ["a red circle"], ["a blue square"],
                       generator=torch.Generator().manual_seed(3), **options)
        assert abs(ours - other).max() > 1e-3


def test_the_default_timestep_shift_is_the_models_resolution_dependent_one(tiny_klein):
    from engine.models.flux2_klein import Flux2Klein

    family = Flux2Klein()
    config = _config(tiny_klein)
    components = family.load(config)
    objective = family.objective(config, components.noise_scheduler)
    # 1024 px: 64 x 64 tokens, the schedule's max_image_seq_len, so its max_shift; 512 px: 1024 tokens
    assert objective.shift_for((32, 128, 128)) == pytest.approx(math.exp(1.15))
    assert objective.shift_for((32, 64, 64)) == pytest.approx(math.exp(0.5 + (1.15 - 0.5) * (1024 - 256) / 3840))
    assert config.flow.timestep_sampling == "logit_normal"


def _train(output_dir, **overrides):
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": "demo:tiny-flux2-klein", "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "sampling.interval_steps": 0, "optimizer.lr_scheduler.warmup.enabled": False,
        "cache.text_embeddings": True, "validation.path": "demo:sample-data/instance",
        "validation.prompt": "sks toy", **overrides})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer.run_dir, [m["val_loss"] for m in metrics if "val_loss" in m]


BLOCK_MODULES = {*(f"transformer_blocks.0.{m}" for m in (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj",
    "attn.to_add_out", "ff.linear_in", "ff.linear_out", "ff_context.linear_in", "ff_context.linear_out")),
    "single_transformer_blocks.0.attn.to_qkv_mlp_proj", "single_transformer_blocks.0.attn.to_out"}


def test_a_lora_on_the_transformer_lowers_the_loss_and_adapts_every_block_projection(tmp_path, sample_data):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = _train(tmp_path, **{
        "network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "optimizer.params.lr": 5e-2,
        "trainer.max_steps": 12, "checkpoint.every_n_train_steps": 12, "validation.every_n_steps": 4})
    assert len(validation) == 3 and validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    adapted = {key.split(".lora_")[0] for key in load_file(checkpoint / "unet" / "adapter_model.safetensors")}
    assert adapted == BLOCK_MODULES


def test_full_fine_tuning_trains_the_transformer_alone(tmp_path, sample_data, tiny_klein):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = _train(tmp_path, **{
        "optimizer.params.lr": 1e-3, "trainer.max_steps": 8, "checkpoint.every_n_train_steps": 8,
        "validation.every_n_steps": 4})
    assert validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    base = load_file(tiny_klein / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    assert base.keys() == trained.keys() and any(not torch.equal(base[k], trained[k]) for k in base)


@pytest.mark.parametrize("values, key", [
    ({"tokenizer": "demo:tiny-sd"}, "tokenizer"),
    ({"clip_stop_at_layer": 2}, "clip_stop_at_layer"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"flow": {"guidance": 3.5}}, "flow.guidance"),
    ({"data": {"resolution": 72}}, "data.resolution"),
    ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
    ({"text_encoder": "qwen_3_4b.safetensors"}, "text_encoder"),
    ({"network": {"type": "lora", "conv_rank": 4, "conv_alpha": 4.0}}, "network.conv_rank"),
])
def test_what_klein_cannot_train_is_refused_naming_the_key(tiny_klein, values, key):
    from engine.models.family import family_for

    config = _config(tiny_klein, **values)
    family = family_for(config)
    with pytest.raises(UserError, match=f"config key '{key}'"):
        components = family.load(config)
        family.objective(config, components.noise_scheduler)


def test_a_sample_renders_over_an_fp8_base_as_over_its_dequantized_weights(tiny_klein):
    """The pipeline casts its latents to the transformer's dtype, which diffusers reads off the first floating
    parameter: with an fp8 base that must stay the dtype the layers compute in."""
    from engine import base_weights
    from engine.models.family import family_for
    from engine.sampling import PromptEncoder, render

    config = _config(tiny_klein)
    family = family_for(config)
    components = family.load(config)
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    options = dict(num_inference_steps=2, guidance_scale=1.0, width=32, height=32, output_type="np")
    images = []
    for dequantize in (False, True):
        transformer = family.load(config).unet.requires_grad_(False)
        assert base_weights.store_frozen(transformer, base_weights.STORAGE["fp8"]) > 0
        if dequantize:
            base_weights.dequantize_stored(transformer)
        pipeline = family.pipeline(components, transformer, components.text_encoder, torch.device("cpu"))
        images.append(render(pipeline, encoder, ["a red circle"], [""], generator=torch.Generator().manual_seed(3),
                             **options))
    assert torch.isfinite(torch.from_numpy(images[0])).all()
    assert abs(images[0] - images[1]).max() < 1e-5
