"""Sample images during training with StableDiffusionPipeline and the weights being trained."""
from __future__ import annotations

from pathlib import Path

import torch

from .config import Config


def build_pipeline(components, unet, text_encoder, device):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipeline = StableDiffusionPipeline(
        unet=unet, vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer,
        scheduler=DDIMScheduler.from_config(components.noise_scheduler.config),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)


@torch.no_grad()
def generate_samples(config: Config, pipeline, out_dir: Path, autocast_dtype=None) -> list[str]:
    """Render every sampling concept; files are samples/<step>/<concept>-<index>.png."""
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pipeline.device
    clip_skip = config.clip_stop_at_layer - 1 or None
    paths = []
    was_training = pipeline.unet.training
    pipeline.unet.eval()
    try:
        for concept_index, concept in enumerate(config.sampling.concepts):
            generator = torch.Generator("cpu").manual_seed(concept.seed if concept.seed is not None else concept_index)
            remaining = concept.num_samples
            image_index = 0
            while remaining > 0:
                count = min(remaining, config.sampling.batch_size)
                with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    images = pipeline(
                        [concept.prompt] * count, negative_prompt=[concept.negative_prompt] * count,
                        num_inference_steps=concept.steps, guidance_scale=concept.cfg_scale,
                        width=concept.width or config.data.resolution,
                        height=concept.height or config.data.resolution,
                        generator=generator, clip_skip=clip_skip).images
                for image in images:
                    path = out_dir / f"{concept_index:02d}-{image_index:03d}.png"
                    image.save(path)
                    paths.append(str(path))
                    image_index += 1
                remaining -= count
    finally:
        pipeline.unet.train(was_training)
    return paths
