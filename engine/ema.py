"""Exponential moving average of the UNet weights, kept with diffusers' EMAModel."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Ema

EMA_FOLDER = "ema_unet"


def create_ema(unet, options: Ema):
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    ema = EMAModel(unet.parameters(), decay=options.decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    # The average moves by (1 - decay) of each update: far below bf16's resolution with bf16 weights.
    ema.to("cpu" if options.on_cpu else None, dtype=torch.float32)
    return ema


def load_ema(checkpoint: Path, options: Ema, device):
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    ema = EMAModel.from_pretrained(str(Path(checkpoint) / EMA_FOLDER), UNet2DConditionModel)
    ema.decay = options.decay
    ema.to("cpu" if options.on_cpu else device, dtype=torch.float32)
    return ema


def ema_step(ema, parameters, on_cpu: bool) -> None:
    """One update per optimizer step. With on_cpu the weights are copied over first; the copies keep
    requires_grad because EMAModel only averages parameters that are being trained."""
    parameters = list(parameters)
    if on_cpu:
        parameters = [p.detach().to("cpu").requires_grad_(p.requires_grad) for p in parameters]
    ema.step(parameters)


class SwapInEma:
    """Temporarily put the EMA weights into the model (for samples), restoring the trained ones after."""

    def __init__(self, ema, parameters):
        self.ema = ema
        self.parameters = list(parameters)

    def __enter__(self):
        if self.ema is not None:
            self.ema.store(self.parameters)
            self.ema.copy_to(self.parameters)

    def __exit__(self, *exc):
        if self.ema is not None:
            self.ema.restore(self.parameters)
