"""The Chroma family (lodestones' Chroma1-HD and Chroma1-Base): FLUX.1-schnell's transformer without CLIP and
without the guidance embedding, conditioned on T5-XXL's hidden states alone. One small network (the
`distilled_guidance_layer`) computes every block's modulation from the timestep, in place of Flux.1's
per-block modulation layers.

Chroma masks T5's padding twice, as its trainer, ComfyUI and ChromaPipeline do: T5 encodes the caption's
tokens (its end token included) with the padding masked, and the transformer's attention then sees those
tokens plus the first padding token. The transformer's mask is therefore part of the conditioning
(`attention_mask`, one boolean per T5 token), which the caches store beside the hidden states. It stays
boolean on its way to the transformer: scaled-dot-product attention adds a floating-point mask to the
scores instead of masking, which is what ChromaPipeline's own float mask does (diffusers issue #13619).

The prompt is T5's 512 tokens, padded to full length as ChromaPipeline pads them. The transformer sits in the
components' `unet` field; `predict` packs latents exactly as Flux.1 does (`flux.pack`).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

from .. import block_swap, notices, paths
from ..errors import UserError
from . import t5_vocab
from .base_family import Family
from .flux import PATCH, PIXELS_PER_TOKEN_SIDE, bucket_sides, image_ids, load_t5_tokenizer, pack, unpack
from .sd import Components, resolve_model_path
from .single_file import BUILTIN_CONFIGS

# ChromaPipeline's max_sequence_length: the T5 tokens of every prompt.
T5_LENGTH = 512
CONFIGS = BUILTIN_CONFIGS / "chroma"
# Chroma1-HD was trained up to 1024 px (Chroma1-Base at 512); much below 512 it renders poorly.
SMALLEST_USEFUL_RESOLUTION = 512


class ChromaTokenizer:
    """T5's ids padded to the full 512 tokens, for one caption or a list of them: a shorter batch would lose
    the padding token the transformer attends to."""

    def __init__(self, t5, length: int = T5_LENGTH):
        self.t5 = t5
        self.model_max_length = length
        self.pad_token_id = t5.pad_token_id

    def __call__(self, text, padding=None, max_length: Optional[int] = None, truncation: bool = True,
                 return_tensors: Optional[str] = None):
        if max_length not in (None, self.model_max_length):
            raise ValueError(f"Chroma's prompts are {self.model_max_length} tokens, got max_length={max_length}")
        return self.t5(text, padding="max_length", max_length=self.model_max_length, truncation=True,
                       return_tensors=return_tensors)


def is_chroma_transformer(folder: Path) -> bool:
    """Whether folder holds a ChromaTransformer2DModel (a diffusers folder's transformer/, a checkpoint's unet/)."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get(
        "_class_name") == "ChromaTransformer2DModel"


def is_chroma_folder(root: Path) -> bool:
    return is_chroma_transformer(root / "transformer")


def is_chroma(model: str) -> bool:
    """Whether model is a Chroma diffusers folder or transformer file (single_file.detect_family)."""
    from .single_file import detect_family, read_shapes

    path = Path(resolve_model_path(model))
    if path.is_dir():
        return is_chroma_folder(path)
    try:
        return detect_family(read_shapes(path)) == "chroma"
    except UserError:  # not a readable checkpoint: the SD loader names the problem
        return False


def check_config(config) -> None:
    """Refuse what Chroma cannot train, naming the key; warn of a resolution it renders poorly at."""
    for key, reason in (
            ("tokenizer", "Chroma's tokenizer is T5's own; remove tokenizer:"),
            ("text_encoder_2", "Chroma has one text encoder (T5-XXL); remove text_encoder_2:"),
            ("train_text_encoder", "Chroma's T5-XXL is never trained; set it to false or remove it"),
            ("train_text_encoder_2", "Chroma has one text encoder (T5-XXL), never trained; remove it"),
            ("flow.guidance", "Chroma has no guidance embedding (guidance is true CFG at sampling); remove it")):
        value = config
        for part in key.split("."):
            value = getattr(value, part)
        if value:
            raise UserError(f"config key '{key}': {reason}")
    if config.clip_stop_at_layer > 1:
        raise UserError("config key 'clip_stop_at_layer': Chroma has no CLIP (T5-XXL only); set it to 1")
    if config.network.adapter and config.network.modulation:
        raise UserError("config key 'network.modulation': Chroma's blocks have no modulation layers (one network, "
                        "distilled_guidance_layer, computes them all); set it to false")
    if config.network.adapter and config.network.conv_rank:
        raise UserError("config key 'network.conv_rank': Chroma's transformer has no convolutions for LoCon to "
                        "adapt; set it to 0")
    for key, side in bucket_sides(config):
        if side % PIXELS_PER_TOKEN_SIDE:
            raise UserError(f"config key '{key}': Chroma makes one token of each 16x16 pixels (8x latents in "
                            f"2x2 patches), so image sides must be multiples of 16; {side} is not")
    if config.data.resolution < SMALLEST_USEFUL_RESOLUTION:
        notices.warn(f"config key 'data.resolution': {config.data.resolution} is far below Chroma's native "
                     f"1024 px; train at {SMALLEST_USEFUL_RESOLUTION} or more")


class Chroma(Family):
    """Chroma1-HD, Chroma1-Base and models fine-tuned from them."""
    name = "chroma"
    conditioning_parts = ("encoder_hidden_states", "attention_mask")
    supports_custom_embeddings = False

    def load(self, config) -> Components:
        """Tokenizer, T5, VAE, transformer and the flow-matching schedule of a diffusers folder or of ComfyUI's
        files on the CPU, each model in the dtype the run reads it in (ram.load_dtype)."""
        from diffusers import AutoencoderKL, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
        from transformers import T5EncoderModel

        from ..ram import load_dtype

        check_config(config)
        root = Path(resolve_model_path(config.model))
        if root.is_file():
            return self._load_files(config, root)
        if config.text_encoder:
            raise UserError(f"config key 'text_encoder': {root} is a diffusers folder with its own T5; "
                            "remove text_encoder:")
        vae_path = paths.resolve(config.vae) if config.vae else str(root / "vae")
        if not Path(vae_path).exists():
            raise UserError(f"config key 'vae': not found: {vae_path}")
        transformer = ChromaTransformer2DModel.from_pretrained(root / "transformer",
                                                               torch_dtype=load_dtype(config, "unet"))
        t5 = T5EncoderModel.from_pretrained(root / "text_encoder", dtype=load_dtype(config, "text_encoder"))
        vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=load_dtype(config, "vae"))
        return Components(tokenizer=ChromaTokenizer(load_t5_tokenizer(root / "tokenizer", T5_LENGTH)),
                          text_encoder=t5, vae=vae, unet=transformer,
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
                          model_path=str(root))

    def _load_files(self, config, path: Path) -> Components:
        """The transformer file with T5-XXL and the autoencoder as separate files (or in the same checkpoint),
        as ComfyUI keeps them; the tokenizer and the schedule are the shipped ones."""
        from diffusers import FlowMatchEulerDiscreteScheduler

        from ..ram import load_dtype
        from .single_file import load_chroma_files

        loaded = load_chroma_files(path, text_encoder=config.text_encoder, vae=config.vae, dtypes={
            "transformer": load_dtype(config, "unet"), "text_encoder": load_dtype(config, "text_encoder"),
            "vae": load_dtype(config, "vae")})
        scheduler = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
        return Components(tokenizer=ChromaTokenizer(t5_vocab.t5_tokenizer(T5_LENGTH)),
                          text_encoder=loaded["text_encoder"], vae=loaded["vae"], unet=loaded["transformer"],
                          noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler),
                          model_path=str(path))

    def objective(self, config, scheduler):
        from ..objectives import RectifiedFlow

        return RectifiedFlow(config, scheduler, patch=PATCH)

    def fake_components(self, config, architecture) -> Components:
        """The architecture's models, built under the caller's FakeTensorMode: shapes, no weights."""
        from diffusers import AutoencoderKL, ChromaTransformer2DModel, FlowMatchEulerDiscreteScheduler
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from transformers import T5Config, T5EncoderModel

        check_config(config)
        with unset_fake_temporarily():  # the schedule reads its own tables back (.item()), which fakes cannot
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(architecture.scheduler)
        return Components(
            tokenizer=ChromaTokenizer(t5_vocab.t5_tokenizer(T5_LENGTH)),
            text_encoder=T5EncoderModel(T5Config.from_dict(architecture.text_encoder)),
            vae=AutoencoderKL.from_config(architecture.vae),
            unet=ChromaTransformer2DModel.from_config(architecture.unet), noise_scheduler=scheduler,
            model_path=architecture.source)

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict:
        # T5 sees the caption's tokens and its end token; padding only ever follows them
        tokens = input_ids != t5_vocab.PAD_ID
        hidden = text_encoder(input_ids, attention_mask=tokens.long()).last_hidden_state
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return {"encoder_hidden_states": hidden,
                "attention_mask": positions <= tokens.sum(dim=1, keepdim=True)}  # ... and the first padding token

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]:
        return []  # T5 never trains (check_config)

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        height, width = noisy_latents.shape[-2:]
        hidden, text = conditioning["encoder_hidden_states"], conditioning["attention_mask"].bool()
        # uncond.cond: zeros zeroes a dropped caption's mask with its hidden states: that row attends to all its
        # (zero) text tokens, since a text token that attends to nothing has no attention output at all
        text = text | ~text.any(dim=1, keepdim=True)
        tokens = pack(noisy_latents)
        mask = torch.cat([text, text.new_ones(tokens.shape[:2])], dim=1)  # the image tokens all attend
        output = unet(hidden_states=tokens, timestep=timesteps.to(noisy_latents.dtype) / 1000,
                      encoder_hidden_states=hidden,
                      txt_ids=torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=noisy_latents.dtype),
                      img_ids=image_ids(height, width, noisy_latents.device, noisy_latents.dtype),
                      attention_mask=mask, return_dict=False)[0]
        return unpack(output, height, width)

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """ChromaPipeline over the given (trained) transformer, sampling with the model's flow-matching Euler
        schedule."""
        from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

        pipeline = ChromaPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer.t5, transformer=unet)
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    @torch.no_grad()
    def render(self, pipeline, positive: dict, negative: dict, **options) -> list:
        """Images from embeddings, with the boolean masks (see the module's docstring). The sample's cfg_scale
        is ChromaPipeline's guidance_scale: true classifier-free guidance against the negative prompt."""
        return pipeline(prompt_embeds=positive["encoder_hidden_states"],
                        prompt_attention_mask=positive["attention_mask"].bool(),
                        negative_prompt_embeds=negative["encoder_hidden_states"],
                        negative_prompt_attention_mask=negative["attention_mask"].bool(),
                        max_sequence_length=positive["encoder_hidden_states"].shape[1], **options).images
