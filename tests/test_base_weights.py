"""Frozen weights stored in bf16 or fp8: outputs and input gradients equal the layer computed with the
dequantized weights, adapters over a stored base train in full precision, and backward keeps only the
stored bytes."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, inject_adapter_in_model

from engine.base_weights import STORAGE, StoredConv2d, StoredLinear, store_frozen


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


@pytest.mark.parametrize("storage", ["bf16", "fp8"])
def test_a_stored_network_computes_with_its_dequantized_weights(storage):
    net = model()
    assert store_frozen(net, STORAGE[storage]) == 3
    assert {p.dtype for p in net.parameters() if p.dim() > 1} == {STORAGE[storage]}
    reference = dequantized_copy(net)
    x = torch.randn(4, 3, 4, 4, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    out, out_ref = net(x), reference(x_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    out.square().sum().backward()
    out_ref.square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # the storage loses precision: the dequantized weights are not the originals (fp8 more than bf16)
    error = (reference[4].weight - model()[4].weight).abs().max().item()
    assert 0 < error < (0.05 if storage == "fp8" else 0.005)


def test_backward_keeps_the_stored_weight_not_an_upcast_copy():
    net = model()
    store_frozen(net, torch.float8_e4m3fn)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        net(torch.randn(2, 3, 4, 4, requires_grad=True)).sum().backward()
    weight_shapes = {tuple(layer.weight.shape) for layer in net.modules() if hasattr(layer, "scale")}
    kept = [(tuple(t.shape), t.dtype) for t in saved if tuple(t.shape) in weight_shapes]
    assert kept and all(dtype == torch.float8_e4m3fn for _, dtype in kept)


def test_a_lora_over_an_fp8_base_trains_in_full_precision_and_equals_it_over_the_dequantized_base():
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["2", "4"], init_lora_weights=False)
    net = inject_adapter_in_model(config, model())
    assert store_frozen(net, torch.float8_e4m3fn) == 3  # the conv and both adapted layers' bases
    lora = [p for name, p in net.named_parameters() if "lora_" in name]
    assert lora and all(p.dtype == torch.float32 and p.requires_grad for p in lora)
    reference = inject_adapter_in_model(config, model())
    reference.load_state_dict({name: value for name, value in net.state_dict().items() if "lora_" in name},
                              strict=False)
    for (name, layer), (_, plain) in zip(net.named_modules(), reference.named_modules()):
        if isinstance(layer, (StoredLinear, StoredConv2d)):
            plain.weight.data = layer.dequantized()
    x = torch.randn(4, 3, 4, 4)
    net(x).square().mean().backward()
    reference(x).square().mean().backward()
    for (name, p), (_, q) in zip(net.named_parameters(), reference.named_parameters()):
        if "lora_" in name:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)


def test_dora_over_an_fp8_base_is_refused_naming_the_key():
    from engine import config as cfg

    with pytest.raises(cfg.ConfigError, match="config key 'base_dtype': DoRA"):
        cfg.from_dict({"model": "x", "base_dtype": "fp8", "network": {"type": "dora"}})
    cfg.from_dict({"model": "x", "base_dtype": "bf16", "network": {"type": "dora"}})


def test_autocast_computes_a_stored_layer_in_bf16():
    layer = StoredLinear(torch.nn.Linear(16, 8).requires_grad_(False), torch.float8_e4m3fn)
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
