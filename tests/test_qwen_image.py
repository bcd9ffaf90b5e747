"""The Qwen-Image family on its tiny stand-in: the shipped real configs (Qwen/Qwen-Image's 20.43 B transformer),
Qwen2's real vocabulary, prompts encoded exactly as QwenImagePipeline encodes them, latents normalised as the
pipeline normalises them, the transformer's packed input, samples equal to the pipeline's, LoRA and full
fine-tuning through the real Trainer, the adapter file of every network type as ComfyUI and (LoRA) diffusers read it,
Qwen-Image-Edit's transformer's included, and the refusals."""
import json
import math

import pytest
import torch

from client_formulas import comfyui_qwen_image_lora_keys
from engine import config as cfg
from engine import events, notices, paths
from engine.errors import UserError
from engine.models.tiny import REAL_CONFIGS
from engine.testing import tiny_config
from test_adapter_convert import CHANGED, TOLERANCE, library_messages
from test_flux2_klein_files import adapt
from test_flux_files import (TYPES_AND_MODULATION, TYPES_AND_MODULATION_IDS, WEIGHT_TOLERANCE, comfyui_patched,
                             merged, settings)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ARCH = "qwen-image"
PROMPTS = ["a photo of sks toy", "", "\nstarts with a newline, which merges with the template's",
           "café naïve 日本語 テスト 🙂  two  spaces ", " ".join(f"word{i}" for i in range(600))]  # past 1024 tokens
LORA_RUN = {"network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "optimizer.params.lr": 1e-2,
            "trainer.max_steps": 12, "checkpoint.every_n_train_steps": 12, "validation.every_n_steps": 4}
# The modules an adapter run adapts in each block (engine.models.adapters); the last block's text-stream layers
# feed only the discarded text output and are left out; with network.modulation also each stream's modulation layer
BOTH_STREAMS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_k_proj", "attn.add_v_proj",
                "img_mlp.net.0.proj", "img_mlp.net.2")
TEXT_STREAM = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.0.proj", "txt_mlp.net.2")
MODULATION = ("img_mod.1", "txt_mod.1")
# Qwen-Image-Edit (2509/2511) trains Qwen-Image's transformer: ComfyUI loads both as its one QwenImage model
# (comfy/supported_models.py in Comfy-Org/ComfyUI at a125cd84b054a57729b5eecab930ca9408719832: every
# `image_model: qwen_image`), diffusers each through its own pipeline's loader
PIPELINES = {ARCH: "QwenImagePipeline", "qwen-image-edit": "QwenImageEditPlusPipeline"}


@pytest.fixture(scope="module")
def tiny_qwen(demo_cache):
    return paths.demo_model_dir(ARCH)


@pytest.fixture(scope="module")
def loaded(tiny_qwen):
    from engine.models.family import family_for

    config = _config(tiny_qwen)
    family = family_for(config)
    return config, family, family.load(config)


def _config(model, **values):
    return cfg.from_dict({"model": str(model), "prior_preservation": {"enabled": False}, **values})


def _real(component, file="config.json"):
    return json.loads((REAL_CONFIGS / ARCH / component / file).read_text())


def test_the_shipped_configs_are_qwen_images_own_with_its_parameter_counts():
    from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    transformer = _real("transformer")
    assert (transformer["num_layers"], transformer["num_attention_heads"] * transformer["attention_head_dim"],
            transformer["in_channels"], transformer["joint_attention_dim"], transformer["guidance_embeds"]) == (
        60, 3072, 64, 3584, False)
    assert sum(transformer["axes_dims_rope"]) == transformer["attention_head_dim"]
    encoder = _real("text_encoder")
    assert (encoder["hidden_size"], encoder["num_hidden_layers"], encoder["vocab_size"], encoder["bos_token_id"],
            encoder["eos_token_id"]) == (3584, 28, 152064, 151643, 151645)
    vae = _real("vae")
    assert (vae["z_dim"], vae["base_dim"], vae["dim_mult"], len(vae["latents_mean"]), vae["latents_std"][8]) == (
        16, 96, [1, 2, 4, 4], 16, 3.2687)
    schedule = _real("scheduler", "scheduler_config.json")
    assert (schedule["use_dynamic_shifting"], schedule["base_shift"], schedule["max_shift"],
            schedule["max_image_seq_len"], schedule["shift_terminal"]) == (True, 0.5, 0.9, 8192, 0.02)
    with torch.device("meta"):
        counts = [sum(p.numel() for p in model.parameters()) for model in (
            QwenImageTransformer2DModel.from_config(transformer),
            Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(encoder)),
            AutoencoderKLQwenImage.from_config(vae))]
    # the Hub's transformer (9 bf16 shards, 40.86 GB), Qwen2.5-VL-7B-Instruct with its vision tower, the VAE
    assert counts[:2] == [20_430_401_088, 8_292_166_656]
    assert abs(counts[2] - 126.9e6) < 0.1e6


def test_the_tokenizer_is_qwen2s_with_the_real_special_ids_and_the_templates_fixed_head(loaded):
    from engine.models.qwen_image import FIXED_TOKENS, PROMPT_TEMPLATE

    _, family, components = loaded
    tokenizer = components.tokenizer
    assert family.name == ARCH
    assert (tokenizer.model_max_length, tokenizer.pad_token_id) == (1025, 151643)
    whole = tokenizer.tokenizer(PROMPT_TEMPLATE.format("a cat")).input_ids
    assert whole[:2] == [151644, 8948]  # <|im_start|> "system"
    assert tokenizer.fixed_ids + tokenizer("a cat").input_ids == whole
    for prompt in PROMPTS[:4]:
        assert tokenizer.tokenizer(PROMPT_TEMPLATE.format(prompt)).input_ids[:FIXED_TOKENS] == tokenizer.fixed_ids


def test_prompts_are_encoded_as_qwen_image_pipeline_encode_prompt_encodes_them(loaded, tiny_qwen):
    from diffusers import QwenImagePipeline

    from engine.data.dataset import Collate, tokenize

    config, family, components = loaded
    tokenizer = components.tokenizer
    pipeline = QwenImagePipeline.from_pretrained(tiny_qwen)
    collate = Collate(tokenizer.pad_token_id, tokenizer.model_max_length, pad_to_max=config.pad_tokens)
    examples = [{"instance": {"input_ids": tokenize(tokenizer, prompt), "pixel_values": torch.zeros(1),
                              "caption": prompt, "path": "", "sample_key": 0, "time_ids": [0] * 6}}
                for prompt in PROMPTS]
    ids = collate(examples)["input_ids"]
    assert ids.shape == (len(PROMPTS), 1025)  # the longest prompt truncated as the pipeline truncates it
    with torch.no_grad():
        ours = family.encode_text(components.text_encoder, ids, config.clip_stop_at_layer)
        embeds, mask = pipeline.encode_prompt(PROMPTS, device="cpu", max_sequence_length=1024)
        for row, prompt in enumerate(PROMPTS):
            alone, _ = pipeline.encode_prompt(prompt, device="cpu", max_sequence_length=1024)
            length = alone.shape[1]
            assert ours["encoder_hidden_states_mask"][row, :, 0].tolist() == [1] * length + [0] * (1025 - length)
            torch.testing.assert_close(ours["encoder_hidden_states"][row, :length], alone[0], atol=1e-6, rtol=0,
                                       msg=prompt)
    assert embeds.shape[1] == 1024 and ours["encoder_hidden_states"][:, 1024:].abs().max() == 0
    torch.testing.assert_close(ours["encoder_hidden_states"][:, :1024], embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(ours["encoder_hidden_states_mask"][:, :1024, 0], mask.float(), atol=0, rtol=0)


def test_latents_are_normalised_as_the_pipelines_are(loaded, tiny_qwen):
    """The img2img pipeline's encoding (the mean, normalised by latents_mean and latents_std) is our latent
    distribution's mean; its samples spread by the VAE's σ over latents_std."""
    from diffusers import QwenImageImg2ImgPipeline

    _, _, components = loaded
    pixels = torch.rand(2, 3, 48, 64) * 2 - 1
    with torch.no_grad():
        ours = components.vae.encode(pixels).latent_dist
        pipeline = QwenImageImg2ImgPipeline.from_pretrained(tiny_qwen)
        theirs = pipeline._encode_vae_image(pixels.unsqueeze(2), generator=torch.Generator().manual_seed(1))
    assert ours.mean.shape == (2, 16, 6, 8) and components.vae.config.scaling_factor == 1.0
    ours_sample = ours.sample(generator=torch.Generator().manual_seed(1))  # the same draws, one axis fewer
    torch.testing.assert_close(ours_sample, theirs[:, :, 0], atol=1e-5, rtol=1e-5)
    assert (ours_sample - ours.mean).abs().max() > 1e-3  # the draws spread: the σ normalised too


def test_the_transformer_sees_the_latents_packed_as_the_pipeline_packs_them(loaded):
    """predict is the transformer on the pipeline's packing and image shapes; masked text tokens change
    nothing, so a prompt's conditioning may carry any amount of padding."""
    from diffusers import QwenImagePipeline

    _, family, components = loaded
    latents = torch.randn(2, 16, 6, 10)
    timesteps = torch.tensor([250.0, 875.0])
    hidden = torch.randn(2, 7, 16)
    mask = torch.tensor([[1.0] * 7, [1.0] * 4 + [0.0] * 3]).unsqueeze(-1)
    hidden = hidden * mask
    padded = {"encoder_hidden_states": torch.cat([hidden, torch.zeros(2, 5, 16)], 1),
              "encoder_hidden_states_mask": torch.cat([mask, torch.zeros(2, 5, 1)], 1)}
    with torch.no_grad():
        ours = family.predict(components.unet, latents, timesteps,
                              {"encoder_hidden_states": hidden, "encoder_hidden_states_mask": mask}, None)
        longer = family.predict(components.unet, latents, timesteps, padded, None)
        theirs = components.unet(
            hidden_states=QwenImagePipeline._pack_latents(latents, 2, 16, 6, 10), timestep=timesteps / 1000,
            encoder_hidden_states=hidden, encoder_hidden_states_mask=mask[..., 0].long(),
            img_shapes=[[(1, 3, 5)]] * 2, return_dict=False)[0]
    unpacked = QwenImagePipeline._unpack_latents(theirs, 6 * 8, 10 * 8, 8)[:, :, 0]
    assert torch.equal(ours, unpacked)
    torch.testing.assert_close(longer, ours, atol=1e-6, rtol=0)


def test_a_sample_rendered_by_the_family_is_the_pipelines_image(loaded, tiny_qwen):
    from diffusers import QwenImagePipeline

    from engine.sampling import PromptEncoder, render

    _, family, components = loaded
    pipeline = family.pipeline(components, components.unet, components.text_encoder, torch.device("cpu"))
    encoder = PromptEncoder(family, components.tokenizer, components.text_encoder)
    options = dict(num_inference_steps=3, width=64, height=48, output_type="np")
    ours = render(pipeline, encoder, ["a red circle"], ["blurry"], guidance_scale=2.5,
                  generator=torch.Generator().manual_seed(3), **options)
    reference = QwenImagePipeline.from_pretrained(tiny_qwen)
    reference.set_progress_bar_config(disable=True)
    theirs = reference("a red circle", negative_prompt="blurry", true_cfg_scale=2.5,
                       generator=torch.Generator().manual_seed(3), **options).images
    assert ours.shape == theirs.shape == (1, 48, 64, 3)
    assert abs(ours - theirs).max() < 1e-5
    other = render(pipeline, encoder, ["a red circle"], ["blurry"], guidance_scale=6.0,
                   generator=torch.Generator().manual_seed(3), **options)
    assert abs(ours - other).max() > 1e-3  # the sample's cfg_scale is the true CFG scale


def test_the_default_timestep_shift_is_the_models_dynamic_one(loaded):
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    config, family, components = loaded
    objective = family.objective(config, components.noise_scheduler)
    for side in (64, 128):  # 512 and 1024 px: 1024 and 4096 tokens
        mu = calculate_shift((side // 2) ** 2, 256, 8192, 0.5, 0.9)
        assert objective.shift_for((16, side, side)) == pytest.approx(math.exp(mu), rel=1e-12)
    assert objective.shift_for((16, 128, 128)) > objective.shift_for((16, 64, 64)) > 1


def _train(output_dir, **overrides):
    """Fine-tune the tiny Qwen-Image on the sample subject; the validation loss is scored on the same images
    with fixed timesteps and noise, so it is comparable across steps."""
    from engine.train import Trainer

    values = tiny_config(output_dir, **{
        "model": f"demo:tiny-{ARCH}", "prior_preservation.enabled": False,
        "data.concepts": [{"instance_set": {"path": "demo:sample-data/instance", "prompt": "sks toy"}}],
        "sampling.interval_steps": 0, "optimizer.lr_scheduler.warmup.enabled": False,
        "validation.path": "demo:sample-data/instance", "validation.prompt": "sks toy", **overrides})
    trainer = Trainer(cfg.from_dict(values))
    result = trainer.run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return trainer.run_dir, [m["val_loss"] for m in metrics if "val_loss" in m]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, sample_data):
    return _train(tmp_path_factory.mktemp("qwen-lora"), **LORA_RUN)


def test_a_lora_on_the_transformer_lowers_the_loss_and_adapts_the_blocks_projections(lora_run):
    from safetensors.torch import load_file

    from engine import checkpoints

    run_dir, validation = lora_run
    assert len(validation) == 3 and validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    adapted = {key.split(".lora_")[0] for key in load_file(checkpoint / "unet" / "adapter_model.safetensors")}
    assert adapted == set(adapted_modules())


def test_the_lora_file_loads_in_diffusers_as_the_merged_model_and_maps_through_comfyuis_keys(lora_run, tiny_qwen):
    from diffusers import QwenImagePipeline, QwenImageTransformer2DModel
    from safetensors import safe_open
    from safetensors.torch import load_file

    from engine import checkpoints
    from engine.models.convert import load_source

    run_dir, _ = lora_run
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    with safe_open(str(checkpoint / "adapter.safetensors"), "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["ss_base_model_version"] == "qwen_image"
    base = QwenImageTransformer2DModel.from_pretrained(tiny_qwen / "transformer")
    comfy = comfyui_qwen_image_lora_keys(base.state_dict().keys())
    trained = {key.split(".lora_")[0] for key in load_file(checkpoint / "unet" / "adapter_model.safetensors")}
    # each file module patches the weight of the module the adapter trained, in ComfyUI's own names
    assert {key.split(".")[0] for key in keys} == {"lora_unet_" + m.replace(".", "_") for m in trained}
    assert {comfy[key.split(".")[0]] for key in keys} == {f"diffusion_model.{m}.weight" for m in trained}
    pipeline = QwenImagePipeline.from_pretrained(tiny_qwen)
    with library_messages() as messages:
        pipeline.load_lora_weights(str(checkpoint / "adapter.safetensors"))
    assert messages == []  # every key loaded
    want = output(load_source(run_dir, ("unet",)).models["unet"])
    assert (want - output(base)).abs().max() > CHANGED
    assert (output(pipeline.transformer) - want).abs().max() <= TOLERANCE


def adapted_modules(modulation: bool = False) -> list[str]:
    """The modules an adapter run adapts in the tiny transformer's two blocks."""
    return ([f"transformer_blocks.0.{m}" for m in BOTH_STREAMS + TEXT_STREAM + (MODULATION if modulation else ())]
            + [f"transformer_blocks.1.{m}" for m in BOTH_STREAMS + (MODULATION if modulation else ())])


def transformer(arch: str = ARCH, seed: int = 0):
    """The tiny stand-in's transformer of arch (its shipped config, tiny.SIZES' sizes), every weight random (none
    of the zero-initialised layers)."""
    from diffusers import QwenImageTransformer2DModel

    from engine.models.tiny import SIZES, real_config

    model = QwenImageTransformer2DModel.from_config({**real_config(arch, "transformer"), **SIZES[arch]["transformer"]})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(0.2 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def output(model):
    """The transformer on a fixed small input: a 2x2 packed latent (4 tokens), 3 caption tokens."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        return model(hidden_states=torch.randn(1, 4, 64, generator=generator), timestep=torch.tensor([0.4]),
                     encoder_hidden_states=torch.randn(1, 3, 16, generator=generator),
                     img_shapes=[[(1, 2, 2)]], return_dict=False)[0]


@pytest.mark.parametrize("arch", PIPELINES)
@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_comfyui_loads_every_key_of_each_network_types_file_and_computes_the_adapted_weights(arch, network_type,
                                                                                              modulation):
    from engine.models.kohya import to_kohya

    config = settings(network_type, modulation)
    model = adapt(transformer(arch), config.network)
    file = to_kohya({"unet": model}, config)
    assert {key.partition(".")[0] for key in file} == {
        "lora_unet_" + m.replace(".", "_") for m in adapted_modules(modulation)}
    base = transformer(arch).state_dict()
    patched, loaded = comfyui_patched(file, base, comfyui_qwen_image_lora_keys(base))
    assert loaded == set(file), f"ComfyUI leaves keys unloaded: {sorted(set(file) - loaded)[:3]}"
    want = merged(model).state_dict()
    assert max((want[key] - base[key]).abs().max().item() for key in want) > CHANGED
    for key in want:
        assert (patched[key] - want[key]).abs().max().item() <= WEIGHT_TOLERANCE, key


@pytest.mark.parametrize("arch", PIPELINES)
@pytest.mark.parametrize("modulation", [False, True], ids=["default", "modulation"])
def test_each_pipelines_lora_loader_reads_the_file_into_every_module_with_the_merged_output(arch, modulation):
    import diffusers
    from peft.tuners.tuners_utils import BaseTunerLayer

    from engine.models.kohya import to_kohya

    pipeline = getattr(diffusers, PIPELINES[arch])
    config = settings("lora", modulation)
    model = adapt(transformer(arch), config.network)
    file = to_kohya({"unet": model}, config)
    loaded = transformer(arch)
    with library_messages() as messages:
        pipeline.load_lora_into_transformer(pipeline.lora_state_dict(dict(file)), transformer=loaded)
    assert not messages, messages
    assert {name for name, m in loaded.named_modules() if isinstance(m, BaseTunerLayer)} == set(
        adapted_modules(modulation))
    want = output(merged(model))
    assert (want - output(transformer(arch))).abs().max().item() > CHANGED
    assert (output(loaded) - want).abs().max().item() <= TOLERANCE


@pytest.mark.parametrize("network_type, modulation", TYPES_AND_MODULATION, ids=TYPES_AND_MODULATION_IDS)
def test_each_network_types_file_reads_back_as_the_adapter_it_was_written_from(network_type, modulation):
    from engine.models.adapters import adapter_state
    from engine.models.kohya import from_kohya, to_kohya

    config = settings(network_type, modulation)
    model = adapt(transformer(), config.network)
    file = to_kohya({"unet": model}, config)
    fresh = adapt(transformer(), config.network, seed=9)
    from_kohya(file, {"unet": fresh}, config, "network.init_from")
    want, got = adapter_state(model), adapter_state(fresh)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-6, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory, sample_data):
    return _train(tmp_path_factory.mktemp("qwen-full"), **{
        "optimizer.params.lr": 1e-3, "trainer.max_steps": 6, "checkpoint.every_n_train_steps": 6,
        "validation.every_n_steps": 3})


def test_full_fine_tuning_trains_the_transformer_alone(full_run, tiny_qwen):
    from safetensors.torch import load_file

    from engine import checkpoints
    from engine.models.qwen_image import LAST_BLOCK_TEXT_ONLY

    run_dir, validation = full_run
    assert validation[-1] < validation[0] - 0.02, validation
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    assert checkpoints.read_meta(checkpoint)["trained"] == ["unet"]
    base = load_file(tiny_qwen / "transformer" / "diffusion_pytorch_model.safetensors")
    trained = load_file(next((checkpoint / "unet").glob("*.safetensors")))
    assert base.keys() == trained.keys()
    # all but the last block's text-only layers, which feed nothing the model outputs
    frozen = {k for k in base if k.startswith(tuple(f"transformer_blocks.1.{m}." for m in LAST_BLOCK_TEXT_ONLY))}
    assert len(frozen) == 9
    assert {k for k in base if not torch.equal(base[k], trained[k])} == base.keys() - frozen
    assert not (checkpoint / "text_encoder").exists()


def test_a_full_run_converts_to_the_single_file_comfyui_and_diffusers_read_and_trains_from_it(
        full_run, tiny_qwen, tmp_path):
    """The transformer alone, under its diffusers keys (ComfyUI's Qwen-Image keys): diffusers' single-file
    loader reads it back bit-equal, and a run loads it with the text encoder's and autoencoder's folders."""
    from diffusers import QwenImageTransformer2DModel
    from safetensors.torch import load_file

    from engine import checkpoints
    from engine.models.convert import convert_checkpoint
    from engine.models.family import family_for

    run_dir, _ = full_run
    checkpoint = checkpoints.latest_checkpoint(run_dir)
    written = convert_checkpoint(run_dir, tmp_path / "qwen.safetensors", unet_dtype="bf16")
    trained = QwenImageTransformer2DModel.from_pretrained(checkpoint / "unet")
    state = load_file(written)
    assert state.keys() == trained.state_dict().keys()
    assert all(state[k].dtype == torch.bfloat16 and torch.equal(state[k], v.to(torch.bfloat16))
               for k, v in trained.state_dict().items())
    read = QwenImageTransformer2DModel.from_single_file(str(written), config=str(tiny_qwen), subfolder="transformer",
                                                        torch_dtype=torch.bfloat16)
    assert all(torch.equal(read.state_dict()[k], v) for k, v in state.items())

    config = _config(written, text_encoder=str(tiny_qwen / "text_encoder"), vae=str(tiny_qwen / "vae"))
    family = family_for(config)
    components = family.load(config)
    assert family.name == ARCH and components.tokenizer.model_max_length == 1025
    assert components.unet.config.num_layers == 2  # the architecture the file records, not the shipped one
    assert all(torch.equal(components.unet.state_dict()[k], v.float()) for k, v in state.items())
    with pytest.raises(UserError, match="config key 'vae'"):
        family.load(_config(written, text_encoder=str(tiny_qwen / "text_encoder")))


def test_blocks_waiting_on_the_cpu_change_neither_the_loss_nor_the_adapters_gradients(tiny_qwen):
    from engine.models.family import family_for
    from engine.plan import make_plan
    from engine.setup import prepare_models

    def run(**values):
        config = _config(tiny_qwen, seed=0, network={"type": "lora", "rank": 4}, gradient_checkpointing=True,
                         **values)
        family = family_for(config)
        components = family.load(config)
        prepare_models(family, components, config, make_plan(config, "cpu"), torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(2, 16, 4, 4, generator=generator)
        conditioning = {"encoder_hidden_states": torch.randn(2, 7, 16, generator=generator),
                        "encoder_hidden_states_mask": torch.ones(2, 7, 1)}
        loss = family.predict(components.unet, latents, torch.tensor([250.0, 875.0]), conditioning, None)
        loss.square().mean().backward()
        return loss, {n: p.grad for n, p in components.unet.named_parameters() if p.requires_grad}, components.unet

    loss, grads, _ = run()
    swapped_loss, swapped_grads, unet = run(memory={"blocks_on_cpu": 2})
    assert torch.equal(loss, swapped_loss) and grads.keys() == swapped_grads.keys()
    assert all(torch.equal(grads[k], swapped_grads[k]) for k in grads)
    assert {placement.block for placement in unet.block_swap.log} == {0, 1}  # both blocks visited the device


@pytest.mark.parametrize("values, key", [
    ({"tokenizer": "demo:tiny-sd"}, "tokenizer"),
    ({"clip_stop_at_layer": 2}, "clip_stop_at_layer"),
    ({"train_text_encoder": True}, "train_text_encoder"),
    ({"flow": {"guidance": 3.5}}, "flow.guidance"),
    ({"data": {"resolution": 72}}, "data.resolution"),
    ({"network": {"type": "lora", "conv_rank": 4, "conv_alpha": 4.0}}, "network.conv_rank"),
    ({"text_encoder": "qwen_2.5_vl_7b.safetensors"}, "text_encoder"),  # a diffusers folder has its own
    ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
])
def test_what_qwen_image_cannot_train_is_refused_naming_the_key(tiny_qwen, values, key):
    from engine.models.family import family_for

    config = _config(tiny_qwen, **values)
    family = family_for(config)
    with pytest.raises(UserError, match=f"config key '{key}'"):
        components = family.load(config)
        family.objective(config, components.noise_scheduler)


def test_a_resolution_far_below_qwen_images_warns_naming_the_key(tiny_qwen):
    from engine.models.qwen_image import check_config

    for resolution, warns in ((64, True), (512, False)):
        warned = []
        with notices.collect(warned.append):
            check_config(_config(tiny_qwen, data={"resolution": resolution}))
        assert any("config key 'data.resolution'" in str(w) for w in warned) == warns, resolution


def test_the_vram_estimate_traces_a_qwen_image_step_from_the_models_own_configs(tiny_qwen):
    from safetensors.torch import load_file

    from engine import vram
    from engine.models.family import family_named

    assert family_named(ARCH).name == ARCH
    values = {"network": {"type": "lora", "rank": 4}, "data": {"resolution": 64}}
    architecture = vram.resolve_architecture(_config(tiny_qwen, **values))
    assert architecture.family == ARCH
    estimate = vram.estimate(_config(tiny_qwen, **values))
    # with cached embeddings the text encoder waits off the GPU; the step still gets its outputs' shapes
    cached = vram.estimate(_config(tiny_qwen, cache={"text_embeddings": True}, **values))
    encoder = sum(t.numel() * 4 for t in load_file(tiny_qwen / "text_encoder" / "model.safetensors").values())
    assert estimate.parameters - cached.parameters == pytest.approx(encoder / vram.GIB, rel=1e-3)
