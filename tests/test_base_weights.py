"""Frozen weights stored in bf16, fp8, int8 or nf4: outputs and input gradients equal the layer computed with
the dequantized weights, adapters over a stored base train in full precision, and backward keeps only the
stored bytes. An nf4 base trains a LoRA end to end, merges as its dequantized weights, is counted by the
estimates as it is stored, and is refused where nothing frozen would be quantized."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from engine import config as cfg
from engine.base_weights import STORAGE, StoredConv2d, StoredLinear, store_frozen
from engine.testing import tiny_config


def model() -> torch.nn.Module:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 4 * 4, 32), torch.nn.GELU(), torch.nn.Linear(32, 5))
    return net.requires_grad_(False)


def dequantized_copy(stored: torch.nn.Module) -> torch.nn.Module:
    """The same network with each stored layer's dequantized weights in a plain fp32 layer."""
    plain = model()
    for (name, layer), (_, original) in zip(stored.named_modules(), plain.named_modules()):
        if isinstance(layer, (StoredLinear, StoredConv2d)):
            original.weight.data = layer.dequantized()
    return plain


def assert_computes_alike(net: torch.nn.Module, reference: torch.nn.Module) -> None:
    """The same output and the same gradient of the input, to 1e-5."""
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = net(x), reference(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("storage", ["bf16", "fp8", "int8", "nf4"])
def test_a_stored_network_computes_with_its_dequantized_weights(storage):
    net = model()
    assert store_frozen(net, STORAGE[storage]) == 3
    assert {layer.stored.dtype for layer in net.modules() if hasattr(layer, "scale")} == {STORAGE[storage]}
    reference = dequantized_copy(net)
    assert_computes_alike(net, reference)
    # the storage loses precision: the dequantized weights are not the originals (the fewer bits, the more)
    error = (reference[4].weight - model()[4].weight).abs().max().item()
    assert 0 < error < {"bf16": 0.005, "fp8": 0.05, "int8": 0.005, "nf4": 0.05}[storage]


@pytest.mark.parametrize("storage", ["fp8", "int8", "nf4"])
def test_a_compiled_stored_network_computes_as_the_eager_one(storage):
    """`compile` traces the stored layers inside the blocks it compiles, and checks each op's outputs against
    the op's own shape function (bitsandbytes' nf4 kernel returns a 1-D shape as one row)."""
    net = model()
    store_frozen(net, STORAGE[storage])
    assert_computes_alike(torch.compile(net, dynamic=False), net)


def test_backward_keeps_the_stored_weight_not_an_upcast_copy():
    net = model()
    store_frozen(net, torch.float8_e4m3fn)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    weight_shapes = {tuple(layer.weight.shape) for layer in net.modules() if hasattr(layer, "scale")}
    kept = [(tuple(t.shape), t.dtype) for t in saved if tuple(t.shape) in weight_shapes]
    assert kept and all(dtype == torch.float8_e4m3fn for _, dtype in kept)


def dequantized_reference(net: torch.nn.Module, config) -> torch.nn.Module:
    """The adapter of net (over a stored base) in a plain network of the dequantized weights."""
    reference = inject_adapter_in_model(config, model())
    reference.load_state_dict({name: value for name, value in net.state_dict().items() if "lora_" in name},
                              strict=False)
    for (name, layer), (_, plain) in zip(net.named_modules(), reference.named_modules()):
        if isinstance(layer, (StoredLinear, StoredConv2d)):
            plain.weight.data = layer.dequantized()
    return reference


@pytest.mark.parametrize("storage", ["fp8", "int8", "nf4"])
def test_a_lora_over_a_stored_base_trains_in_full_precision_and_equals_it_over_the_dequantized_base(storage):
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["2", "4"], init_lora_weights=False)
    net = inject_adapter_in_model(config, model())
    assert store_frozen(net, STORAGE[storage]) == 3  # the conv and both adapted layers' bases
    lora = [p for name, p in net.named_parameters() if "lora_" in name]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    reference = dequantized_reference(net, config)
    x = torch.randn(4, 3, 4, 4)
    net(x).square().mean().backward()
    reference(x).square().mean().backward()
    reference_lora = {name: p for name, p in reference.named_parameters() if "lora_" in name}
    assert reference_lora.keys() == {name for name, p in net.named_parameters() if "lora_" in name}
    for name, p in net.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(p.grad, reference_lora[name].grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("storage", ["fp8", "int8", "nf4"])
def test_dora_over_a_one_byte_or_smaller_base_is_refused_naming_the_key(storage):
    with pytest.raises(cfg.ConfigError, match=f"^config key 'base_dtype': DoRA .* {storage} storage"):
        cfg.from_dict({"model": "x", "base_dtype": storage, "network": {"type": "dora"}})
    cfg.from_dict({"model": "x", "base_dtype": "bf16", "network": {"type": "dora"}})


@pytest.mark.parametrize("storage", ["int8", "nf4"])
def test_a_quantized_base_with_a_full_fine_tune_is_refused_naming_the_key(storage):
    with pytest.raises(cfg.ConfigError, match=f"^config key 'base_dtype': {storage} quantizes an adapter's"):
        cfg.from_dict({"model": "x", "base_dtype": storage, "network": {"type": "full"}})
    for network in ("lora", "loha", "lokr"):
        cfg.from_dict({"model": "x", "base_dtype": storage, "network": {"type": network}})


@pytest.mark.parametrize("storage", ["fp8", "nf4"])
def test_autocast_computes_a_stored_layer_in_bf16(storage):
    layer = StoredLinear(torch.nn.Linear(16, 8).requires_grad_(False), STORAGE[storage])
    x = torch.randn(2, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), F.linear(x, layer.dequantized(), layer.bias), rtol=2e-2, atol=2e-2)


def test_t5_keeps_the_layers_transformers_feeds_in_their_weights_dtype_out_of_fp8():
    """T5's feed-forward casts its input to `wo`'s weight dtype (transformers' _keep_in_fp32_modules): stored
    in fp8, the activations themselves would be rounded to fp8. `wo` is stored in bf16 instead."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=64, d_model=32, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0)
    reference = T5EncoderModel(config).eval().requires_grad_(False)
    stored = T5EncoderModel(config).eval().requires_grad_(False)
    stored.load_state_dict(reference.state_dict())
    store_frozen(stored, torch.float8_e4m3fn)
    dtypes = {name: layer.weight.dtype for name, layer in stored.named_modules() if isinstance(layer, StoredLinear)}
    assert {d for n, d in dtypes.items() if n.endswith(".wo")} == {torch.bfloat16}
    assert {d for n, d in dtypes.items() if not n.endswith(".wo")} == {torch.float8_e4m3fn}
    ids = torch.randint(0, 64, (2, 7))
    out, expected = stored(ids).last_hidden_state, reference(ids).last_hidden_state
    assert out.dtype == torch.float32
    assert (out - expected).abs().max() < 0.1 * expected.abs().max()


def test_the_stored_bytes_of_an_nf4_base_stay_as_they_are_through_training():
    """The base is quantized once: optimizer steps reach the adapter only and never round the base again."""
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["2", "4"])
    net = inject_adapter_in_model(config, model())
    store_frozen(net, STORAGE["nf4"])
    before = {name: t.clone() for name, t in net.state_dict().items() if "lora_" not in name}
    lora = [p for name, p in net.named_parameters() if "lora_" in name]
    optimizer = torch.optim.AdamW(lora, lr=0.1)
    start = [p.detach().clone() for p in lora]
    for _ in range(3):
        net(torch.randn(4, 3, 4, 4)).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = {name: t for name, t in net.state_dict().items() if "lora_" not in name}
    assert before.keys() == after.keys() and any(t.dtype == torch.uint8 for t in after.values())
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert any(not torch.equal(p, q) for p, q in zip(lora, start))


def test_an_adapter_merged_over_an_nf4_base_equals_it_applied_over_the_dequantized_base():
    from engine.models.adapters import merge_adapter

    config = LoraConfig(r=4, lora_alpha=4, target_modules=["2", "4"], init_lora_weights=False)
    net = inject_adapter_in_model(config, model())
    store_frozen(net, STORAGE["nf4"])
    reference = dequantized_reference(net, config)
    merged = merge_adapter(net)
    assert not any(isinstance(m, (StoredLinear, StoredConv2d)) for m in merged.modules())
    assert {p.dtype for p in merged.parameters()} == {torch.float32}
    x = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(merged(x), reference(x), rtol=1e-5, atol=1e-5)
    # the merge is over the nf4-rounded base, not the original weights
    assert not torch.allclose(merged[0].weight, model()[0].weight, atol=1e-3)


def lora_values(tmp_path, **overrides) -> dict:
    return tiny_config(tmp_path / "out", **{
        "base_dtype": "nf4", "network": {"type": "lora", "rank": 4, "alpha": 4.0},
        "prior_preservation.enabled": False, "sampling.interval_steps": 0, **overrides})


def test_the_estimates_count_an_nf4_base_as_it_is_stored(tiny_model, tmp_path):
    """The VRAM estimate (fake tensors through the same setup) holds the bytes the really stored weights
    occupy, packed codes and scales: about 0.56 of a byte per weight."""
    from engine import vram
    from engine.base_weights import Stored
    from engine.models.family import family_for
    from engine.plan import make_plan
    from engine.setup import prepare_models

    # cached latents put the VAE off the estimated GPU: what remains is the stored UNet and text encoder
    gpu = {"trainer.accelerator": "gpu", "cache.latents": True}
    config = cfg.from_dict(lora_values(tmp_path, **gpu))
    estimated = vram.estimate(config)
    plan = make_plan(config, "cuda")
    assert plan.vae_off_device
    components = family_for(config).load(config)
    prepare_models(family_for(config), components, config, plan, torch.device("cpu"))
    on_device = [components.unet, components.text_encoder]
    stored = [m for model in on_device for m in model.modules() if isinstance(m, Stored)]
    assert {m.stored.dtype for m in stored} == {torch.uint8}
    quantized = sum(m.weight.numel() for m in stored)
    stored_bytes = sum(m.stored.nbytes + m.scale.nbytes for m in stored)
    assert stored_bytes == pytest.approx(quantized * (0.5 + 4 / 64), rel=0.01)
    actual = sum(p.nbytes for model in on_device for p in model.parameters())
    assert estimated.parameters * 2**30 == pytest.approx(actual, rel=0.02)
    fp32 = vram.estimate(cfg.from_dict(lora_values(tmp_path, **gpu, base_dtype="fp32")))
    saved = (fp32.parameters - estimated.parameters) * 2**30
    assert saved == pytest.approx(quantized * 4 - stored_bytes, rel=0.02)


def test_a_lora_over_an_nf4_base_trains_says_so_in_its_file_and_merges_over_its_dequantized_base(tiny_model,
                                                                                                 tmp_path):
    import json

    from safetensors import safe_open

    from engine import events
    from engine.models import kohya
    from engine.train import Trainer

    config = cfg.from_dict(lora_values(tmp_path, **{"trainer.max_steps": 16, "checkpoint.every_n_train_steps": 16,
                                                    "optimizer.params.lr": 1e-2,
                                                    "optimizer.lr_scheduler.warmup.enabled": False}))
    result = Trainer(config).run()
    assert isinstance(result, events.Finished), getattr(result, "error", result)
    metrics = [json.loads(line) for line in (Path(result.run_dir) / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics]
    assert len(losses) == 16 and sum(losses[-4:]) < 0.9 * sum(losses[:4]), losses
    (adapter_file,) = Path(result.run_dir).rglob(kohya.ADAPTER_EXPORT)
    with safe_open(str(adapter_file), "pt") as handle:
        assert handle.metadata()["ss_base_dtype"] == "nf4"

    # convert --merge folds the adapter into the base as the run stored it: the merged UNet computes what
    # the adapter over the nf4 base computed in training, not the adapter over the original weights
    from engine.models.convert import load_source

    merged = load_source(result.run_dir, ("unet",)).models["unet"].eval()
    adapted = load_source(result.run_dir, ("unet",), merge_adapters=False).models["unet"].eval()
    assert not any(isinstance(m, (StoredLinear, StoredConv2d)) for m in merged.modules())
    torch.manual_seed(0)
    inputs = (torch.randn(1, merged.config.in_channels, 8, 8), torch.tensor([500]),
              torch.randn(1, 77, merged.config.cross_attention_dim))
    with torch.no_grad():
        over_original = adapted(*inputs).sample
        store_frozen(adapted, STORAGE["nf4"])
        torch.testing.assert_close(merged(*inputs).sample, adapted(*inputs).sample, rtol=1e-4, atol=1e-4)
        assert (merged(*inputs).sample - over_original).abs().max() > 1e-3
