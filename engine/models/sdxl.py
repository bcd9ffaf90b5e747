"""The SDXL model family: two text encoders, a UNet conditioned on their joint hidden states, the second
encoder's pooled embedding and each image's micro-conditioning (original size, crop, target size).

The two encoders travel through the trainer as one module (`TextEncoders`), so that freezing, the device,
DDP and the caches treat them as the single text encoder of SD1.x; checkpoints, adapters and conversions
see its two parts under their diffusers names. Both encoders share one vocabulary, so the dataset
tokenizes once with the first tokenizer; the second encoder gets the same ids padded with its own token.
The special tokens come from the tokenizer: the encoders' configs say `eos_token_id: 2`, which is "#".
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

import torch

from .. import block_swap, notices, paths
from ..errors import UserError
from .base_family import Family
from .sd import Components, load_tokenizer, resolve_model_path

ENCODER_NAMES = ("text_encoder", "text_encoder_2")
# Real SDXL trains at 1024 px; below half of it the model has seen almost nothing.
SMALLEST_USEFUL_FRACTION = 0.5


class TextEncoders(torch.nn.Module):
    """SDXL's CLIP ViT-L (`text_encoder`) and OpenCLIP ViT-bigG with projection (`text_encoder_2`).

    The second tokenizer differs from the first in more than padding: its padding token "!" is a special
    token, so every "!" in a caption becomes a token of its own (id 0) where the first tokenizer merges
    it with its neighbours ("!!" is one token). `ids_for_second` rebuilds the second tokenizer's ids from
    the first's: words are the same except those holding a "!", which it tokenizes again."""

    def __init__(self, text_encoder, text_encoder_2, tokenizer_2: Optional = None):
        """tokenizer_2 is None for encoders built on fake tensors, whose ids have no values to tokenize again:
        the second encoder then gets the first one's ids, of the same shape."""
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        if tokenizer_2 is not None:
            tokens = tokenizer_2.convert_ids_to_tokens(list(range(len(tokenizer_2))))
            # not saved: they follow from the vocabulary, and move with the module to its device
            self.register_buffer("has_bang", torch.tensor(["!" in t for t in tokens]), persistent=False)
            self.word_ends = [t.endswith("</w>") for t in tokens]

    @property
    def pad_token_id_2(self) -> int:
        return self.tokenizer_2.pad_token_id

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def ids_for_second(self, input_ids: torch.Tensor) -> torch.Tensor:
        """The ids the second tokenizer gives the captions the first tokenizer gave input_ids for, as long
        as input_ids: padded with the second one's padding, cut (end token last) where they are longer."""
        if self.tokenizer_2 is None:
            return input_ids
        end = (input_ids == self.tokenizer_2.eos_token_id).int()
        after_end = end.cumsum(dim=1) - end > 0
        ids = input_ids.masked_fill(after_end, self.pad_token_id_2)
        for row in (self.has_bang[input_ids] & ~after_end).any(dim=1).nonzero().flatten().tolist():
            ids[row] = torch.tensor(self._tokenized_again(input_ids[row].tolist(), ids.shape[1]))
        return ids

    def _tokenized_again(self, row: list[int], length: int) -> list[int]:
        bos, eos = self.tokenizer_2.bos_token_id, self.tokenizer_2.eos_token_id
        content = row[1:row.index(eos)] if eos in row else row[1:]
        ids, word = [], []
        for position, token in enumerate(content):
            word.append(token)
            if not (self.word_ends[token] or position == len(content) - 1):
                continue
            if any(self.has_bang[t] for t in word):
                word = self.tokenizer_2(self.tokenizer_2.decode(word), add_special_tokens=False).input_ids
            ids += word
            word = []
        ids = [bos] + ids[:length - 2] + [eos]
        return ids + [self.pad_token_id_2] * (length - len(ids))

    def forward(self, input_ids: torch.Tensor, clip_stop_at_layer: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states of both encoders side by side, pooled projection of the second).

        SDXL conditions on the penultimate layer without the final layer norm; CLIP skip N moves N - 1
        layers further back, as diffusers' `clip_skip` does."""
        index = -(clip_stop_at_layer + 1)
        first = self.text_encoder(input_ids, output_hidden_states=True).hidden_states[index]
        second = self.text_encoder_2(self.ids_for_second(input_ids), output_hidden_states=True)
        return torch.cat([first, second.hidden_states[index]], dim=-1), second.text_embeds


def is_sdxl_folder(root: Path) -> bool:
    return (root / "text_encoder_2").is_dir() or (root / "tokenizer_2").is_dir()


def load_components(config) -> Components:
    """Tokenizer, both text encoders, VAE, UNet and the training noise schedule on the CPU, each model in
    the dtype the run reads it in (ram.load_dtype)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ..ram import load_dtype

    model_path = resolve_model_path(config.model)
    if Path(model_path).is_file():
        from .single_file import load_single_file_components

        return load_single_file_components(model_path, vae=config.vae, tokenizer=config.tokenizer)
    root = Path(model_path)
    tokenizer = load_tokenizer(_tokenizer_folder(config, root), "tokenizer" if config.tokenizer else "model")
    tokenizer_2 = load_tokenizer(root / "tokenizer_2", "model")
    vae_path = paths.resolve(config.vae) if config.vae else str(root / "vae")
    if not Path(vae_path).exists():
        raise UserError(f"config key 'vae': not found: {vae_path}")
    encoders = TextEncoders(
        CLIPTextModel.from_pretrained(root / "text_encoder", dtype=load_dtype(config, "text_encoder")),
        CLIPTextModelWithProjection.from_pretrained(root / "text_encoder_2", dtype=load_dtype(config, "text_encoder_2")),
        tokenizer_2)
    return Components(
        tokenizer=tokenizer, text_encoder=encoders,
        vae=AutoencoderKL.from_pretrained(vae_path, torch_dtype=torch.float32),
        unet=UNet2DConditionModel.from_pretrained(root / "unet", torch_dtype=load_dtype(config, "unet")),
        noise_scheduler=DDPMScheduler.from_pretrained(root / "scheduler"), model_path=model_path)


def _tokenizer_folder(config, root: Path) -> Path:
    if not config.tokenizer:
        return root / "tokenizer"
    location = Path(paths.resolve(config.tokenizer))
    if (location / "model_index.json").is_file():
        if not is_sdxl_folder(location):
            raise UserError(f"config key 'tokenizer': {location} is an SD1.x/SD2.x model, but 'model' is SDXL; "
                            "remove tokenizer: or point it at the SDXL model's folder")
        location = location / "tokenizer"
    if not location.is_dir():
        raise UserError(f"config key 'tokenizer': not a folder: {location}")
    return location


def warn_of_low_resolution(config, unet) -> None:
    """SDXL models learnt their subjects at their native size; far below it they render badly."""
    native = unet.config.sample_size * 8
    if config.data.resolution < native * SMALLEST_USEFUL_FRACTION:
        notices.warn(f"config key 'data.resolution': {config.data.resolution} is far below this SDXL model's "
                     f"native {native} px; train at {int(native * SMALLEST_USEFUL_FRACTION)} or more "
                     f"(1024 is usual)")


class StableDiffusionXL(Family):
    """SDXL and the models built on it (same architecture, epsilon or v-prediction)."""
    name = "sdxl"
    conditioning_parts = ("encoder_hidden_states", "text_embeds")
    supports_custom_embeddings = False

    def load(self, config) -> Components:
        from .family import configure_noise_schedule

        components = load_components(config)
        configure_noise_schedule(components, config)
        warn_of_low_resolution(config, components.unet)
        return components

    def objective(self, config, scheduler):
        from ..objectives import Diffusion

        return Diffusion(config, scheduler)

    def fake_components(self, config, architecture) -> Components:
        """The architecture's models, built under the caller's FakeTensorMode: shapes, no weights."""
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from .family import configure_noise_schedule

        encoders = TextEncoders(CLIPTextModel(CLIPTextConfig.from_dict(architecture.text_encoder)),
                                CLIPTextModelWithProjection(CLIPTextConfig.from_dict(architecture.text_encoder_2)))
        components = Components(
            tokenizer=None, text_encoder=encoders, vae=AutoencoderKL.from_config(architecture.vae),
            unet=UNet2DConditionModel.from_config(architecture.unet),
            noise_scheduler=DDPMScheduler.from_config(architecture.scheduler), model_path=architecture.source)
        configure_noise_schedule(components, config)
        return components

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict:
        hidden, pooled = text_encoder(input_ids, clip_stop_at_layer)
        return {"encoder_hidden_states": hidden, "text_embeds": pooled}

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]:
        # The first encoder's last layers and final norm never run for the hidden states it gives; the
        # second's pooled embedding needs all of it.
        first = getattr(text_encoder, "module", text_encoder).text_encoder
        model = getattr(first, "text_model", first)
        layers = model.encoder.layers
        return list(layers[len(layers) - clip_stop_at_layer:]) + [model.final_layer_norm]

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        added = {"text_embeds": conditioning["text_embeds"], "time_ids": time_ids.to(noisy_latents.device)}
        return unet(noisy_latents, timesteps, conditioning["encoder_hidden_states"], added_cond_kwargs=added).sample

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """StableDiffusionXLPipeline over the given (trained) UNet and text encoders, sampling with Euler."""
        from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

        pipeline = StableDiffusionXLPipeline(
            unet=unet, vae=components.vae, text_encoder=text_encoder.text_encoder,
            text_encoder_2=text_encoder.text_encoder_2, tokenizer=components.tokenizer, tokenizer_2=None,
            scheduler=EulerDiscreteScheduler.from_config(components.noise_scheduler.config))
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    @torch.no_grad()
    def render(self, pipeline, positive: dict, negative: dict, **options) -> list:
        """Images from embeddings. The SDXL VAE overflows in fp16, so unless the VAE says it is safe there
        (a fixed VAE's force_upcast: false) it decodes in fp32 outside any autocast."""
        latents = pipeline(prompt_embeds=positive["encoder_hidden_states"],
                           pooled_prompt_embeds=positive["text_embeds"],
                           negative_prompt_embeds=negative["encoder_hidden_states"],
                           negative_pooled_prompt_embeds=negative["text_embeds"], output_type="latent",
                           **options).images
        vae = pipeline.vae
        upcast = getattr(vae.config, "force_upcast", True)
        dtype = torch.float32 if upcast else vae.dtype
        original = vae.dtype
        with torch.autocast(latents.device.type, enabled=False) if upcast else contextlib.nullcontext():
            vae.to(dtype)
            try:
                pixels = vae.decode(latents.to(dtype) / vae.config.scaling_factor).sample
            finally:
                vae.to(original)
        return pipeline.image_processor.postprocess(pixels.float(), output_type="pil")

