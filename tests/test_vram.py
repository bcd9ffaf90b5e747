"""The pre-flight VRAM estimate: it matches what training really allocates, and the low-memory presets fit."""
import dataclasses
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
    # (optimizers of bitsandbytes and Prodigy, modelled by stand-ins that allocate no step temporaries, are
    # checked by test_estimate_keeps_the_optimizer_state_training_keeps)
    {"optimizer.name": "adamw_schedulefree", "train_text_encoder": True},
    # SDXL: the first text encoder trains, the second stays frozen beside the cached latents
    {"model": "demo:tiny-sdxl", "train_text_encoder": True, "train_text_encoder_2": False,
     "gradient_checkpointing": True, "cache.latents": True, "clip_stop_at_layer": 2},
], ids=["adamw-fp32-accumulating", "checkpointing-8bit-text-encoder", "text-encoder-clip-skip",
        "cached-ema-fused", "bf16-fused-accumulating", "locon-with-text-encoder", "schedulefree-text-encoder",
        "sdxl-first-text-encoder-cached-latents"])
def test_estimate_matches_the_bytes_training_allocates(tiny_model, tiny_sdxl, class_images, tmp_path, overrides):
    from engine.models.family import family_for
    from engine.plan import make_plan
    from engine.setup import frozen_models, trained_parts

    config = tiny(tmp_path, **{"trainer.max_steps": 2, "sampling.interval_steps": 0,
                               "checkpoint.every_n_train_steps": 100,
                               "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})
    estimated = vram.estimate(config)
    measured = measure_training(config)

    # Stated tolerance: 3 %. Both count tensor bytes on the CPU; what differs is the estimate's synthetic
    # batch and noise against the trainer's real ones, and when Python's collector frees the reference
    # cycles a step leaves (seen up to 2.2 % of these tiny models' peak, depending on what ran before).
    assert estimated.peak == pytest.approx(measured.peak, rel=0.03)
    # The estimate builds the trainer's optimizer over the trainer's choice of parameters: the same state.
    assert estimated.optimizer_state == measured.optimizer_state
    assert estimated.gradients == pytest.approx(measured.gradients, rel=0.02, abs=1e-6)
    # On the CPU training keeps the VAE and text encoder on the device, cached or not; weights_dtype
    # applies to the trained models.
    plan = make_plan(config, "cpu")
    components = family_for(config).load(config)
    trained = trained_parts(components, plan)
    if config.network.adapter:
        from engine.models.adapters import add_adapter

        for name, model in trained.items():
            add_adapter(model, name, config.network, 0)
    frozen = frozen_models(components, plan)
    # the trained models in plan.weights (read from disk in it, or cast to it)
    on_device = (sum(p.numel() * plan.weights.itemsize for model in trained.values() for p in model.parameters())
                 + model_bytes(*frozen))
    assert estimated.parameters * GIB == on_device


def state_bytes(optimizer) -> int:
    """The bytes of the tensors in an optimizer's state (each inner one's, for one per parameter); a tensor
    that several parameters share (bitsandbytes' quantization maps) counts once."""
    tensors = {id(value): value for each in getattr(optimizer, "optimizers", [optimizer])
               for state in each.state.values() for value in state.values() if torch.is_tensor(value)}
    return sum(value.nbytes for value in tensors.values())


@pytest.mark.parametrize("overrides", [
    {"optimizer.name": "lion"},
    {"optimizer.name": "lion8bit", "weights_dtype": "bf16"},
    {"optimizer.name": "prodigy", "optimizer.params.lr": 1.0},
    {"optimizer.name": "adafactor", "train_text_encoder": True},
    {"optimizer.name": "adafactor", "optimizer.params.relative_step": True,
     "optimizer.lr_scheduler.warmup.enabled": False, "optimizer.fused_backward": True},
    {"optimizer.name": "adamw_schedulefree"},
    {"optimizer.name": "adamw_schedulefree", "weights_dtype": "bf16", "optimizer.fused_backward": True},
    {"optimizer.name": "came", "network.type": "lora", "network.rank": 4},
], ids=["lion", "lion8bit-bf16", "prodigy", "adafactor-text-encoder", "adafactor-relative-fused", "schedulefree",
        "schedulefree-bf16-fused", "came-lora"])
def test_estimate_keeps_the_optimizer_state_training_keeps(tiny_model, class_images, tmp_path, monkeypatch,
                                                           one_torch_thread, overrides):
    """The estimator's optimizer (the real one on fake tensors, or a stand-in that allocates its state) holds
    as many bytes of state as the trainer's after its first step."""
    import engine.train
    from engine.models.sd import load_components
    from engine.train import Trainer

    config = tiny(tmp_path, **{"trainer.max_steps": 1, "sampling.interval_steps": 0,
                               "checkpoint.every_n_train_steps": 100,
                               "data.concepts[0].class_set.auto_generate.enabled": False, **overrides})
    built = {}

    def keep(name, build):
        def build_and_keep(*args, **kwargs):
            built[name] = build(*args, **kwargs)
            return built[name]
        return build_and_keep

    monkeypatch.setattr(vram, "steady_state_optimizer", keep("estimated", vram.steady_state_optimizer))
    monkeypatch.setattr(engine.train, "build_optimizer", keep("trained", engine.train.build_optimizer))
    vram.estimate(config)
    assert isinstance(Trainer(config).run(), events.Finished)
    estimated, trained = state_bytes(built["estimated"][0]), state_bytes(built["trained"])
    assert trained > 0
    if config.optimizer.name == "prodigy":
        # Prodigy keeps a one-element starting point for a parameter that starts at all zeros (the tiny
        # model's norm biases), which the estimate, on fake tensors, counts in full.
        unet = load_components(config.model).unet
        trained += sum((p.numel() - 1) * p.element_size() for p in unet.parameters() if not p.any())
    assert estimated == trained


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
    # Caches written during the first epoch keep both models on the device, and running, for that epoch.
    filling = vram.estimate(tiny(tmp_path, **base, **{"cache.latents": True, "cache.text_embeddings": True,
                                                      "cache.fill": "first_epoch"}))
    assert filling.parameters == plain.parameters and filling.peak == plain.peak

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


# Each SDXL estimate traces a 2.6-billion-parameter step (about a minute): the suite checks the tightest
# budget; bench/RESULTS.md holds all four SDXL presets.
def test_the_sdxl_8gb_dreambooth_preset_fits_its_budget_on_real_sdxl():
    config = cfg.load(ROOT / "presets" / "sdxl-dreambooth-8gb.yaml")
    assert vram.resolve_architecture(config).source == "sdxl"
    shape = vram.step_shape(config)
    assert (shape.rows, shape.width, shape.height) == (2, 1024, 1024)
    result = vram.estimate(config)
    # An 8 GB card holds 8 GiB; 7.0 leaves room for the CUDA context. (0.91 GiB of it is Adafactor's second
    # moment, which transformers' implementation factors over a 3x3 convolution's kernel dimensions.)
    assert result.peak <= 7.0
    # the full UNet trains in bf16, 4 of its 6 down and up blocks waiting on the CPU but for the two on the GPU
    # at a time; both text encoders and the VAE wait off the GPU
    assert config.memory.blocks_on_cpu == 4
    assert result.parameters < 2_567_463_684 * 2 / GIB - 0.2
    stated = float(re.search(r"est\. ([0-9.]+) GiB peak", config.description).group(1))
    assert stated == pytest.approx(result.peak, abs=0.05)


def shared_estimate(config, traces: dict):
    """The estimate of a preset, sharing `traces` with the presets that differ from it only in their blocks on
    the CPU (whose effect is counted from the blocks' sizes) and in their names."""
    return vram.estimate(dataclasses.replace(config, description="", project=""), traces=traces)


# The Flux.1 presets that fit small cards by block swap, traced on the real 12-billion-parameter transformer
# (about 20 s a trace here; the two LoRA presets differ only in their blocks on the CPU and share one); the
# limits leave 0.5 GiB or more of the card for the CUDA context.
FLUX_TRACES: dict = {}


@pytest.mark.parametrize("preset,limit", [("flux-lora-8gb", 7.5), ("flux-lora-6gb", 5.5),
                                          ("flux-finetune-24gb", 22.0), ("flux-finetune-16gb", 15.0)])
def test_the_flux_presets_for_small_cards_fit_their_budget(preset, limit):
    config = cfg.load(ROOT / "presets" / f"{preset}.yaml")
    assert vram.resolve_architecture(config).source == "flux1-dev" and config.memory.blocks_on_cpu > 0
    result = shared_estimate(config, FLUX_TRACES)
    assert result.peak <= limit
    stated = float(re.search(r"est\. ([0-9.]+) GiB GPU peak", config.description).group(1))
    assert stated == pytest.approx(result.peak, abs=0.05)
    ram = float(re.search(r"([0-9.]+) GiB system RAM", config.description).group(1))
    assert ram == pytest.approx(result.ram.peak, abs=0.5)


# Z-Image-Turbo's presets, traced on the real 6.15-billion-parameter transformer and Qwen3-4B (about 45 s a trace
# here); the two LoRA presets differ only in their blocks on the CPU and share one trace.
ZIMAGE_TRACES: dict = {}


@pytest.mark.parametrize("preset, card_gib", [("zimage-lora-12gb", 12), ("zimage-lora-8gb", 8),
                                             ("zimage-finetune-16gb", 16)])
def test_the_zimage_presets_fit_their_cards(preset, card_gib):
    config = cfg.load(ROOT / "presets" / f"{preset}.yaml")
    assert vram.resolve_architecture(config).source == "z-image"
    assert vram.step_shape(config).width == 1024
    result = shared_estimate(config, ZIMAGE_TRACES)
    assert result.peak <= card_gib - 0.75  # 0.75 GiB of the card kept for the CUDA context, as the memory plan does
    stated = float(re.search(r"est\. ([0-9.]+) GiB GPU peak", config.description).group(1))
    assert stated == pytest.approx(result.peak, abs=0.05)
    # the fp8 base: the transformer's 6.15 billion weights at a byte each (less the swapped blocks' on 8 GB), and
    # the adapter's in fp32
    if not config.memory.blocks_on_cpu:
        assert 6_154_908_736 / GIB < result.parameters < 6_154_908_736 / GIB + 0.3
    if config.network.type == "full":  # bf16 weights, 25 of the 30 main blocks off the card
        assert result.parameters < 0.35 * 2 * 6_154_908_736 / GIB


@pytest.mark.parametrize("preset, card_gib", [("chroma-lora-24gb", 24), ("chroma-lora-8gb", 8)])
def test_the_chroma_presets_fit_their_cards_as_their_descriptions_say(preset, card_gib):
    """Traced on the real 8.9-billion-parameter transformer: the plan-memory choices (24 GB: fp8 base, caches,
    gradient checkpointing; 8 GB: with all blocks on the CPU, an nf4 base and offloaded activations)."""
    config = cfg.load(ROOT / "presets" / f"{preset}.yaml")
    assert vram.resolve_architecture(config).source == "chroma"
    result = vram.estimate(config)
    assert result.peak <= card_gib - 0.75  # less the memory plan's CUDA reserve
    assert result.ram.peak <= 32


# Qwen-Image's presets, traced once on the real 20-billion-parameter transformer (about 45 s here): they differ
# only in the blocks on the CPU, whose effect is counted from the blocks' sizes, so the three share one trace.
# On 24 GB the fp8 base alone is 19 GiB, so the limit leaves the card 0.75 GiB for the CUDA context and nothing
# to spare; on 16 and 12 GB the plan put the last 30 and 40 of the 60 blocks on the CPU.
QWEN_IMAGE_TRACES: dict = {}


@pytest.mark.parametrize("preset, card_gib, on_card", [("qwen-image-lora-24gb", 24, (0.97, 1.03)),
                                                       ("qwen-image-lora-16gb", 16, (0.5, 0.6)),
                                                       ("qwen-image-lora-12gb", 12, (0.33, 0.43))])
def test_the_qwen_image_presets_fit_their_cards(preset, card_gib, on_card):
    config = cfg.load(ROOT / "presets" / f"{preset}.yaml")
    assert vram.resolve_architecture(config).source == "qwen-image"
    result = shared_estimate(config, QWEN_IMAGE_TRACES)
    assert len(QWEN_IMAGE_TRACES) == 1
    assert result.peak <= card_gib - 0.75
    stated = float(re.search(r"est\. ([0-9.]+) GiB GPU peak", config.description).group(1))
    assert stated == pytest.approx(result.peak, abs=0.05)
    # fp8: a byte a weight, nearly; of the swapped blocks only the two on the card at once
    low, high = on_card
    assert low * 20_430_401_088 / GIB < result.parameters < high * 20_430_401_088 / GIB


def test_the_qwen_image_edit_preset_fits_its_card_as_its_description_says():
    """Traced on the real Qwen-Image-Edit-2509 (its own trace: Qwen2.5-VL, on the GPU, reads each caption with a
    1024 px control image, whose latents double the transformer's image tokens): the plan's nf4 base with all 60
    blocks on the CPU."""
    config = cfg.load(ROOT / "presets" / "qwen-image-edit-lora-16gb.yaml")
    assert vram.resolve_architecture(config).family == "qwen-image-edit"
    assert vram.step_shape(config).width == 1024
    result = vram.estimate(config)
    assert result.peak <= 16 - 0.75  # less the memory plan's CUDA reserve
    stated = float(re.search(r"est\. ([0-9.]+) GiB GPU peak", config.description).group(1))
    assert stated == pytest.approx(result.peak, abs=0.05)
    ram = float(re.search(r"([0-9.]+) GiB system RAM", config.description).group(1))
    assert ram == pytest.approx(result.ram.peak, abs=0.5)


@pytest.mark.parametrize("preset, card_gib, arch", [("flux2-klein-lora-12gb", 12, "flux2-klein-4b"),
                                                     ("flux2-klein-lora-8gb", 8, "flux2-klein-4b"),
                                                     ("flux2-klein-9b-lora-12gb", 12, "flux2-klein-9b")])
def test_the_flux2_klein_presets_fit_their_cards_as_their_descriptions_say(preset, card_gib, arch):
    """Traced on the real FLUX.2 [klein] transformers and their Qwen3 (4B: a bf16 base on 12 GB, the plan's fp8
    base on 8 GB; 9B: the plan's fp8 base with 6 blocks on the CPU on 12 GB)."""
    config = cfg.load(ROOT / "presets" / f"{preset}.yaml")
    assert vram.resolve_architecture(config).source == arch
    result = vram.estimate(config)
    assert result.peak <= card_gib - 0.75  # less the CUDA context's share
    stated = float(re.search(r"est\. ([0-9.]+) GiB GPU peak", config.description).group(1))
    assert stated == pytest.approx(result.peak, abs=0.05)
    ram = float(re.search(r"([0-9.]+) GiB system RAM", config.description).group(1))
    assert ram == pytest.approx(result.ram.peak, abs=0.5)


def test_cli_prints_the_breakdown_and_ends_with_the_peak(tiny_model, tmp_path):
    preset = ROOT / "presets" / "tiny-demo-cpu.yaml"
    result = run_cli("estimate-vram", "--config", str(preset), "--set", "batch_size=1")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    expected = vram.estimate(cfg.load(preset, ["batch_size=1"]))
    assert f"peak_gib: {expected.peak:.3f}" in lines
    assert lines[-1] == f"system_ram_peak_gib: {expected.ram.peak:.3f}"
    assert f"parameters_gib: {expected.parameters:.3f}" in lines
    assert "2 rows of 64x64" in result.stdout

    bad = run_cli("estimate-vram", "--config", str(preset), "--arch", "sd3")
    assert bad.returncode == 2 and "--arch" in bad.stderr


def test_a_stored_base_counts_its_stored_bytes_and_the_estimate_says_so(tmp_path):
    """base_dtype: the frozen UNet base and text encoder on the device hold bf16 or fp8 bytes (plus fp8's
    per-row scales and the fp32 norms and biases), and the step's description names the storage."""
    base = {"network.type": "lora", "network.rank": 4, "network.alpha": 4.0, "data.resolution": 64}
    figures = {}
    for storage in ("fp32", "bf16", "fp8"):
        config = tiny(tmp_path, **base, base_dtype=storage)
        figures[storage] = vram.estimate(config).parameters
        described = vram.describe(config, vram.estimate_plan(config), vram.step_shape(config))
        assert ("over a frozen base" in described) == (storage == "fp32"), described
        if storage != "fp32":
            assert f"over a frozen {storage} base" in described and f"frozen text encoders in {storage}" in described
    # (on the tiny model the fp32 VAE, which is never stored, is most of the bytes)
    assert figures["fp8"] < figures["bf16"] < figures["fp32"]
