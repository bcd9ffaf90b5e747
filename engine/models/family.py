"""The model-family interface: what the trainer, the sampler, the caches and the VRAM estimator ask of a
kind of model, so that none of them knows which one it trains.

A family loads its components (and builds them on fake tensors for the estimator), turns token ids into
the UNet's conditioning (CLIP skip applied), runs the UNet's prediction and builds the pipeline that
renders samples and class images. The noise schedule's prediction target is set here from the config for
every family. A new family (SDXL, with two text encoders and micro-conditioning) is one more class with
these methods, returned by `family_for`.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch

from ..config import Config
from .sd import Components


class ModelFamily(Protocol):
    name: str

    def load(self, config: Config) -> Components: ...

    def fake_components(self, config: Config, architecture: Any) -> Components: ...

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> torch.Tensor: ...

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                conditioning: torch.Tensor) -> torch.Tensor: ...

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device): ...


def family_for(config: Config) -> ModelFamily:
    """The family of the config's model. SD1.x and SD2.x share one; their difference (text encoder and
    prediction type) is in the model's own configs."""
    from .sd import StableDiffusion

    return StableDiffusion()


def configure_noise_schedule(components: Components, config: Config) -> None:
    """Apply prediction_type and zero_terminal_snr over the model's own scheduler config."""
    overrides = {}
    if config.prediction_type:
        overrides["prediction_type"] = config.prediction_type
    if config.zero_terminal_snr:
        # Zero terminal SNR only works for sampling with trailing timesteps (Lin et al., 2023).
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    if overrides:
        from diffusers import DDPMScheduler

        components.noise_scheduler = DDPMScheduler.from_config(components.noise_scheduler.config, **overrides)
