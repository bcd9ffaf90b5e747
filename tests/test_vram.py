"""The pre-flight VRAM estimate: it matches what training really allocates, and the low-memory presets fit."""
import re

import pytest
import torch

from conftest import ROOT, run_cli
from engine import config as cfg
from engine import events, vram
from engine.testing import tiny_config

GIB = 2**30


def tiny(tmp_path, **overrides):
    return cfg.load(base=tiny_config(tmp_path, **overrides))


def model_bytes(*models) -> int:
    return sum(p.numel() * p.element_size() for model in models for p in model.parameters())


def measure_training(config) -> vram.VramEstimate:
    """Train on real tensors under the same tracker; the peak as of the last step."""
    from engine.train import Trainer

    tracker = vram.memory_tracker()
    peaks = []
    with tracker:
        result = Trainer(config, on_event=lambda e: peaks.append(tracker.peak())
                         if isinstance(e, events.Step) else None).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    return peaks[-1]


@pytest.mark.parametrize("overrides", [
    {"trainer.accumulate_grad_batches": 2},
    {"gradient_checkpointing": True, "optimizer.name": "adamw8bit", "train_text_encoder": True},
    # CLIP skip never runs the text encoder's last layer, which training therefore freezes
    {"train_text_encoder": True, "clip_stop_at_layer": 2, "uncond.enabled": True, "min_snr_gamma": 5.0},
    {"cache.latents": True, "cache.text_embeddings": True, "ema.enabled": True, "optimizer.fused_backward": True},
    # (bitsandbytes' CPU fallback allocates temporaries its CUDA kernels do not, so 8-bit AdamW is measured
    # only where its step does not set the peak.)
    {"weights_dtype": "bf16", "optimizer.fused_backward": True, "trainer.accumulate_grad_batches": 2},
    {"network.type": "lora", "network.rank": 4, "network.conv_rank": 2, "network.conv_alpha": 1.0,
     "train_text_encoder": True, "gradient_checkpointing": True},
], ids=["adamw-fp32-accumulating", "checkpointing-8bit-text-encoder", "text-encoder-clip-skip",
        "cached-ema-fused", "bf16-fused-accumulating", "locon-with-text-encoder"])
def test_estimate_matches_the_bytes_training_allocates(tiny_model, class_images, tmp_path, overrides):
    from engine.models.sd import load_components

    config = tiny(tmp_path, **{"trainer.max_steps": 2, "sampling.interval_steps": 0,
                               "checkpoint.every_n_train_steps": 100,
                               "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})
    estimated = vram.estimate(config)
    measured = measure_training(config)

    # Stated tolerance: 2 %. Both count tensor bytes on the CPU; what differs is the estimate's synthetic
    # batch and noise against the trainer's real ones.
    assert estimated.peak == pytest.approx(measured.peak, rel=0.02)
    # The estimate builds the trainer's optimizer over the trainer's choice of parameters: the same state.
    assert estimated.optimizer_state == measured.optimizer_state
    assert estimated.gradients == pytest.approx(measured.gradients, rel=0.02, abs=1e-6)
    # On the CPU training keeps the VAE and text encoder on the device, cached or not; weights_dtype
    # applies to the trained models.
    components = load_components(config.model)
    trained = [components.unet] + ([components.text_encoder] if config.train_text_encoder else [])
    if config.network.adapter:
        from engine.models.adapters import add_adapter

        for name, model in zip(("unet", "text_encoder"), trained):
            add_adapter(model, name, config.network, 0)
    frozen = [components.vae] + ([] if config.train_text_encoder else [components.text_encoder])
    on_device = model_bytes(*trained) // (2 if config.weights_dtype == "bf16" else 1) + model_bytes(*frozen)
    assert estimated.parameters * GIB == on_device


def test_bitsandbytes_state_is_laid_out_as_bitsandbytes_allocates_it(tiny_model):
    import bitsandbytes as bnb
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model / "unet")
    params = list(unet.parameters())
    assert any(p.numel() < vram.BNB_MIN_8BIT_SIZE for p in params) and any(
        p.numel() >= vram.BNB_MIN_8BIT_SIZE for p in params)
    real = bnb.optim.AdamW8bit(params, lr=1e-3)
    for p in params:
        p.grad = torch.ones_like(p)
    real.step()
    modelled = vram.BitsandbytesState(params)
    for p in params:
        real_bytes = {k: v.nbytes for k, v in real.state[p].items() if torch.is_tensor(v)}
        assert real_bytes == {k: v.nbytes for k, v in modelled.state[p].items()}
    # The quantization maps are shared by all parameters of one optimizer.
    for optimizer in (real, modelled):
        maps = {v.untyped_storage().data_ptr() for state in optimizer.state.values()
                for k, v in state.items() if k.startswith("qmap")}
        assert len(maps) == 2


def test_memory_features_change_the_estimate_as_modelled(tiny_model, tmp_path):
    from engine.models.sd import load_components

    # Estimates for the GPU, which training leaves when both caches are in use.
    base = {"optimizer.name": "adamw8bit", "gradient_checkpointing": True, "trainer.accelerator": "gpu"}
    plain = vram.estimate(tiny(tmp_path, **base))
    components = load_components(str(tiny_model))

    # bf16 halves the trained UNet; the frozen VAE and text encoder stay in fp32.
    bf16 = vram.estimate(tiny(tmp_path, **base, weights_dtype="bf16"))
    assert (plain.parameters - bf16.parameters) * GIB == model_bytes(components.unet) / 2

    cached = vram.estimate(tiny(tmp_path, **base, **{"cache.latents": True, "cache.text_embeddings": True}))
    assert (plain.parameters - cached.parameters) * GIB == model_bytes(components.vae, components.text_encoder)

    # Without fusing, the peak comes at the end of backward with (nearly) every gradient alive.
    fused = vram.estimate(tiny(tmp_path, **base, **{"optimizer.fused_backward": True}))
    largest_gradient = max(p.numel() * p.element_size() for p in components.unet.parameters())
    assert plain.gradients * GIB > 5 * largest_gradient
    assert fused.gradients * GIB <= largest_gradient
    assert fused.peak < plain.peak

    accumulating = vram.estimate(tiny(tmp_path, **base, **{"trainer.accumulate_grad_batches": 4}))
    assert accumulating.gradients * GIB == model_bytes(components.unet)
    assert accumulating.peak > plain.peak

    without = vram.estimate(tiny(tmp_path, **{"data.resolution": 128}))
    checkpointed = vram.estimate(tiny(tmp_path, **{"data.resolution": 128, "gradient_checkpointing": True}))
    assert checkpointed.activations < 0.8 * without.activations


def test_shipped_architectures_have_the_published_sizes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import CLIPTextConfig, CLIPTextModel

    expected = {"sd15": (859_520_964, 123_060_480, 83_653_863), "sd21": (865_910_724, 340_387_840, 83_653_863)}
    for name, sizes in expected.items():
        config = cfg.load(base={"model": f"models/{name}.safetensors"})
        architecture = vram.resolve_architecture(config, name)
        with FakeTensorMode():
            models = (UNet2DConditionModel.from_config(architecture.unet),
                      CLIPTextModel(CLIPTextConfig.from_dict(architecture.text_encoder)),
                      AutoencoderKL.from_config(architecture.vae))
            assert tuple(sum(p.numel() for p in m.parameters()) for m in models) == sizes


def test_architecture_comes_from_the_model_folder_or_its_name(tiny_model):
    def source(model, arch=None):
        return vram.resolve_architecture(cfg.load(base={"model": model}), arch).source

    assert source("runwayml/stable-diffusion-v1-5") == "sd15"
    assert source("stabilityai/stable-diffusion-2-1") == "sd21"
    assert source("models/v2-1_768-ema-pruned.safetensors") == "sd21"
    assert source("models/sd21-custom.ckpt") == "sd21"
    assert source("models/my-finetune.safetensors") == "sd15"
    assert source("models/my-finetune.safetensors", "sd21") == "sd21"
    # A diffusers folder describes itself, whatever --arch says.
    assert source("demo:tiny-sd", "sd21") == str(tiny_model)
    assert vram.resolve_architecture(cfg.load(base={"model": "demo:tiny-sd"})).unet["block_out_channels"] == [32, 64]


@pytest.mark.parametrize("preset,limit", [("dreambooth-10gb", 6.0), ("dreambooth-6gb", 4.5), ("lora-4gb", 3.0)])
def test_low_memory_presets_fit_their_budget_on_sd15(preset, limit):
    config = cfg.load(ROOT / "presets" / f"{preset}.yaml")
    assert vram.resolve_architecture(config).source == "sd15"
    shape = vram.step_shape(config)
    assert (shape.rows, shape.width, shape.height) == (2, 512, 512)
    result = vram.estimate(config)
    assert result.peak <= limit
    parts = (result.parameters, result.gradients, result.optimizer_state, result.activations, result.other)
    assert sum(parts) == pytest.approx(result.peak)
    stated = float(re.search(r"est\. ([0-9.]+) GiB peak", config.description).group(1))
    assert stated == pytest.approx(result.peak, abs=0.05)


def test_cli_prints_the_breakdown_and_ends_with_the_peak(tiny_model, tmp_path):
    preset = ROOT / "presets" / "tiny-demo-cpu.yaml"
    result = run_cli("estimate-vram", "--config", str(preset), "--set", "batch_size=1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    expected = vram.estimate(cfg.load(preset, ["batch_size=1"]))
    assert lines[-1] == f"peak_gib: {expected.peak:.3f}"
    assert f"parameters_gib: {expected.parameters:.3f}" in lines
    assert "2 rows of 64x64" in result.stdout

    bad = run_cli("estimate-vram", "--config", str(preset), "--arch", "sdxl")
    assert bad.returncode == 2 and "--arch" in bad.stderr
