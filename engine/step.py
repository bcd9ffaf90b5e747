"""One training step: the loss of a micro-batch, its backward pass and the optimizer step.

The trainer runs these on real tensors and the VRAM estimator traces the very same functions on fake
ones, so the two cannot disagree about what a step computes or keeps alive. Nothing here reads a tensor
back to the CPU (no `.item()`): the loop decides where it waits for the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch

from .config import Config
from .losses import dreambooth_loss, mask_weights
from .objectives import Objective
from .optim import PerParameterOptimizer


class RowNoise:
    """The random draws of one batch, made per row from that sample's own key.

    A sample's latent noise, diffusion noise and timestep depend only on (seed, epoch, image), not on
    the batch it landed in, the process that drew it or what ran before: resumed runs and multi-GPU runs
    see exactly the draws of an uninterrupted single-process run.
    """

    def __init__(self, keys, objective: Objective):
        self.generators = [torch.Generator().manual_seed(int(k)) for k in keys]
        self.objective = objective  # draws each row's timestep

    def _per_row(self, shape, draw) -> torch.Tensor:
        return torch.stack([draw(shape, g) for g in self.generators])

    def sample_latents(self, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
        eps = self._per_row(mean.shape[1:], lambda shape, g: torch.randn(shape, generator=g))
        return mean + std * eps.to(mean.device, mean.dtype)

    def noise_and_timesteps(self, shape, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
        noise = self._per_row(shape[1:], lambda s, g: torch.randn(s, generator=g))
        timesteps = self._per_row(shape[1:], lambda s, g: self.objective.draw_timestep(g, s))
        if offset > 0:
            # a per-channel constant teaches the model to shift overall brightness
            shift = self._per_row((shape[1], 1, 1), lambda s, g: torch.randn(s, generator=g))
            noise = noise + offset * shift
        return noise, timesteps


@dataclass
class StepModels:
    """What a step runs. unet (the denoising model: a UNet or a transformer) and text_encoder are the DDP
    wrappers when several processes train."""
    family: Any  # models.family.ModelFamily
    unet: Any
    text_encoder: Any
    vae: Any
    objective: Objective


@dataclass
class LossParts:
    instance_loss: torch.Tensor
    prior_loss: Optional[torch.Tensor]
    width: int
    height: int


def control_latents(vae, batch: dict, device: torch.device, to_model_space) -> torch.Tensor:
    """A batch's control images [B, n, 3, H, W] as latents [B, n, C, h, w] in the denoiser's range (as
    `to_model_space` puts the target's): the mean of their distribution (cached, or encoded here), as an edit
    pipeline encodes its input images."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    if "control_latent_params" in batch:
        params = batch["control_latent_params"].flatten(0, 1).to(device, non_blocking=True)
        mean = DiagonalGaussianDistribution(params).mean
    else:
        pixels = batch["control_pixel_values"].flatten(0, 1).to(device, non_blocking=True)
        mean = vae.encode(pixels).latent_dist.mean
    return to_model_space(vae, mean).unflatten(0, batch["control_pixel_values"].shape[:2])


def compute_loss(config: Config, models: StepModels, batch: dict, device: torch.device,
                 autocast_dtype: Optional[torch.dtype], text_cache=None,
                 timesteps: Optional[torch.Tensor] = None, fill=None) -> tuple[torch.Tensor, LossParts]:
    """The loss of one micro-batch; latents and embeddings come from the caches when the batch or
    text_cache (a cache.TextEmbeddingCache) provide them. `timesteps` (one per row) replace the drawn ones.
    `fill` (a cache_fill.FirstEpochFill) records what the VAE and text encoder compute."""
    vae, objective = models.vae, models.objective
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    draws = RowNoise(batch["sample_keys"], objective)
    with torch.no_grad():
        if "latent_params" in batch:
            from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

            distribution = DiagonalGaussianDistribution(batch["latent_params"].to(device, non_blocking=True))
        else:
            distribution = vae.encode(batch["pixel_values"].to(device, non_blocking=True)).latent_dist
            if fill is not None:
                fill.add_latents(batch, distribution.parameters)
        latents = draws.sample_latents(distribution.mean, distribution.std)
        to_model_space = models.family.normalized_latents
        latents = to_model_space(vae, latents)
        # control images (data.controls), the pictures an edit model is asked to change: read with the caption
        # and denoised beside the target as latents
        controls = (control_latents(vae, batch, device, to_model_space) if "control_pixel_values" in batch
                    else None)
    read_with_text = {} if controls is None else {"controls": batch["control_pixel_values"]}
    noise, drawn = draws.noise_and_timesteps(latents.shape, config.noise_offset)
    noise, timesteps = noise.to(device), (drawn if timesteps is None else timesteps).to(device)
    noisy_latents = objective.noisy(latents, noise, timesteps)
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        if text_cache is not None:
            # looked up by the batch's ids still on the CPU, so that reading them waits for no device
            conditioning = {name: value.to(device) for name, value in text_cache.lookup(batch["input_ids"]).items()}
        elif fill is not None and fill.records_text:
            full = fill.full_padding(input_ids)
            with torch.no_grad():  # text is cached only while the encoder is frozen
                encoded = models.family.encode_text(models.text_encoder, full, config.clip_stop_at_layer)
            conditioning = fill.add_text(full, encoded, input_ids.shape[1])
        else:
            with torch.set_grad_enabled(config.trains_text_encoder):
                conditioning = models.family.encode_text(models.text_encoder, input_ids, config.clip_stop_at_layer,
                                                         **read_with_text)
        if config.uncond.enabled and config.uncond.cond == "zeros":
            kept = torch.tensor([c != "" for c in batch["captions"]], device=device)
            conditioning = {name: value * kept.view(-1, *[1] * (value.dim() - 1)).to(value.dtype)
                            for name, value in conditioning.items()}
        if controls is not None:  # the pictures to edit stay, whatever the caption
            conditioning["control_latents"] = controls
        prediction = models.family.predict(models.unet, noisy_latents, timesteps, conditioning,
                                           batch.get("time_ids"))
    target = objective.target(latents, noise, timesteps)
    weights = objective.weights(timesteps)
    # With masked_loss on every row has a mask: all white for images without one and for class images.
    pixel_weights = (mask_weights(batch["masks"].to(device, non_blocking=True), latents.shape[-2:],
                                  config.masked_loss.unmasked_weight) if "masks" in batch else None)
    loss, instance_loss, prior_loss = dreambooth_loss(prediction, target, batch["num_instance"],
                                                      config.prior_preservation.prior_loss_weight, weights,
                                                      pixel_weights)
    pixels_per_latent = 2 ** (len(vae.config.block_out_channels) - 1)
    return loss, LossParts(instance_loss, prior_loss, latents.shape[-1] * pixels_per_latent,
                           latents.shape[-2] * pixels_per_latent)


def backward(loss: torch.Tensor, scaler, optimizer, group_size: int, last_of_group: bool) -> None:
    """Backpropagate one micro-batch's share of its accumulation group's loss.

    An optimizer fused into backward steps only on the micro-batch that completes the group. Under DDP the
    caller runs the forward and backward passes of the group's other micro-batches in the wrappers' no_sync,
    so that ranks exchange gradients once per group."""
    if isinstance(optimizer, PerParameterOptimizer):
        optimizer.armed = last_of_group
    scaler.scale(loss / group_size).backward()


def optimizer_step(optimizer, scaler, params, clip_norm: Optional[float]) -> bool:
    """Clip and step through the grad scaler. False when fp16 gradients overflowed and the step was skipped.

    A per-parameter optimizer clips itself (and, fused into backward, has already stepped)."""
    if clip_norm and not isinstance(optimizer, PerParameterOptimizer):
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    scale_before = scaler.get_scale()
    scaler.step(optimizer)
    scaler.update()
    # The scaler lowers its scale exactly when it found inf/NaN gradients and skipped the step.
    return not (scaler.is_enabled() and scaler.get_scale() < scale_before)
