"""What a model is trained to do with a noised latent: the objective a model family returns.

An objective draws a row's timestep from that row's own generator, makes the noisy input and the target
from the latents and the noise, and weights each row's loss. The step (`step.compute_loss`) calls these
and nothing else, so it never knows which objective runs.

- `Diffusion`: DDPM models (SD1.x, SD2.x, SDXL). Integer timesteps of the model's noise schedule, noise
  added by that schedule, target ε or v, min-SNR-γ weights.
- `RectifiedFlow`: the flow-matching transformers (every family but SD1.x, SD2.x and SDXL). The input is
  (1 − σ)·x₀ + σ·ε and the target ε − x₀; σ is drawn uniformly, logit-normally or through a sigmoid, then
  shifted (a fixed shift, or one that grows with the image's token count as BFL's schedule computes it).
  Timesteps are σ × 1000, the scale the transformers and diffusers' flow-matching scheduler use.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import Optional, Protocol

import torch

from .config import Config, Flow
from .errors import UserError
from .losses import min_snr_weights, training_target


class Objective(Protocol):
    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor: ...

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor: ...

    def weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]: ...

    def unweighted(self) -> "Objective": ...


def _unweighted(objective, **off):
    plain = copy.copy(objective)
    vars(plain).update(off)
    return plain


def timestep_range(config: Config, scheduler) -> tuple[int, int]:
    """[min_timestep, max_timestep) of the noise schedule, the part of it that trains."""
    steps = scheduler.config.num_train_timesteps
    end = steps if config.max_timestep is None else config.max_timestep
    if end > steps:
        raise UserError(f"config key 'max_timestep': the model's noise schedule has {steps} timesteps, got {end}")
    return config.min_timestep, end


def _changed(section, default, prefix: str) -> list[str]:
    return [f"{prefix}.{f.name}" for f in dataclasses.fields(section)
            if getattr(section, f.name) != getattr(default, f.name)]


class Diffusion:
    """DDPM training through the model's own noise schedule (prediction type and zero terminal SNR applied)."""

    def __init__(self, config: Config, scheduler):
        changed = _changed(config.flow, Flow(), "flow")
        if changed:
            raise UserError(f"config key '{changed[0]}': applies to the flow-matching transformers (Flux.1 and the "
                            "families after it); this model is trained by DDPM noise schedule, so leave the flow "
                            "section at its defaults")
        self.scheduler = scheduler
        self.first, self.end = timestep_range(config, scheduler)
        self.prediction_type = scheduler.config.prediction_type
        self.min_snr_gamma = config.min_snr_gamma

    def unweighted(self) -> "Diffusion":
        return _unweighted(self, min_snr_gamma=None)

    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.randint(self.first, self.end, (), generator=generator)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(latents, noise, timesteps)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return training_target(self.scheduler, latents, noise, timesteps, self.prediction_type)

    def weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        if not self.min_snr_gamma:
            return None
        return min_snr_weights(self.scheduler, timesteps, self.min_snr_gamma, self.prediction_type)


def shifted(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ moved toward the noisy end: shift·σ / (1 + (shift − 1)·σ); a shift of 1 leaves it."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def resolution_shift(tokens: int, scheduler_config) -> float:
    """The shift of BFL's schedule for an image of `tokens` patches: exp(μ), μ linear in the token count
    from base_shift at base_image_seq_len to max_shift at max_image_seq_len (the model's scheduler config)."""
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    c = scheduler_config
    return math.exp(calculate_shift(tokens, c.base_image_seq_len, c.max_image_seq_len, c.base_shift, c.max_shift))


class RectifiedFlow:
    """Rectified-flow training. `patch` is the side of the latent patch the transformer makes one token of
    (2 for the transformers that pack 2x2 latent patches): the resolution-dependent shift counts tokens."""

    def __init__(self, config: Config, scheduler, patch: int):
        for key, value in (("min_snr_gamma", config.min_snr_gamma), ("prediction_type", config.prediction_type),
                           ("zero_terminal_snr", config.zero_terminal_snr)):
            if value:
                raise UserError(f"config key '{key}': applies to DDPM models (SD1.x, SD2.x, SDXL); this model is "
                                "trained by rectified flow (see the flow section), so leave it unset")
        self.settings = config.flow
        self.scale = scheduler.config.num_train_timesteps
        first, end = timestep_range(config, scheduler)
        self.low, self.high = first / self.scale, end / self.scale
        self.scheduler_config = scheduler.config
        self.patch = patch
        self.weighting = config.flow.weighting

    def unweighted(self) -> "RectifiedFlow":
        return _unweighted(self, weighting="none")

    def shift_for(self, latent_shape: tuple[int, ...]) -> float:
        """The shift applied to a σ drawn for latents of this shape ([channels, height, width])."""
        if self.settings.shift is not None:
            return self.settings.shift
        if self.scheduler_config.get("use_dynamic_shifting"):
            tokens = (latent_shape[-2] // self.patch) * (latent_shape[-1] // self.patch)
            return resolution_shift(tokens, self.scheduler_config)
        return float(self.scheduler_config.get("shift", 1.0))

    def draw_sigma(self, generator: torch.Generator) -> torch.Tensor:
        """σ in [0, 1] before the shift and the timestep range."""
        settings = self.settings
        if settings.timestep_sampling == "uniform":
            return torch.rand((), generator=generator)
        mean, std = ((settings.logit_mean, settings.logit_std) if settings.timestep_sampling == "logit_normal"
                     else (0.0, settings.sigmoid_scale))
        return torch.sigmoid(mean + std * torch.randn((), generator=generator))

    def draw_timestep(self, generator: torch.Generator, latent_shape: tuple[int, ...]) -> torch.Tensor:
        sigma = shifted(self.draw_sigma(generator), self.shift_for(latent_shape))
        # min_timestep and max_timestep narrow σ's range as kohya's trainers do: after sampling and shift
        return (self.low + (self.high - self.low) * sigma) * self.scale

    def _sigmas(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        sigma = timesteps.to(torch.float32) / self.scale
        return sigma.view(-1, *[1] * (like.dim() - 1)).to(like.device)

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        sigma = self._sigmas(timesteps, latents)
        return ((1 - sigma) * latents + sigma * noise).to(latents.dtype)

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return noise - latents

    def weights(self, timesteps: torch.Tensor) -> Optional[torch.Tensor]:
        if self.weighting == "none":
            return None
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(self.weighting, timesteps.to(torch.float32) / self.scale)
