"""What a model family does unless it says otherwise (see family.ModelFamily)."""
from __future__ import annotations

import torch


class Family:
    def normalized_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """The autoencoder's latents in the range the denoising model works in: shifted (where the autoencoder
        has a shift factor, as Flux.1's has) and scaled."""
        shift = vae.config.get("shift_factor")
        return (latents - shift if shift else latents) * vae.config.scaling_factor
