"""Exponential moving average of the denoising model's weights (a UNet or Flux.1's transformer, still named
`unet` as the trainer's components name it), kept with diffusers' EMAModel."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Ema

EMA_FOLDER = "ema_unet"


ADAPTER_EMA_FILE = "adapter_ema.pt"


def averaged_parameters(unet) -> list:
    """The UNet weights the average follows: all of them, or only an adapter's."""
    from .models.adapters import has_adapter

    return [p for p in unet.parameters() if p.requires_grad] if has_adapter(unet) else list(unet.parameters())


def _adapter_ema_class():
    from diffusers.training_utils import EMAModel

    class AdapterEma(EMAModel):
        """The average of an adapter's weights; a checkpoint keeps its whole state (weights and step count)."""

        def save_pretrained(self, folder) -> None:
            Path(folder).mkdir(parents=True, exist_ok=True)
            torch.save(self.state_dict(), Path(folder) / ADAPTER_EMA_FILE)

    return AdapterEma


def create_ema(unet, options: Ema):
    from diffusers.training_utils import EMAModel

    from .models.adapters import has_adapter

    if has_adapter(unet):
        ema = _adapter_ema_class()(averaged_parameters(unet), decay=options.decay)
    else:
        ema = EMAModel(unet.parameters(), decay=options.decay, model_cls=type(unet), model_config=unet.config)
    # The average moves by (1 - decay) of each update: far below bf16's resolution with bf16 weights.
    ema.to("cpu" if options.on_cpu else None, dtype=torch.float32)
    return ema


def load_ema(checkpoint: Path, options: Ema, device, unet):
    """The average saved in a checkpoint, for the model `unet` it follows."""
    from diffusers.training_utils import EMAModel

    folder = Path(checkpoint) / EMA_FOLDER
    if (folder / ADAPTER_EMA_FILE).is_file():
        ema = _adapter_ema_class()(averaged_parameters(unet), decay=options.decay)
        ema.load_state_dict(torch.load(folder / ADAPTER_EMA_FILE, map_location="cpu", weights_only=False))
    else:
        ema = EMAModel.from_pretrained(str(folder), type(unet))
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
