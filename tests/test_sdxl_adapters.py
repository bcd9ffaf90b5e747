"""SDXL adapter runs: both text encoders adapted, the kohya file in kohya's SDXL naming judged by diffusers'
SDXL load_lora_weights, the merged single file by diffusers' single-file loader, and the file read back as
network.init_from. The reference is the engine's adapted model, rebuilt from the checkpoint's peft weights."""
from pathlib import Path

import pytest
import torch

from engine import checkpoints
from engine.models.convert import convert_checkpoint
from test_adapter_convert import CHANGED, TOLERANCE, file_tensors, library_messages, tuner_modules, with_run_adapters
from test_sdxl_convert import train_sdxl

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory, tiny_sdxl):
    """LoRA over the UNet (LoCon convolutions included) and both text encoders."""
    return train_sdxl(tmp_path_factory.mktemp("sdxl-lora"), **{
        "network.type": "lora", "network.rank": 4, "network.alpha": 2, "network.conv_rank": 2,
        "network.conv_alpha": 1})


def pipeline(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)


def base_models(tiny_sdxl) -> dict:
    pipe = pipeline(tiny_sdxl)
    return {name: getattr(pipe, name).eval() for name in COMPONENTS}


def adapted_models(run: Path, tiny_sdxl) -> dict:
    return with_run_adapters(run, base_models(tiny_sdxl))


def unet_output(unet):
    """The UNet on a fixed input with SDXL's added conditioning: pooled text embedding and time ids."""
    generator = torch.Generator().manual_seed(0)
    config = unet.config
    latents = torch.randn(2, config.in_channels, 8, 8, generator=generator)
    hidden = torch.randn(2, 77, config.cross_attention_dim, generator=generator)
    pooled_width = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    pooled = torch.randn(2, pooled_width, generator=generator)
    time_ids = torch.tensor([[64.0, 64, 0, 0, 64, 64], [128, 96, 8, 4, 64, 64]])
    with torch.no_grad():
        return unet(latents, torch.tensor([10, 700]), hidden,
                    added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample


def text_output(text_encoder):
    """What SDXL takes from an encoder: the penultimate hidden states, and the second one's pooled projection."""
    config = text_encoder.config
    ids = torch.tensor([[config.bos_token_id, 20, 30, 40, config.eos_token_id] + [config.eos_token_id] * 72])
    with torch.no_grad():
        output = text_encoder(ids, output_hidden_states=True)
    parts = [output.hidden_states[-2].flatten()]
    if hasattr(output, "text_embeds"):
        parts.append(output.text_embeds.flatten())
    return torch.cat(parts)


def assert_same_outputs(expected: dict, actual: dict, base: dict):
    """The models compute what the engine's adapted ones do, and each adapter changed its model."""
    for name in COMPONENTS:
        output = unet_output if name == "unet" else text_output
        want, got, untouched = output(expected[name]), output(actual[name]), output(base[name])
        assert (want - untouched).abs().max().item() > CHANGED, f"the {name}'s adapter changes nothing"
        assert (got - want).abs().max().item() <= TOLERANCE, name


def test_second_text_encoder_is_adapted_as_the_first(tiny_sdxl):
    from engine.config import Network
    from engine.models.adapters import target_modules

    models = base_models(tiny_sdxl)
    first = target_modules(models["text_encoder"], "text_encoder", Network(type="lora"))
    second = target_modules(models["text_encoder_2"], "text_encoder_2", Network(type="lora"))
    assert second and {m.removeprefix("text_model.") for m in first} == {m.removeprefix("text_model.")
                                                                          for m in second}
    assert not any("text_projection" in module for module in second)


def test_kohya_file_has_kohya_sdxl_names_and_diffusers_loads_it_into_every_module(lora_run, tiny_sdxl, tmp_path):
    written = convert_checkpoint(lora_run, tmp_path)
    tensors, metadata = file_tensors(written)
    trainer_tensors, trainer_metadata = file_tensors(checkpoints.latest_checkpoint(lora_run) / "adapter.safetensors")
    assert metadata == trainer_metadata and metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert metadata["ss_v2"] == "False"
    assert tensors.keys() == trainer_tensors.keys()
    assert all(torch.equal(tensors[k], trainer_tensors[k]) for k in tensors)

    modules = {key.split(".")[0] for key in tensors}
    by_component = {"unet": {m for m in modules if m.startswith("lora_unet_")},
                    "text_encoder": {m for m in modules if m.startswith("lora_te1_")},
                    "text_encoder_2": {m for m in modules if m.startswith("lora_te2_")}}
    assert set().union(*by_component.values()) == modules
    # kohya's SDXL trainer's names: the original UNet's blocks (the tiny UNet: one layer per block, its
    # second level with attention), the text encoders under text_model.
    for name in ("lora_unet_input_blocks_3_1_transformer_blocks_1_attn1_to_q", "lora_unet_input_blocks_3_1_proj_in",
                 "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                 "lora_unet_output_blocks_0_1_transformer_blocks_0_ff_net_0_proj",
                 "lora_unet_input_blocks_1_0_in_layers_2", "lora_unet_input_blocks_2_0_op",
                 "lora_unet_output_blocks_1_2_conv", "lora_unet_middle_block_0_emb_layers_1",
                 "lora_te1_text_model_encoder_layers_0_self_attn_q_proj",
                 "lora_te2_text_model_encoder_layers_2_mlp_fc2"):
        assert name in modules, name
    assert not any(part in m for m in modules for part in ("down_blocks", "mid_block", "up_blocks"))

    pipe = pipeline(tiny_sdxl)
    with library_messages() as messages:
        pipe.load_lora_weights(str(written))
    problems = [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]
    assert not problems, problems
    for component, names in by_component.items():
        assert len(tuner_modules(getattr(pipe, component))) == len(names), component
    loaded = {name: getattr(pipe, name) for name in COMPONENTS}
    assert_same_outputs(adapted_models(lora_run, tiny_sdxl), loaded, base_models(tiny_sdxl))


def test_merged_single_file_computes_the_adapted_models(lora_run, tiny_sdxl, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    written = convert_checkpoint(lora_run, tmp_path, adapter_output="merged")
    with library_messages() as messages:
        loaded = StableDiffusionXLPipeline.from_single_file(str(written), config=str(tiny_sdxl),
                                                            local_files_only=True)
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]
    assert_same_outputs(adapted_models(lora_run, tiny_sdxl), {name: getattr(loaded, name) for name in COMPONENTS},
                        base_models(tiny_sdxl))


def test_diffusers_layout_loads_into_every_module_of_both_encoders(lora_run, tiny_sdxl, tmp_path):
    written = convert_checkpoint(lora_run, tmp_path, fmt="diffusers")
    tensors, _ = file_tensors(written)
    assert {key.split(".")[0] for key in tensors} == set(COMPONENTS)
    pipe = pipeline(tiny_sdxl)
    with library_messages() as messages:
        pipe.load_lora_weights(str(written.parent))
    assert not [m for m in messages if "unexpected" in m.lower() or "missing" in m.lower()]
    expected = adapted_models(lora_run, tiny_sdxl)
    for component in COMPONENTS:
        assert tuner_modules(getattr(pipe, component)) == tuner_modules(expected[component]), component
    assert_same_outputs(expected, {name: getattr(pipe, name) for name in COMPONENTS}, base_models(tiny_sdxl))


def test_without_text_encoders_the_file_holds_the_unet_adapter_in_sdxl_naming(lora_run, tmp_path):
    written = convert_checkpoint(lora_run, tmp_path / "unet.safetensors", text_encoder=False)
    tensors, metadata = file_tensors(written)
    assert {key.split("_")[1] for key in tensors} == {"unet"}
    assert any(key.startswith("lora_unet_input_blocks_") for key in tensors)
    assert metadata["ss_base_model_version"] == "sdxl_base_v1-0"


def test_kohya_file_reads_back_as_init_from(lora_run, tiny_sdxl, tmp_path):
    """A run that starts from the file saves, after one step at learning rate 0 (the first of a warmup from
    0), the adapter it read."""
    from safetensors.torch import load_file

    source = checkpoints.latest_checkpoint(lora_run)
    run = train_sdxl(tmp_path / "again", **{
        "network.type": "lora", "network.rank": 4, "network.alpha": 2, "network.conv_rank": 2,
        "network.conv_alpha": 1, "network.init_from": str(source / "adapter.safetensors"),
        "optimizer.lr_scheduler.warmup.enabled": True, "optimizer.lr_scheduler.warmup.init_lr": 0.0,
        "trainer.max_steps": 1, "checkpoint.every_n_train_steps": 1})
    checkpoint = checkpoints.latest_checkpoint(run)
    for component in COMPONENTS:
        want = load_file(str(source / component / "adapter_model.safetensors"))
        got = load_file(str(checkpoint / component / "adapter_model.safetensors"))
        assert want.keys() == got.keys(), component
        assert all(torch.equal(want[key], got[key]) for key in want), component
