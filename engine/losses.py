"""What the UNet is trained to predict, and how each sample's error is weighted."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float,
                    weights: Optional[torch.Tensor] = None, pixel_weights: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """MSE on the instance rows plus prior_loss_weight x MSE on the class rows that follow them.

    `weights` (one per row, e.g. min-SNR) scale each row's mean squared error. `pixel_weights` ([rows, 1,
    height, width] at the latent size: a loss mask, see mask_weights) scale each latent pixel's squared
    error; the mean still divides by every element, so weights of one give the plain MSE exactly and a
    half mask gives half of it.
    """
    def part(rows: slice) -> torch.Tensor:
        if weights is None and pixel_weights is None:
            return F.mse_loss(pred[rows].float(), target[rows].float())
        error = F.mse_loss(pred[rows].float(), target[rows].float(), reduction="none")
        if pixel_weights is not None:
            error = error * pixel_weights[rows]
        if weights is None:
            return error.mean()
        return (error.mean(dim=(1, 2, 3)) * weights[rows]).mean()

    instance_loss = part(slice(0, num_instance))
    if pred.shape[0] == num_instance:
        return instance_loss, instance_loss, None
    prior_loss = part(slice(num_instance, None))
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


def mask_weights(masks: torch.Tensor, latent_size: tuple[int, int], unmasked_weight: float) -> torch.Tensor:
    """Per latent pixel loss weights [rows, 1, height, width] from 8-bit masks [rows, 1, H, W] at the pixel size.

    Each latent pixel takes the mean of the mask over the pixels it encodes (an area average, so a mask
    that covers half the pixels covers exactly half the latent), then mask + unmasked_weight x (1 - mask).
    """
    coverage = F.adaptive_avg_pool2d(masks.float() / 255.0, tuple(latent_size))
    return coverage + unmasked_weight * (1.0 - coverage)


def training_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    return noise


def min_snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ weighting: min(SNR, γ)/SNR for ε-prediction, min(SNR, γ)/(SNR + 1) for v-prediction."""
    from diffusers.training_utils import compute_snr

    snr = compute_snr(scheduler, timesteps)
    clipped = torch.minimum(snr, torch.full_like(snr, gamma))
    if prediction_type == "v_prediction":
        return clipped / (snr + 1)
    # min(SNR, γ)/SNR tends to 1 as SNR → 0; zero terminal SNR reaches SNR = 0 exactly.
    return torch.where(snr > 0, clipped / snr.clamp(min=torch.finfo(snr.dtype).tiny), torch.ones_like(snr))
