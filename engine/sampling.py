"""Render images with the model family's pipeline: samples during training and class images.

The pipeline never encodes prompts itself. It is handed `prompt_embeds` from the engine's own encoder,
so CLIP skip and textual-inversion tokens behave exactly as they do in training. (diffusers' own
`clip_skip` reaches into `text_encoder.text_model`, which transformers 5's CLIPTextModel no longer has.)
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import Config
from .data.dataset import load_image, to_tensor
from .models.embeddings import expand_tokens
from .models.family import ModelFamily
from .paths import resolve as resolve_path


@dataclass
class PromptEncoder:
    """Prompts to text embeddings the way training computes them."""
    family: ModelFamily
    tokenizer: Any
    text_encoder: Any
    clip_stop_at_layer: int = 1
    expansions: dict = field(default_factory=dict)  # textual-inversion token -> its multi-vector spelling

    @torch.no_grad()
    def __call__(self, prompts: list[str], **controls) -> dict:
        """`controls`: an edit model's control images, read with the prompts (see models.family)."""
        texts = [expand_tokens(text, self.expansions) for text in prompts]
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids
        device = next(self.text_encoder.parameters()).device
        return self.family.encode_text(self.text_encoder, ids.to(device), self.clip_stop_at_layer, **controls)


def render(pipeline, encoder: PromptEncoder, prompts: list[str], negative_prompts: list[str], **options) -> list:
    """The pipeline's images for prompts, with embeddings from the engine's encoder. An edit model's control
    image (`options["image"]`, a PIL image) is read with the prompts too."""
    image = options.get("image")
    controls = {} if image is None else {"controls": to_tensor(image).expand(len(prompts), 1, -1, -1, -1)}
    return encoder.family.render(pipeline, encoder(prompts, **controls), encoder(negative_prompts, **controls),
                                 **options)


@torch.no_grad()
def generate_samples(config: Config, pipeline, encoder: PromptEncoder, out_dir: Path,
                     autocast_dtype=None) -> list[str]:
    """Render every sampling concept; files are samples/<step>/<concept>-<index>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pipeline.device
    paths = []
    # every submodule's own mode: a model may hold parts that train and parts that do not
    denoiser = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer  # SD's UNet, Flux's transformer
    was_training = {module: module.training for model in (denoiser, encoder.text_encoder)
                    for module in model.modules()}
    for module in was_training:
        module.eval()
    try:
        for concept_index, concept in enumerate(config.sampling.concepts):
            generator = torch.Generator("cpu").manual_seed(concept.seed if concept.seed is not None else concept_index)
            remaining = concept.num_samples
            edited = {"image": load_image(resolve_path(concept.control_image))} if concept.control_image else {}
            image_index = 0
            while remaining > 0:
                count = min(remaining, config.sampling.batch_size)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    images = render(pipeline, encoder, [concept.prompt] * count, [concept.negative_prompt] * count,
                                    num_inference_steps=concept.steps, guidance_scale=concept.cfg_scale,
                                    width=concept.width or config.data.resolution,
                                    height=concept.height or config.data.resolution, generator=generator,
                                    **edited)
                for image in images:
                    path = out_dir / f"{concept_index:02d}-{image_index:03d}.png"
                    image.save(path)
                    paths.append(str(path))
                    image_index += 1
                remaining -= count
    finally:
        for module, training in was_training.items():
            module.training = training
    return paths
