"""The model-family interface: what the trainer, the sampler, the caches and the VRAM estimator ask of a
kind of model, so that none of them knows which one it trains.

A family loads its components (and builds them on fake tensors for the estimator), puts the autoencoder's
latents in its denoiser's range (`base_family.Family` shifts and scales them; FLUX.2 [klein] normalises each
channel by its statistics), returns the objective it trains with (`objectives`: how inputs, targets, timesteps
and loss weights are made), turns token ids into the denoising model's conditioning (CLIP skip applied), runs
the model's prediction and builds the pipeline that renders samples and class images. For the DDPM families the
noise schedule's prediction target is set here from the config.

The conditioning is a dict of tensors with one row per sample: `encoder_hidden_states` for every family,
plus what a family adds (SDXL: the pooled `text_embeds`; Flux.1: CLIP's pooled `pooled_projections`; Chroma:
the transformer's `attention_mask` over T5's tokens; Qwen-Image: the mask of its prompt's tokens,
`encoder_hidden_states_mask`; Qwen-Image-Edit: its control images' `control_latents`, which the step adds). A
family whose tokenizer says `reads_controls` trains on control images (data.controls): its encode_text takes them
as `controls`. The caches store it and classifier-free dropout zeroes it without knowing its
parts. A batch's `time_ids` (each
sample's original size, crop top-left and target size) go to the families that condition on them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from ..config import Config
from ..errors import UserError
from ..objectives import Objective
from .sd import Components


class ModelFamily(Protocol):
    name: str
    conditioning_parts: tuple[str, ...]

    supports_custom_embeddings: bool

    def load(self, config: Config) -> Components: ...

    def objective(self, config: Config, scheduler) -> Objective: ...

    def fake_components(self, config: Config, architecture: Any) -> Components: ...

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict: ...

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]: ...

    def normalized_latents(self, vae, latents: torch.Tensor) -> torch.Tensor: ...

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor: ...

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device): ...

    def render(self, pipeline, positive: dict, negative: dict, **options) -> list: ...


def family_for(config: Config) -> ModelFamily:
    """The family of the config's model, recognised from its files. SD1.x and SD2.x share one; their
    difference (text encoder and prediction type) is in the model's own configs."""
    from .chroma import Chroma, is_chroma
    from .flux import Flux1, is_flux
    from .qwen_image import QwenImage, is_qwen_image
    from .qwen_image_edit import QwenImageEdit, trains_as_edit
    from .flux2_klein import Flux2Klein, is_flux2_klein
    from .sd import StableDiffusion
    from .sdxl import StableDiffusionXL
    from .zimage import ZImage, is_zimage

    if trains_as_edit(config):
        return QwenImageEdit()
    refuse_controls(config)
    if is_flux(config.model):
        return Flux1()
    if is_chroma(config.model):
        return Chroma()
    if is_zimage(config.model):
        return ZImage()
    if is_qwen_image(config.model):
        return QwenImage()
    if is_flux2_klein(config.model):
        return Flux2Klein()
    return StableDiffusionXL() if is_sdxl(config.model) else StableDiffusion()


def family_named(name: str) -> ModelFamily:
    """The family an architecture name ('sd15', 'sd21', 'sdxl', 'flux1-dev', 'flux1-schnell', 'chroma',
    'z-image', 'qwen-image', 'qwen-image-edit', 'flux2-klein-4b', 'flux2-klein-9b') or a family's own name belongs
    to."""
    from .chroma import Chroma
    from .flux import Flux1
    from .flux2_klein import Flux2Klein
    from .qwen_image import ARCH, QwenImage
    from .qwen_image_edit import QwenImageEdit
    from .sd import StableDiffusion
    from .sdxl import StableDiffusionXL
    from .zimage import ZImage

    if name.startswith("flux1"):
        return Flux1()
    if name == "chroma":
        return Chroma()
    if name == ZImage.name:
        return ZImage()
    if name == ARCH:
        return QwenImage()
    if name == QwenImageEdit.name:
        return QwenImageEdit()
    if name.startswith(Flux2Klein.name):
        return Flux2Klein()
    return StableDiffusionXL() if name == "sdxl" else StableDiffusion()


def refuse_controls(config: Config) -> None:
    """Refuse control images, which only an edit model reads, naming the key."""
    for index, concept in enumerate(config.data.concepts):
        if concept.instance_set.control_path:
            raise UserError(f"config key 'data.concepts[{index}].instance_set.control_path': only an edit model "
                            f"(Qwen-Image-Edit) trains on control images; {config.model} is not one")
    for index, concept in enumerate(config.sampling.concepts):
        if concept.control_image:
            raise UserError(f"config key 'sampling.concepts[{index}].control_image': only an edit model "
                            f"(Qwen-Image-Edit) renders from control images; {config.model} is not one")


def is_sdxl(model: str) -> bool:
    from .sd import resolve_model_path
    from .sdxl import is_sdxl_folder

    path = Path(resolve_model_path(model))
    if path.is_dir():
        return is_sdxl_folder(path)
    from .single_file import detect_family, read_shapes

    return detect_family(read_shapes(path)) == "sdxl"


def text_encoder_parts(text_encoder) -> dict[str, torch.nn.Module]:
    """The text encoders by their diffusers names: SDXL's or Flux.1's pair, or the one of SD1.x/SD2.x."""
    module = getattr(text_encoder, "module", text_encoder)
    return module.parts() if hasattr(module, "parts") else {"text_encoder": text_encoder}


def never_trained_parts(text_encoder) -> tuple[str, ...]:
    """The text encoders a family never trains whatever the config says (Flux.1's T5-XXL)."""
    return getattr(getattr(text_encoder, "module", text_encoder), "never_trained", ())


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
