"""What the UNet is trained to predict, and how each sample's error is weighted."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def dreambooth_loss(pred: torch.Tensor, target: torch.Tensor, num_instance: int, prior_loss_weight: float,
                    weights: Optional[torch.Tensor] = None
                    ) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """MSE on the instance rows plus prior_loss_weight x MSE on the class rows that follow them.

    `weights` (one per row, e.g. min-SNR) scale each row's mean squared error.
    """
    def part(rows: slice) -> torch.Tensor:
        if weights is None:
            return F.mse_loss(pred[rows].float(), target[rows].float())
        per_row = F.mse_loss(pred[rows].float(), target[rows].float(), reduction="none").mean(dim=(1, 2, 3))
        return (per_row * weights[rows]).mean()

    instance_loss = part(slice(0, num_instance))
    if pred.shape[0] == num_instance:
        return instance_loss, instance_loss, None
    prior_loss = part(slice(num_instance, None))
    return instance_loss + prior_loss_weight * prior_loss, instance_loss, prior_loss


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
