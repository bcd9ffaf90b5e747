"""The rectified-flow objective against hand computations: each timestep sampling scheme, the shifts, the
noisy input, the target, the loss weights and the timestep range; and the refusals of keys that belong
to the other kind of objective."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from engine import config as cfg
from engine.errors import UserError
from engine.objectives import Diffusion, RectifiedFlow

# FLUX.1-dev's scheduler config (the shipped real one's values)
DEV = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
           max_image_seq_len=4096)


def flow(scheduler_config: dict = DEV, **values) -> RectifiedFlow:
    config = cfg.from_dict({"model": "x", **values})
    return RectifiedFlow(config, FlowMatchEulerDiscreteScheduler(**scheduler_config), patch=2)


def draws(objective, seed: int, latent_shape=(16, 64, 64)) -> float:
    return objective.draw_timestep(torch.Generator().manual_seed(seed), latent_shape).item()


@pytest.mark.parametrize("scheme, settings", [
    ("uniform", {}),
    ("logit_normal", {"logit_mean": 0.5, "logit_std": 1.5}),
    ("sigmoid", {"sigmoid_scale": 2.0}),
])
def test_each_sampling_scheme_draws_sigma_as_computed_by_hand(scheme, settings):
    objective = flow({"shift": 1.0, "use_dynamic_shifting": False},
                     flow={"timestep_sampling": scheme, **settings})
    for seed in range(5):
        generator = torch.Generator().manual_seed(seed)
        if scheme == "uniform":
            sigma = torch.rand((), generator=generator).item()
        else:
            z = torch.randn((), generator=generator).item()
            mean, std = (0.5, 1.5) if scheme == "logit_normal" else (0.0, 2.0)
            sigma = 1 / (1 + math.exp(-(mean + std * z)))
        assert draws(objective, seed) == pytest.approx(sigma * 1000, rel=1e-6)


def test_a_fixed_shift_moves_sigma_toward_noise():
    plain = flow(flow={"timestep_sampling": "uniform", "shift": 1.0})
    shifted = flow(flow={"timestep_sampling": "uniform", "shift": 3.0})
    for seed in range(5):
        sigma = draws(plain, seed) / 1000
        assert draws(shifted, seed) / 1000 == pytest.approx(3 * sigma / (1 + 2 * sigma), rel=1e-6)
        assert draws(shifted, seed) > draws(plain, seed)


def test_the_models_own_shift_grows_with_the_image_as_bfls_schedule_computes_it():
    objective = flow(flow={"timestep_sampling": "uniform"})  # shift: null = the model's own (dynamic for dev)
    unshifted = flow(flow={"timestep_sampling": "uniform", "shift": 1.0})
    for latent_side, tokens in ((32, 256), (128, 4096), (64, 1024)):
        # BFL's get_lin_function: mu linear in the token count, 0.5 at 256 tokens and 1.15 at 4096
        mu = 0.5 + (1.15 - 0.5) * (tokens - 256) / (4096 - 256)
        sigma = draws(unshifted, 7) / 1000
        expected = math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))
        assert draws(objective, 7, (16, latent_side, latent_side)) / 1000 == pytest.approx(expected, rel=1e-5)
    # schnell's scheduler: no dynamic shifting, shift 1
    schnell = flow({"shift": 1.0, "use_dynamic_shifting": False}, flow={"timestep_sampling": "uniform"})
    assert draws(schnell, 7, (16, 128, 128)) == pytest.approx(draws(unshifted, 7))


def test_the_timestep_range_narrows_sigma_after_the_shift():
    wide = flow(flow={"timestep_sampling": "uniform", "shift": 2.0})
    narrow = flow(min_timestep=200, max_timestep=600, flow={"timestep_sampling": "uniform", "shift": 2.0})
    for seed in range(5):
        sigma = draws(wide, seed) / 1000
        assert draws(narrow, seed) / 1000 == pytest.approx(0.2 + 0.4 * sigma, rel=1e-6)


def test_noisy_input_target_and_weights_are_the_rectified_flow_ones():
    objective = flow(flow={"weighting": "cosmap"})
    latents, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    timesteps = torch.tensor([100.0, 500.0, 925.0])
    sigma = (timesteps / 1000).view(-1, 1, 1, 1)
    torch.testing.assert_close(objective.noisy(latents, noise, timesteps), (1 - sigma) * latents + sigma * noise)
    assert torch.equal(objective.target(latents, noise, timesteps), noise - latents)
    s = timesteps / 1000
    torch.testing.assert_close(objective.weights(timesteps), 2 / (math.pi * (1 - 2 * s + 2 * s ** 2)))
    torch.testing.assert_close(flow(flow={"weighting": "sigma_sqrt"}).weights(timesteps), s ** -2.0)
    assert flow().weights(timesteps) is None
    assert objective.unweighted().weights(timesteps) is None and objective.weights(timesteps) is not None


@pytest.mark.parametrize("values, key", [
    ({"min_snr_gamma": 5.0}, "min_snr_gamma"),
    ({"prediction_type": "v_prediction"}, "prediction_type"),
    ({"zero_terminal_snr": True}, "zero_terminal_snr"),
])
def test_ddpm_keys_are_refused_for_a_flow_model(values, key):
    with pytest.raises(UserError, match=f"config key '{key}'"):
        flow(**values)


def test_flow_keys_are_refused_for_a_ddpm_model():
    config = cfg.from_dict({"model": "x", "flow": {"weighting": "cosmap"}})
    with pytest.raises(UserError, match="config key 'flow.weighting'"):
        Diffusion(config, DDPMScheduler())
    assert Diffusion(cfg.from_dict({"model": "x"}), DDPMScheduler()).weights(torch.tensor([5])) is None
