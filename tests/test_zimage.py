"""The Z-Image family on the tiny Z-Image-Turbo stand-in: the shipped real configs, Qwen3's real vocabulary
and special tokens, prompts encoded exactly as ZImagePipeline encodes them, the transformer's inputs, samples
equal to ZImagePipeline's, the model's own shift, LoRA and full fine-tuning through the real Trainer, and the
refusals."""
import json
import re

import pytest
import torch

from engine import config as cfg
from engine import events, notices, paths
from engine.errors import UserError
from engine.models.tiny import REAL_CONFIGS
from engine.testing import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPTS = ["a photo of sks toy", "", "(masterpiece:1.2), [blue sky]; a|b \\ c!! #tag", "café naïve 日本語 テスト 🙂",
           "<think>\n\n</think> <|im_end|>", " ".join(f"word{i}" for i in range(300))]  # the last past 512 tokens


@pytest.fixture(scope="module")
def tiny_zimage(demo_cache):
    return paths.demo_model_dir("z-image")


@pytest.fixture(scope="module")
def reference(tiny_zimage):
    from diffusers import ZImagePipeline

    pipeline = ZImagePipeline.from_pretrained(tiny_zimage)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _config(model, **values):
    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, **values})


def _real(component, file="config.json"):
    return json.loads((REAL_CONFIGS / "z-image" / component / file).read_text())


def test_the_shipped_configs_are_z_image_turbos_own_with_6_15_billion_parameters():
    """engine/models/configs/pipelines/z-image/ holds Tongyi-MAI/Z-Image-Turbo's files: model_index.json (Qwen3Model,
    Qwen2Tokenizer), transformer/config.json (as the model card's repository, diffusers' ZImageTransformer2DModel
    defaults and ComfyUI's z_image_to_diffusers sizes agree: 3840 wide, 30 blocks, 2 refiners), text_encoder/
    config.json (Qwen/Qwen3-4B's), vae/config.json (Flux.1's autoencoder, as FLUX.1-dev's vae/) and
    scheduler_config.json (shift 3.0, static)."""
    from diffusers import ZImageTransformer2DModel
    from transformers import Qwen3Config, Qwen3Model

    transformer = _real("transformer")
    assert (transformer["dim"], transformer["n_layers"], transformer["n_refiner_layers"], transformer["n_heads"],
            transformer["cap_feat_dim"], transformer["in_channels"], transformer["all_patch_size"]) == (
        3840, 30, 2, 30, 2560, 16, [2])
    assert sum(transformer["axes_dims"]) == transformer["dim"] // transformer["n_heads"]
    qwen = _real("text_encoder")
    assert (qwen["hidden_size"], qwen["num_hidden_layers"], qwen["num_key_value_heads"], qwen["vocab_size"],
            qwen["tie_word_embeddings"]) == (2560, 36, 8, 151936, True)
    vae = _real("vae")
    assert (vae["latent_channels"], vae["scaling_factor"], vae["shift_factor"]) == (16, 0.3611, 0.1159)
    schedule = _real("scheduler", "scheduler_config.json")
    assert (schedule["use_dynamic_shifting"], schedule["shift"]) == (False, 3.0)
    with torch.device("meta"):
        model = ZImageTransformer2DModel.from_config(transformer)
        encoder = Qwen3Model(Qwen3Config.from_dict(qwen))
    assert sum(p.numel() for p in model.parameters()) == 6_154_908_736
    # Qwen3-4B: 4.0 B parameters, 3.6 B of them outside the (tied) embedding
    assert sum(p.numel() for p in encoder.parameters()) - 151936 * 2560 == pytest.approx(3.63e9, abs=0.01e9)


def test_the_tokenizer_is_qwen3s_with_its_special_ids_and_turn_format(tiny_zimage):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_zimage / "tokenizer")
    assert len(tokenizer) == 151669
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == \
        [151643, 151644, 151645, 151667, 151668]
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id) == (151643, 151645)
    turn = [{"role": "user", "content": "hi"}]
    assert tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.apply_chat_template(turn, tokenize=False, add_generation_prompt=True, enable_thinking=False) \
        .endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # Qwen2's byte-level BPE, as Qwen's own tokenizer splits this sentence
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]


def test_prompts_reach_the_encoder_as_zimage_pipeline_encode_prompt_sends_them(tiny_zimage, reference):
    from engine.data.dataset import Collate, tokenize
    from engine.models.family import family_for
    from engine.models.zimage import prompt_rows

    config = _config(tiny_zimage)
    family = family_for(config)
    assert family.name == "z-image"
    components = family.load(config)
    tokenizer = components.tokenizer
    assert (tokenizer.model_max_length, tokenizer.pad_token_id) == (512, 151643)
    collate = Collate(tokenizer.pad_token_id, tokenizer.model_max_length, pad_to_max=config.pad_tokens)
    examples = [{"instance": {"input_ids": tokenize(tokenizer, prompt), "pixel_values": torch.zeros(1),
                              "caption": prompt, "path": "", "sample_key": 0, "time_ids": [0] * 6}}
                for prompt in PROMPTS]
    with torch.no_grad():
        ids = collate(examples)["input_ids"]  # one batch: each row padded to the longest
        ours = prompt_rows(family.encode_text(components.text_encoder, ids, config.clip_stop_at_layer))
        theirs, _ = reference.encode_prompt(list(PROMPTS), device="cpu", do_classifier_free_guidance=False)
    assert [len(row) for row in ours] == [len(row) for row in theirs]
    assert len(ours[-1]) == 512 and len(ours[1]) < 10
    for prompt, mine, pipelines in zip(PROMPTS, ours, theirs):
        torch.testing.assert_close(mine, pipelines, atol=1e-6, rtol=0, msg=prompt)


def test_the_transformer_gets_each_latent_caption_and_time_as_zimage_pipeline_passes_them(tiny_zimage):
    from engine.models.zimage import ZImage

    family = ZImage()
    components = family.load(_config(tiny_zimage))
    latents = torch.randn(2, 16, 6, 10)
    hidden = torch.randn(2, 7, 32)
    mask = torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3]).unsqueeze(-1)
    timesteps = torch.tensor([250.0, 875.0])
    with torch.no_grad():
        ours = family.predict(components.unet, latents, timesteps, {"encoder_hidden_states": hidden,
                                                                    "encoder_attention_mask": mask}, None)
        # ZImagePipeline's call: time (1000 - t) / 1000, each latent [C, 1, H, W], each caption unpadded,
        # and the output negated
        theirs = components.unet([latents[0].unsqueeze(1), latents[1].unsqueeze(1)], (1000 - timesteps) / 1000,
                                 [hidden[0], hidden[1, :4]], return_dict=False)[0]
        padded = components.unet([latents[1].unsqueeze(1)], (1000 - timesteps[1:]) / 1000, [hidden[1]],
                                 return_dict=False)[0]
    assert ours.shape == latents.shape
    torch.testing.assert_close(ours, -torch.stack(theirs).squeeze(2), atol=1e-6, rtol=0)
    assert not torch.allclose(ours[1], -padded[0].squeeze(1), atol=1e-4)  # the padding does not reach it


@pytest.mark.parametrize("guidance", [0.0, 3.0], ids=["turbo", "cfg"])
def test_a_sample_rendered_by_the_family_is_zimage_pipelines_image(tiny_zimage, reference, guidance):
    from engine.models.family import family_for
    from engine.sampling import PromptEncoder, render

    config = _config(tiny_zimage)
    family = family_for(config)
    components = family.load(config)
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    options = dict(num_inference_steps=3, guidance_scale=guidance, width=64, height=48, output_type="np")
    ours = render(pipeline, encoder, ["a red circle"], ["blurry"], generator=torch.Generator().manual_seed(3),
                  **options)
    theirs = reference("a red circle", negative_prompt="blurry", generator=torch.Generator().manual_seed(3),
                       **options).images
    assert ours.shape == theirs.shape == (1, 48, 64, 3)
    assert abs(ours - theirs).max() < 1e-5
    if guidance:
        other = render(pipeline, encoder, ["a red circle"], [""], generator=torch.Generator().manual_seed(3),
                       **options)
        assert abs(ours - other).max() > 1e-4  # the negative prompt is used


def test_sigma_is_shifted_by_the_models_own_static_shift_whatever_the_size(tiny_zimage):
    from engine.models.zimage import ZImage
    from engine.objectives import shifted

    family = ZImage()
    config = _config(tiny_zimage, flow={"timestep_sampling": "uniform"})
    components = family.load(config)
    objective = family.objective(config, components.noise_scheduler)
    assert objective.shift_for((16, 8, 8)) == objective.shift_for((16, 128, 128)) == 3.0
    drawn = objective.draw_timestep(torch.Generator().manual_seed(0), (16, 8, 8))
    sigma = torch.rand((), generator=torch.Generator().manual_seed(0))
    assert drawn.item() == pytest.approx(shifted(sigma, 3.0).item() * 1000)
    assert family.objective(_config(tiny_zimage, flow={"shift": 1.5}), components.noise_scheduler).shift_for(
        (16, 8, 8)) == 1.5


def _train(output_dir, **overrides):
    """Fine-tune the tiny Z-Image on the sample subject; the validation loss is scored on the same images with
    fixed timesteps and noise, so it is comparable across steps."""
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": "demo:tiny-z-image", "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "sampling.interval_steps": 0, "optimizer.lr_scheduler.warmup.enabled": False,
        "validation.path": "demo:sample-data/instance", "validation.prompt": "sks toy", **overrides})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer.run_dir, [m["val_loss"] for m in metrics if "val_loss" in m]


MAIN_BLOCK = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
              "feed_forward.w2", "feed_forward.w3")


def test_a_lora_on_the_transformer_lowers_the_loss_and_adapts_the_main_blocks(tmp_path, sample_data):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = _train(tmp_path, **{
        "network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "optimizer.params.lr": 1e-2,
        "trainer.max_steps": 12, "checkpoint.every_n_train_steps": 12, "validation.every_n_steps": 4,
        # the first epoch (5 steps) stores each prompt's hidden states and mask, the later ones read them
        "cache.latents": True, "cache.text_embeddings": True, "cache.fill": "first_epoch"})
    assert len(validation) == 3 and validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    adapted = {key.split(".lora_")[0] for key in load_file(checkpoint / "unet" / "adapter_model.safetensors")}
    assert adapted == {f"layers.{i}.{m}" for i in range(2) for m in MAIN_BLOCK}
    # the file the UIs load names each module by its diffusers path behind diffusion_model. (tests/
    # test_zimage_files.py holds it to ComfyUI's and diffusers' readers)
    from safetensors import safe_open

    with safe_open(str(checkpoint / "adapter.safetensors"), "pt") as handle:
        names = {key.split(".lora_")[0].removesuffix(".alpha") for key in handle.keys()}
        assert handle.metadata()["ss_base_model_version"] == "z_image"
    assert names == {f"diffusion_model.{module}" for module in adapted}


def test_full_fine_tuning_trains_the_transformer_and_leaves_qwen3_as_it_was(tmp_path, sample_data, tiny_zimage):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = _train(tmp_path, **{
        "optimizer.params.lr": 1e-3, "trainer.max_steps": 8, "checkpoint.every_n_train_steps": 8,
        "validation.every_n_steps": 4})
    assert validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    base = load_file(tiny_zimage / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = load_file(checkpoint / "unet" / "diffusion_pytorch_model.safetensors")
    changed = {k for k in base if not torch.equal(base[k], trained[k])}
    assert {f"layers.{i}.{m}.weight" for i in range(2) for m in MAIN_BLOCK} <= changed
    assert {"cap_embedder.1.weight", "noise_refiner.0.attention.to_q.weight"} <= changed


@pytest.mark.parametrize("values, key", [
    ({"tokenizer": "demo:tiny-sd"}, "tokenizer"),
    ({"clip_stop_at_layer": 2}, "clip_stop_at_layer"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"data": {"resolution": 72}}, "data.resolution"),
    ({"sampling": {"concepts": [{"prompt": "sks toy", "width": 72}]}}, "sampling.concepts[0].width"),
    ({"flow": {"guidance": 3.5}}, "flow.guidance"),
    ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
    ({"text_encoder": "qwen_3_4b.safetensors"}, "text_encoder"),  # a diffusers folder has its own
    ({"text_encoder_2": "t5xxl_fp16.safetensors"}, "text_encoder_2"),
    ({"network": {"type": "lora", "conv_rank": 4, "conv_alpha": 4.0}}, "network.conv_rank"),
])
def test_what_zimage_cannot_train_is_refused_naming_the_key(tiny_zimage, values, key):
    from engine.models.family import family_for

    config = _config(tiny_zimage, **values)
    family = family_for(config)
    with pytest.raises(UserError, match=re.escape(f"config key '{key}'")):
        components = family.load(config)
        family.objective(config, components.noise_scheduler)


def test_a_resolution_far_below_zimages_warns_naming_the_key(tiny_zimage):
    from engine.models.zimage import ZImage

    for resolution, warns in ((64, True), (512, False)):
        warned = []
        with notices.collect(warned.append):
            ZImage().load(_config(tiny_zimage, data={"resolution": resolution}))
        assert any("config key 'data.resolution'" in str(w) for w in warned) == warns, resolution
