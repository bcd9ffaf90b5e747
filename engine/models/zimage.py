"""The Z-Image family (Tongyi-MAI Z-Image-Turbo): a single-stream rectified-flow transformer over 2x2 patches of
Flux.1's 16-channel latents, conditioned on the hidden states of Qwen3-4B's second-to-last layer.

ZImagePipeline wraps each prompt in Qwen3's chat template as one user turn (thinking on, so no empty
think block follows the assistant's turn), pads it to 512 tokens and hands the transformer each prompt's
hidden states without their padding, one tensor per prompt. `ZImageTokenizer` gives the trainer those ids,
padded with Qwen's `<|endoftext|>`, so the caches strip the padding as for every family; the conditioning
keeps the padded rows (`encoder_hidden_states`) with a per-token mask (`encoder_attention_mask`, [B, L, 1]
so that the caches cut it to the batch's length as they cut the hidden states), and `predict` hands the
transformer each row cut to its own length.

The transformer sits in the components' `unet` field. It takes time running from 0 (noise) to 1 (image) and
predicts x₀ − ε; `predict` gives it 1 − σ and returns ε − x₀, the target of `objectives.RectifiedFlow`, with
the latents as [B, 16, H, W] as for every other family.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from .. import block_swap, notices, paths
from ..errors import UserError
from .base_family import Family
from .flux import bucket_sides
from .qwen3_text import PAD_TOKEN_ID, load_qwen_tokenizer, qwen3_tokenizer
from .sd import Components, resolve_model_path
from .single_file import BUILTIN_CONFIGS

ARCH = "z-image"
# ZImagePipeline's max_sequence_length: the prompt's tokens, chat template included
MAX_SEQUENCE_LENGTH = 512
# 8x VAE, then 2x2 patches (the transformer's all_patch_size): image sides are multiples of 16.
PIXELS_PER_TOKEN_SIDE = 16
PATCH = 2
# Z-Image-Turbo was trained at 1024 px (its pipeline's default size); much below 512 it renders poorly.
SMALLEST_USEFUL_RESOLUTION = 512
# the hidden states ZImagePipeline._encode_prompt takes: the output of the second-to-last decoder layer
HIDDEN_LAYER = -2


class ZImageTokenizer:
    """Each caption as Qwen3's chat template makes it one user turn awaiting the answer, then Qwen's ids."""

    def __init__(self, qwen, length: int = MAX_SEQUENCE_LENGTH):
        self.qwen = qwen
        self.model_max_length = length
        self.pad_token_id = qwen.pad_token_id

    def turn(self, caption: str) -> str:
        return self.qwen.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=True)

    def __call__(self, text, padding=None, max_length: Optional[int] = None, truncation: bool = True,
                 return_tensors: Optional[str] = None):
        texts = [text] if isinstance(text, str) else list(text)
        encoded = self.qwen([self.turn(t) for t in texts], padding=padding or False,
                            max_length=max_length or self.model_max_length, truncation=truncation,
                            return_tensors=return_tensors)
        ids = encoded.input_ids
        return SimpleNamespace(input_ids=ids[0] if isinstance(text, str) and return_tensors is None else ids)


def is_zimage_transformer(folder: Path) -> bool:
    """Whether folder holds a ZImageTransformer2DModel (a diffusers folder's transformer/, a checkpoint's unet/)."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get(
        "_class_name") == "ZImageTransformer2DModel"


def is_zimage(model: str) -> bool:
    from .zimage_files import is_zimage_file

    path = Path(resolve_model_path(model))
    return is_zimage_transformer(path / "transformer") if path.is_dir() else is_zimage_file(path)


def check_config(config) -> None:
    """Refuse what Z-Image cannot train, naming the key; warn of a resolution it renders poorly at."""
    if config.tokenizer:
        raise UserError("config key 'tokenizer': Z-Image's tokenizer is Qwen3's, the model's own; remove tokenizer:")
    if config.clip_stop_at_layer > 1:
        raise UserError("config key 'clip_stop_at_layer': Z-Image takes its Qwen3 text encoder's second-to-last "
                        "layer, which CLIP skip does not change; set it to 1")
    if config.text_encoder_2:
        raise UserError("config key 'text_encoder_2': Z-Image has one text encoder (Qwen3-4B, text_encoder:); "
                        "remove text_encoder_2:")
    for key in ("train_text_encoder", "train_text_encoder_2"):
        if getattr(config, key):
            raise UserError(f"config key '{key}': Z-Image's text encoder (Qwen3-4B) is not trained; set it to "
                            "false or remove it")
    if config.network.adapter and config.network.conv_rank:
        raise UserError("config key 'network.conv_rank': Z-Image's transformer has no convolutions for LoCon to "
                        "adapt; set it to 0")
    if config.flow.guidance is not None:
        raise UserError("config key 'flow.guidance': Z-Image has no guidance embedding; remove flow.guidance")
    # ZImagePipeline refuses a sample of other sides, which would cost a sampling round
    samples = [(f"sampling.concepts[{i}].{name}", getattr(concept, name)) for i, concept in
               enumerate(config.sampling.concepts) for name in ("width", "height") if getattr(concept, name)]
    for key, side in bucket_sides(config) + samples:
        if side % PIXELS_PER_TOKEN_SIDE:
            raise UserError(f"config key '{key}': Z-Image makes one token of each 16x16 pixels (8x latents in "
                            f"2x2 patches), so image sides must be multiples of 16; {side} is not")
    if config.data.resolution < SMALLEST_USEFUL_RESOLUTION:
        notices.warn(f"config key 'data.resolution': {config.data.resolution} is far below Z-Image's native 1024 "
                     f"px; train at {SMALLEST_USEFUL_RESOLUTION} or more")


def shipped(component: str) -> dict:
    file = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((BUILTIN_CONFIGS / ARCH / component / file).read_text(encoding="utf-8"))


def prompt_rows(conditioning: dict) -> list[torch.Tensor]:
    """Each prompt's hidden states without its padding, as ZImagePipeline hands them to the transformer. A row
    whose mask is all zero (a caption dropped to zeros) keeps one token: the transformer needs one. The memory
    estimate's fake tensors hold no values: there every row is whole, the longest prompt the batch can have."""
    from torch._subclasses.fake_tensor import is_fake

    hidden, mask = conditioning["encoder_hidden_states"], conditioning["encoder_attention_mask"]
    if is_fake(mask):
        return list(hidden.unbind(dim=0))
    lengths = mask[..., 0].gt(0).sum(dim=1).clamp(min=1).tolist()
    return [row[:length] for row, length in zip(hidden, lengths)]


class ZImage(Family):
    """Z-Image-Turbo, and models fine-tuned from it."""
    name = ARCH
    conditioning_parts = ("encoder_hidden_states", "encoder_attention_mask")
    supports_custom_embeddings = False

    def load(self, config) -> Components:
        """Tokenizer, text encoder, VAE, transformer and the flow-matching schedule on the CPU, from a diffusers
        folder or a transformer file with the text encoder's and autoencoder's files (`zimage_files`), each
        model in the dtype the run reads it in (ram.load_dtype)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from transformers import Qwen3Model

        from ..ram import load_dtype

        model_path = resolve_model_path(config.model)
        check_config(config)
        if Path(model_path).is_file():
            from .zimage_files import load_zimage_files

            loaded = load_zimage_files(model_path, text_encoder=config.text_encoder, vae=config.vae, dtypes={
                "transformer": load_dtype(config, "unet"), "text_encoder": load_dtype(config, "text_encoder"),
                "vae": load_dtype(config, "vae")})
            return Components(tokenizer=ZImageTokenizer(qwen3_tokenizer()), text_encoder=loaded["text_encoder"],
                              vae=loaded["vae"], unet=loaded["transformer"], model_path=model_path,
                              noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(shipped("scheduler")))
        if config.text_encoder:
            raise UserError(f"config key 'text_encoder': separate text-encoder files go with a single-file Z-Image "
                            f"model; {model_path} is a diffusers folder with its own; remove text_encoder:")
        root = Path(model_path)
        vae_path = paths.resolve(config.vae) if config.vae else str(root / "vae")
        if not Path(vae_path).exists():
            raise UserError(f"config key 'vae': not found: {vae_path}")
        transformer = ZImageTransformer2DModel.from_pretrained(root / "transformer",
                                                               torch_dtype=load_dtype(config, "unet"))
        text_encoder = Qwen3Model.from_pretrained(root / "text_encoder", dtype=load_dtype(config, "text_encoder"))
        vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=load_dtype(config, "vae"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        return Components(tokenizer=ZImageTokenizer(load_qwen_tokenizer(root / "tokenizer", "Z-Image")),
                          text_encoder=text_encoder, vae=vae, unet=transformer, noise_scheduler=scheduler,
                          model_path=model_path)

    def objective(self, config, scheduler):
        from ..objectives import RectifiedFlow

        return RectifiedFlow(config, scheduler, patch=PATCH)

    def fake_components(self, config, architecture) -> Components:
        """The architecture's models, built under the caller's FakeTensorMode: shapes, no weights."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImageTransformer2DModel
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from transformers import Qwen3Config, Qwen3Model

        check_config(config)
        with unset_fake_temporarily():  # the schedule reads its own tables back (.item()), which fakes cannot
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(architecture.scheduler)
        # the prompt's length is the tokenizer's; its ids are drawn below the text encoder's vocabulary size
        tokenizer = SimpleNamespace(model_max_length=MAX_SEQUENCE_LENGTH, pad_token_id=PAD_TOKEN_ID)
        return Components(
            tokenizer=tokenizer, text_encoder=Qwen3Model(Qwen3Config.from_dict(architecture.text_encoder)),
            vae=AutoencoderKL.from_config(architecture.vae),
            unet=ZImageTransformer2DModel.from_config(architecture.unet), noise_scheduler=scheduler,
            model_path=architecture.source)

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict:
        # the padding is every <|endoftext|>: a caption that spells one out loses it, which ZImagePipeline's
        # mask would keep
        mask = input_ids != PAD_TOKEN_ID
        hidden = text_encoder(input_ids=input_ids, attention_mask=mask,
                              output_hidden_states=True).hidden_states[HIDDEN_LAYER]
        return {"encoder_hidden_states": hidden, "encoder_attention_mask": mask.unsqueeze(-1).to(hidden.dtype)}

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]:
        return []  # the text encoder never trains (check_config)

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        # one [C, frames=1, H, W] latent per sample, as ZImagePipeline passes them
        latents = list(noisy_latents.unsqueeze(2).unbind(dim=0))
        time = 1 - timesteps.to(torch.float32) / 1000
        output = unet(latents, time, prompt_rows(conditioning), return_dict=False)[0]
        return -torch.stack(output).squeeze(2)

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """ZImagePipeline over the given (trained) transformer, sampling with the model's flow-matching Euler
        schedule."""
        from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

        pipeline = ZImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer.qwen, transformer=unet)
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    @torch.no_grad()
    def render(self, pipeline, positive: dict, negative: dict, **options) -> list:
        """Images from embeddings. The sample's cfg_scale is ZImagePipeline's guidance_scale (0 for the distilled
        Turbo, which then ignores the negative prompt)."""
        return pipeline(prompt_embeds=prompt_rows(positive), negative_prompt_embeds=prompt_rows(negative),
                        **options).images
