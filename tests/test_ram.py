"""The system-RAM estimate and the dtypes models are read in: a base stored in bf16, fp8, int8 or nf4 is read in bf16
and never held in fp32, and the estimate counts what the loader really holds."""
from __future__ import annotations

import pytest
import torch

from engine import config as cfg
from engine.models.family import family_for, text_encoder_parts
from engine.ram import GIB, PROCESS_GIB, load_dtype, loading_gib, training_gib
from engine.plan import make_plan


def values(tiny, **more):
    return {"model": str(tiny), "prior_preservation": {"enabled": False},
            "data": {"concepts": [{"instance_set": {"path": "x"}}]}, **more}


def components_by_name(components) -> dict:
    return {"unet": components.unet, **text_encoder_parts(components.text_encoder), "vae": components.vae}


@pytest.mark.parametrize("base_dtype, network, weights_dtype, stored", [
    ("fp32", "lora", "fp32", {}),
    ("bf16", "lora", "fp32", {"unet", "text_encoder"}),
    ("fp8", "loha", "fp32", {"unet", "text_encoder"}),
    ("nf4", "lokr", "fp32", {"unet", "text_encoder"}),  # quantized from bf16 once loaded
    ("bf16", "full", "fp32", {"text_encoder"}),  # a full fine-tune reads the model it trains in fp32…
    ("fp32", "full", "bf16", {"unet"}),  # …unless it trains it in bf16
    ("fp32", "lora", "bf16", {"unet"}),  # an adapter's base under weights_dtype: bf16
])
def test_models_are_read_in_the_dtype_the_run_keeps_them_in(tiny_model, base_dtype, network, weights_dtype, stored):
    config = cfg.from_dict(values(tiny_model, base_dtype=base_dtype, network={"type": network},
                                  weights_dtype=weights_dtype))
    components = components_by_name(family_for(config).load(config))
    for name, module in components.items():
        expected = torch.bfloat16 if name in stored else torch.float32
        assert load_dtype(config, name) == expected
        assert {p.dtype for p in module.parameters()} == {expected}, name
    held = sum(p.numel() * p.element_size() for m in components.values() for p in (*m.parameters(), *m.buffers())
               if p.is_floating_point())
    ints = sum(b.numel() * b.element_size() for m in components.values() for b in m.buffers()
               if not b.is_floating_point())
    assert loading_gib(config, components) == pytest.approx((held + ints) / GIB + PROCESS_GIB, rel=1e-9)


def test_the_training_figure_holds_the_models_that_wait_off_the_gpu_and_ema_on_the_cpu(tiny_model):
    config = cfg.from_dict(values(tiny_model, data={"center_crop": True, "concepts": [{"instance_set": {"path": "x"}}]},
                                  cache={"latents": True, "text_embeddings": True},
                                  ema={"enabled": True, "on_cpu": True}))
    components = components_by_name(family_for(config).load(config))
    on_gpu = make_plan(config, "cuda", 1)
    vae = sum(p.numel() * 4 for p in (*components["vae"].parameters(), *components["vae"].buffers()))
    encoder = components["text_encoder"]
    text = sum(p.numel() * p.element_size() for p in (*encoder.parameters(), *encoder.buffers()))
    encoder.requires_grad_(False)  # as setup leaves the frozen models
    components["vae"].requires_grad_(False)
    ema = sum(p.numel() * 4 for p in components["unet"].parameters())
    assert training_gib(config, on_gpu, components, step_peak_gib=3.0) == pytest.approx(
        (vae + text + ema) / GIB + PROCESS_GIB)
    # on a CPU everything, the step included, is in system memory
    assert training_gib(config, make_plan(config, "cpu", 1), components, step_peak_gib=3.0) == 3.0 + PROCESS_GIB
