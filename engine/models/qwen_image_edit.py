"""The Qwen-Image-Edit family (the multi-image "Plus" releases, 2509 and 2511): Qwen-Image's transformer taught to
edit a control image as a caption instructs. A diffusers folder is recognised by its pipeline class,
model_index.json's `_class_name` QwenImageEditPlusPipeline; the transformer's own config cannot tell it from
Qwen-Image (2511's `zero_cond_t` is read by the transformer itself).

It trains on (controls, target, instruction) triples (data.controls gives each training image its control images,
cropped to its bucket). As QwenImageEditPlusPipeline builds them:
- the caption is read by Qwen2.5-VL with the controls: `PROMPT_TEMPLATE` around one "Picture k: <|vision_start|>
  <|image_pad|><|vision_end|>" per control and the caption, each control resized to about
  `CONDITION_IMAGE_SIZE` pixels for the vision tower, whose tokens replace its image-pad token; the hidden
  states after the first `DROPPED_TOKENS` are the conditioning, with a mask of the real ones (the images'
  tokens among them);
- the controls' latents (the autoencoder's mean, normalised as the target's) are packed as the target's and
  follow them in the transformer's token sequence, one more entry of `img_shapes` each; the prediction is the
  target's tokens only, and the loss is Qwen-Image's flow matching on the target's latents.

The tokenizer gives the template's ids with the first picture's prompt, and the text encoder puts the controls'
in its place, since their count and their image tokens' depend on the controls. The conditioning depends on the
controls, so the text embeddings are never cached (check_config refuses cache.text_embeddings). Samples render
from the control image each sampling prompt names (sampling.concepts[].control_image).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import block_swap, paths
from ..errors import UserError
from .flux import PATCH, pack, unpack
from .qwen_image import (PIPELINE_INDEX, PROMPT_TOKENS, TIMESTEP_ZERO_MARK, QwenImage, QwenImageTokenizer,
                         QwenImageVAE, file_prefix, is_qwen_image, load_models, recorded_files)
from .qwen_image import check_config as check_qwen_image
from .sd import Components, resolve_model_path
from .single_file import BUILTIN_CONFIGS, read_shapes

ARCH = "qwen-image-edit"
PIPELINE_CLASS = "QwenImageEditPlusPipeline"
# QwenImageEditPlusPipeline's prompt_template_encode, prompt_template_encode_start_idx and its template of one
# input image
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, "
                   "objects, background), then explain how the user's text instruction should alter or modify the "
                   "image. Generate a new image that meets the user's requirements while maintaining consistency "
                   "with the original input where appropriate.<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
                   "<|im_start|>assistant\n")
DROPPED_TOKENS = 64
IMAGE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"


def is_qwen_image_edit(model: str) -> bool:
    """Whether model is a diffusers folder of QwenImageEditPlusPipeline (model_index.json's `_class_name`), or a
    Qwen-Image transformer's single file that is an edit model's: its metadata records that pipeline (`convert`'s
    files) or it bears ComfyUI's mark of 2511 (TIMESTEP_ZERO_MARK)."""
    path = Path(resolve_model_path(model))
    if path.is_dir():
        index = path / PIPELINE_INDEX
        return index.is_file() and json.loads(index.read_text(encoding="utf-8")).get("_class_name") == PIPELINE_CLASS
    if not is_qwen_image(model):
        return False
    shapes = read_shapes(path)
    recorded = recorded_files(path).get(PIPELINE_INDEX, {}).get("_class_name")
    return recorded == PIPELINE_CLASS or file_prefix(shapes) + TIMESTEP_ZERO_MARK in shapes


def trains_as_edit(config) -> bool:
    """Whether the config's model is an edit model (is_qwen_image_edit), or a Qwen-Image transformer's single file,
    whose layout is the edit model's too, with control images given (instance_set.control_path,
    sampling.concepts[].control_image)."""
    if is_qwen_image_edit(config.model):
        return True
    controls = (any(concept.instance_set.control_path for concept in config.data.concepts)
                or any(concept.control_image for concept in config.sampling.concepts))
    return controls and Path(resolve_model_path(config.model)).is_file() and is_qwen_image(config.model)


def condition_images(controls: torch.Tensor) -> list:
    """The control images [B, 3, H, W] in [-1, 1] (on the CPU) as PIL images resized as
    QwenImageEditPlusPipeline resizes them for the vision tower."""
    from diffusers.image_processor import VaeImageProcessor
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import CONDITION_IMAGE_SIZE, calculate_dimensions
    from PIL import Image

    resizer = VaeImageProcessor(vae_scale_factor=2 * PATCH * 8)
    pixels = ((controls.float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    images = []
    for array in pixels:
        image = Image.fromarray(np.ascontiguousarray(array))
        width, height = calculate_dimensions(CONDITION_IMAGE_SIZE, image.width / image.height)
        images.append(resizer.resize(image, height, width))
    return images


class QwenImageEditTokenizer(QwenImageTokenizer):
    """The ids of PROMPT_TEMPLATE around one IMAGE_PROMPT and each caption; the text encoder puts each control's
    own picture prompt in its place. Called as QwenImageTokenizer is."""
    reads_controls = True  # data.prepare gives every training image its control

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pad_token_id = tokenizer.pad_token_id
        self.model_max_length = PROMPT_TOKENS + len(self._ids(""))

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(PROMPT_TEMPLATE.format(IMAGE_PROMPT.format(1) + text)).input_ids


class QwenImageEditTextEncoder(torch.nn.Module):
    """Qwen2.5-VL (`text_encoder`) reading QwenImageEditTokenizer's ids with each row's control images."""
    never_trained = ("text_encoder",)

    def __init__(self, text_encoder, image_processor, tokenizer):
        super().__init__()
        self.text_encoder = text_encoder
        self.image_processor = image_processor
        self.tokenizer = tokenizer  # QwenImageEditTokenizer's Qwen2Tokenizer
        # Where the tokenizer's one picture prompt is, the same for every caption: it ends with a special token,
        # which no caption's first word merges with.
        self.picture_length = len(tokenizer(IMAGE_PROMPT.format(1)).input_ids)
        self.picture_end = len(tokenizer(PROMPT_TEMPLATE.partition("{}")[0] + IMAGE_PROMPT.format(1)).input_ids)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder}

    def _pictures(self, tokens: list[int]) -> list[int]:
        """The ids of one "Picture k: <|vision_start|>…<|vision_end|>" for each control, its image-pad token
        repeated tokens[k] times (the vision tower's merged patches), as the processor expands it."""
        ids = []
        for index, count in enumerate(tokens):
            picture = self.tokenizer(IMAGE_PROMPT.format(index + 1)).input_ids  # ends with image-pad, vision-end
            ids += picture[:-2] + picture[-2:-1] * count + picture[-1:]
        return ids

    def forward(self, input_ids: torch.Tensor, controls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, L, D], mask [B, L, 1]) for ids [B, T] and each row's control images [B, n, 3, H, W]
        of one size (on the CPU): QwenImageEditPlusPipeline's prompt embeddings, each row padded with zeros to L."""
        if controls is None:
            raise UserError("Qwen-Image-Edit reads every caption with its control images; none were given")
        batch, count = controls.shape[:2]
        vision = self.image_processor(images=condition_images(controls.flatten(0, 1)), return_tensors="pt")
        grid = vision["image_grid_thw"]
        pictures = self._pictures([int(grid[k].prod()) // self.image_processor.merge_size ** 2 for k in range(count)])
        device = input_ids.device
        length = input_ids.shape[1]
        position = torch.arange(length, device=device)
        real = torch.where(input_ids != self.tokenizer.pad_token_id, position + 1, 0).amax(dim=1, keepdim=True)
        # the controls' own pictures take the place of the tokenizer's one
        end = self.picture_end
        ids = torch.cat([input_ids[:, :end - self.picture_length],
                         torch.tensor(pictures, device=device).expand(batch, -1), input_ids[:, end:]], dim=1)
        real = real + len(pictures) - self.picture_length
        expanded = torch.arange(ids.shape[1], device=device)
        hidden = self.text_encoder.model(
            input_ids=ids, attention_mask=(expanded < real).long(), pixel_values=vision["pixel_values"].to(device),
            image_grid_thw=grid.to(device)).last_hidden_state[:, DROPPED_TOKENS:]
        kept = (expanded[DROPPED_TOKENS:] < real).unsqueeze(-1).to(hidden.dtype)
        return hidden * kept, kept


class ShapedTextEncoder(QwenImageEditTextEncoder):
    """The memory estimate's text encoder (fake weights). The vision tower's grid and the places of its image
    tokens come from values, which fake ids and controls do not have: they are read only for their shapes, as a
    caption filling every position (the longest, as the estimate takes every prompt) and grey controls, and what
    depends on those values alone runs on real tensors (vram.real_bookkeeping), the models on fake ones."""

    def forward(self, input_ids: torch.Tensor, controls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        from ..vram import real_bookkeeping

        with unset_fake_temporarily():
            ids = torch.zeros(input_ids.shape, dtype=torch.long)  # (id 0 is a word, "!", never padding)
            grey = torch.zeros(controls.shape)
        with real_bookkeeping():
            return super().forward(ids.to(input_ids.device), grey)


def check_config(config) -> None:
    """Qwen-Image's refusals, and what an edit model cannot train with, naming the key."""
    check_qwen_image(config)
    refusals = (
        ("cache.text_embeddings", config.cache.text_embeddings,
         "Qwen-Image-Edit reads each caption with its control image, so its embeddings are not cached; set it "
         "to false"),
        ("augment", bool(config.augment), "control images are not augmented with their targets; remove augment"),
        ("validation.split", config.validation.split > 0 and any(
            concept.instance_set.control_path for concept in config.data.concepts),
         "held-out images take their control images from beside them, not from instance_set.control_path; "
         "name a folder of pairs in validation.path instead"),
    )
    for key, refused, why in refusals:
        if refused:
            raise UserError(f"config key '{key}': {why}")
    for index, concept in enumerate(config.data.concepts):
        if config.prior_preservation.enabled and concept.class_set is not None:
            raise UserError(f"config key 'data.concepts[{index}].class_set': class images have no control images "
                            "to edit; remove class_set or set prior_preservation.enabled: false")
    for index, concept in enumerate(config.sampling.concepts):
        key = f"config key 'sampling.concepts[{index}].control_image'"
        if not concept.control_image:
            raise UserError(f"{key}: Qwen-Image-Edit renders by editing an image; name one")
        if not os.path.isfile(paths.resolve(concept.control_image)):
            raise UserError(f"{key}: file not found: {concept.control_image}")


class QwenImageEdit(QwenImage):
    """Qwen/Qwen-Image-Edit-2509 (and 2511) and models fine-tuned from them, as a diffusers folder or ComfyUI's
    files."""
    name = ARCH

    def load(self, config) -> Components:
        """Tokenizer, text encoder (with the processor's image preprocessing), VAE, transformer and the
        flow-matching schedule on the CPU, each model in the dtype the run reads it in (ram.load_dtype), from a
        diffusers folder or ComfyUI's files (`qwen_image.load_models`); a file's image preprocessing is the shipped
        processor's."""
        from transformers import AutoImageProcessor

        check_config(config)
        models = load_models(config)
        tokenizer = QwenImageEditTokenizer(models.tokenizer)
        processor = (BUILTIN_CONFIGS / ARCH if models.root.is_file() else models.root) / "processor"
        encoder = QwenImageEditTextEncoder(models.text_encoder, AutoImageProcessor.from_pretrained(processor),
                                           tokenizer.tokenizer)
        return Components(tokenizer=tokenizer, text_encoder=encoder, vae=QwenImageVAE(models.vae),
                          unet=models.transformer, noise_scheduler=models.scheduler, model_path=str(models.root))

    def fake_components(self, config, architecture) -> Components:
        """Qwen-Image's models built under the caller's FakeTensorMode, the text encoder a ShapedTextEncoder with
        the architecture's image processor (the folder's processor/, or the shipped one's)."""
        import dataclasses

        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from transformers import AutoImageProcessor

        check_config(config)
        components = super().fake_components(config, architecture)
        shipped = BUILTIN_CONFIGS / architecture.source  # (a model folder's source is its own path)
        folder = shipped if shipped.is_dir() else Path(architecture.source)
        with unset_fake_temporarily():
            tokenizer = QwenImageEditTokenizer(components.tokenizer.tokenizer)
            image_processor = AutoImageProcessor.from_pretrained(folder / "processor")
        encoder = ShapedTextEncoder(components.text_encoder.text_encoder, image_processor, tokenizer.tokenizer)
        return dataclasses.replace(components, tokenizer=tokenizer, text_encoder=encoder)

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int,
                    controls: Optional[torch.Tensor] = None) -> dict:
        hidden, mask = text_encoder(input_ids, controls)
        return {"encoder_hidden_states": hidden, "encoder_hidden_states_mask": mask}

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        """The prediction for the target's tokens, each control's latents following them in the sequence."""
        batch, _, height, width = noisy_latents.shape
        controls = conditioning["control_latents"].to(noisy_latents.dtype).unbind(1)
        target_tokens = (height // PATCH) * (width // PATCH)
        images = (noisy_latents, *controls)
        shapes = [(1, latents.shape[-2] // PATCH, latents.shape[-1] // PATCH) for latents in images]
        output = unet(hidden_states=torch.cat([pack(latents) for latents in images], dim=1),
                      timestep=timesteps.to(noisy_latents.dtype) / 1000,
                      encoder_hidden_states=conditioning["encoder_hidden_states"],
                      encoder_hidden_states_mask=conditioning["encoder_hidden_states_mask"][..., 0] > 0,
                      img_shapes=[shapes] * batch, return_dict=False)[0]
        return unpack(output[:, :target_tokens], height, width)

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """QwenImageEditPlusPipeline over the given (trained) transformer, sampling with the model's flow-matching
        Euler schedule."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImageEditPlusPipeline
        from transformers import Qwen2VLProcessor

        from ..captioning.models import images_only

        processor = images_only(Qwen2VLProcessor)(image_processor=text_encoder.image_processor,
                                                  tokenizer=components.tokenizer.tokenizer)
        pipeline = QwenImageEditPlusPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae.model, text_encoder=text_encoder.text_encoder,
            tokenizer=components.tokenizer.tokenizer, processor=processor, transformer=unet)
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    @torch.no_grad()
    def render(self, pipeline, positive: dict, negative: dict, guidance_scale: float = 4.0, **options) -> list:
        """Images from embeddings, editing `options["image"]` (a PIL image), one prompt at a time as
        QwenImageEditPlusPipeline renders; cfg_scale is its true_cfg_scale, the negative prompt the unconditional
        side."""
        images = []
        for row in range(positive["encoder_hidden_states"].shape[0]):
            parts = []
            for part in (positive, negative):
                mask = part["encoder_hidden_states_mask"][row:row + 1, :, 0]
                length = int(mask.sum())  # the real tokens lead; the padding's rows change nothing
                parts.append((part["encoder_hidden_states"][row:row + 1, :length], mask[:, :length].long()))
            images += pipeline(prompt_embeds=parts[0][0], prompt_embeds_mask=parts[0][1],
                               negative_prompt_embeds=parts[1][0], negative_prompt_embeds_mask=parts[1][1],
                               true_cfg_scale=guidance_scale, **options).images
        return images
