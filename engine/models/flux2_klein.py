"""The FLUX.2 [klein] family (4B and 9B, distilled and base): a rectified-flow transformer over 2x2 patches of
Flux.2's 32-channel latents, conditioned on three hidden layers of a Qwen3 text encoder (Qwen3-4B for the 4B,
Qwen3-8B for the 9B).

Flux2KleinPipeline wraps each prompt in Qwen3's chat template as one user turn with thinking off (an empty
think block after the assistant's start), pads it to 512 tokens and stacks the hidden states of layers 9, 18
and 27 side by side for every token, padding included: the transformer sees all 512 rows, with no mask.
`KleinTokenizer` gives the trainer those ids, always padded to 512 as FluxTokenizer pads Flux.1's, so the
conditioning keeps the pipeline's length.

The autoencoder's latents are normalised by its batch-norm statistics (`bn`), kept per channel of the 2x2
patches. The trainer keeps latents as [B, 32, H, W] like every family; `normalized_latents` applies those
statistics patch position by patch position, so noise is added where the pipeline's sampler works, and
`predict` packs the latents into the transformer's tokens (Flux.1's `pack`: the pipeline's patchify then pack
give the same order) and unpacks its output.

Where the shipped configs (`configs/pipelines/flux2-klein-4b`, `flux2-klein-9b`) come from: the transformers'
sizes are diffusers' scripts/convert_flux2_to_diffusers.py (`klein-4b`, `klein-9b`), the rest its class
defaults; the text encoders are Qwen/Qwen3-4B's and Qwen/Qwen3-8B's config.json as Qwen3ForCausalLM (the
pipeline's text_encoder class); the autoencoder is AutoencoderKLFlux2's defaults, which that script converts
BFL's autoencoder into; the schedule is FLUX.1-dev's, which that script gives the converted pipeline (shift 3,
resolution-dependent shift on).
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
from .flux import PATCH, bucket_sides, pack, unpack
from .qwen3_text import PAD_TOKEN_ID, load_qwen_tokenizer
from .sd import Components, resolve_model_path
from .single_file import BUILTIN_CONFIGS

# Flux2KleinPipeline's max_sequence_length: the prompt's tokens, chat template included
MAX_SEQUENCE_LENGTH = 512
# the Qwen3 hidden states it stacks (its text_encoder_out_layers); index 0 is the embeddings' output
HIDDEN_LAYERS = (9, 18, 27)
# 8x VAE, then 2x2 patches: image sides are multiples of 16.
PIXELS_PER_TOKEN_SIDE = 16
# FLUX.2 [klein] renders at 1024 px by default (the pipeline's default_sample_size x 8); much below 512 poorly.
SMALLEST_USEFUL_RESOLUTION = 512


class KleinTokenizer:
    """Each caption as Qwen3's chat template makes it one user turn awaiting the answer (thinking off), then
    Qwen's ids, always padded to the full length with <|endoftext|>."""

    def __init__(self, qwen, length: int = MAX_SEQUENCE_LENGTH):
        self.qwen = qwen
        self.model_max_length = length
        self.pad_token_id = qwen.pad_token_id

    def turn(self, caption: str) -> str:
        return self.qwen.apply_chat_template([{"role": "user", "content": caption}], tokenize=False,
                                             add_generation_prompt=True, enable_thinking=False)

    def __call__(self, text, padding=None, max_length: Optional[int] = None, truncation: bool = True,
                 return_tensors: Optional[str] = None):
        # the transformer always saw 512 rows: a caller asking for another length would change the conditioning
        if max_length not in (None, self.model_max_length):
            raise ValueError(f"FLUX.2 [klein]'s prompts are {self.model_max_length} tokens, got "
                             f"max_length={max_length}")
        texts = [text] if isinstance(text, str) else list(text)
        ids = self.qwen([self.turn(t) for t in texts], padding="max_length", max_length=self.model_max_length,
                        truncation=True).input_ids
        if return_tensors == "pt":
            return SimpleNamespace(input_ids=torch.tensor(ids))
        return SimpleNamespace(input_ids=ids[0] if isinstance(text, str) else ids)


def is_klein_transformer(folder: Path) -> bool:
    """Whether folder holds a Flux2Transformer2DModel (a diffusers folder's transformer/, a checkpoint's unet/)."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get(
        "_class_name") == "Flux2Transformer2DModel"


def is_flux2_klein(model: str) -> bool:
    """Whether model is a FLUX.2 [klein] diffusers folder or its transformer's single file (`flux2_klein_files`)."""
    from .flux2_klein_files import is_klein_file

    path = Path(resolve_model_path(model))
    return is_klein_transformer(path / "transformer") if path.is_dir() else is_klein_file(path)


def check_config(config) -> None:
    """Refuse what FLUX.2 [klein] cannot train, naming the key; warn of a resolution it renders poorly at."""
    if config.tokenizer:
        raise UserError("config key 'tokenizer': FLUX.2 [klein]'s tokenizer is Qwen3's, the model's own; remove "
                        "tokenizer:")
    if config.clip_stop_at_layer > 1:
        raise UserError("config key 'clip_stop_at_layer': FLUX.2 [klein] takes Qwen3's layers 9, 18 and 27, which "
                        "CLIP skip does not change; set it to 1")
    if config.text_encoder_2:
        raise UserError("config key 'text_encoder_2': FLUX.2 [klein] has one text encoder, Qwen3; remove "
                        "text_encoder_2:")
    for key in ("train_text_encoder", "train_text_encoder_2"):
        if getattr(config, key):
            raise UserError(f"config key '{key}': FLUX.2 [klein]'s Qwen3 text encoder is not trained; set it to "
                            "false or remove it")
    if config.network.adapter and config.network.conv_rank:
        raise UserError("config key 'network.conv_rank': FLUX.2 [klein]'s transformer has no convolutions for "
                        "LoCon to adapt; set it to 0")
    if config.flow.guidance is not None:
        raise UserError("config key 'flow.guidance': FLUX.2 [klein] has no guidance embedding; remove flow.guidance")
    for key, side in bucket_sides(config):
        if side % PIXELS_PER_TOKEN_SIDE:
            raise UserError(f"config key '{key}': FLUX.2 [klein] makes one token of each 16x16 pixels (8x latents "
                            f"in 2x2 patches), so image sides must be multiples of 16; {side} is not")
    if config.network.adapter and config.network.modulation:
        notices.warn("config key 'network.modulation': ComfyUI reads the adapter's modulation layers, diffusers' "
                     "FLUX.2 LoRA loader leaves them out; for diffusers, load the model `convert --merge` writes")
    if config.data.resolution < SMALLEST_USEFUL_RESOLUTION:
        notices.warn(f"config key 'data.resolution': {config.data.resolution} is far below FLUX.2 [klein]'s native "
                     f"1024 px; train at {SMALLEST_USEFUL_RESOLUTION} or more")


def latent_statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) of each channel of the 2x2 patches ([4 x 32], in `pack`'s feature order), as the pipeline
    reads them from the autoencoder's batch norm."""
    mean = vae.bn.running_mean.to(like.device, like.dtype)
    std = torch.sqrt(vae.bn.running_var + vae.config.batch_norm_eps).to(like.device, like.dtype)
    return mean, std


def normalized_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """The autoencoder's latents [B, 32, H, W] in the range the transformer works in: each patch channel less
    its mean, over its standard deviation."""
    mean, std = latent_statistics(vae, latents)
    return unpack((pack(latents) - mean) / std, *latents.shape[-2:])


def text_ids(length: int, device) -> torch.Tensor:
    """Each text token's rotary position (0, 0, 0, index), as Flux2KleinPipeline gives them."""
    ids = torch.zeros(length, 4, dtype=torch.long, device=device)
    ids[:, 3] = torch.arange(length, device=device)
    return ids


def image_ids(height: int, width: int, device) -> torch.Tensor:
    """Each token's rotary position (0, row, column, 0) in `pack`'s order, for latents of height x width."""
    rows = torch.arange(height // PATCH, device=device).view(-1, 1).expand(-1, width // PATCH)
    columns = torch.arange(width // PATCH, device=device).view(1, -1).expand(height // PATCH, -1)
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, columns, zeros], dim=-1).reshape(-1, 4)


def shipped(arch: str, component: str) -> dict:
    file = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((BUILTIN_CONFIGS / arch / component / file).read_text(encoding="utf-8"))


def is_distilled(root: Path) -> bool:
    """The pipeline's is_distilled from model_index.json: the distilled models ignore classifier-free guidance;
    the base models' index has it false or leaves it out."""
    index = root / "model_index.json"
    return index.is_file() and bool(json.loads(index.read_text(encoding="utf-8")).get("is_distilled", False))


class Flux2Klein(Family):
    """FLUX.2 [klein] 4B and 9B, distilled and base, and models fine-tuned from them."""
    name = "flux2-klein"
    conditioning_parts = ("encoder_hidden_states",)
    supports_custom_embeddings = False

    def __init__(self):
        # the pipeline's is_distilled, from the model folder by load() (fake_components: the shipped one's)
        self.distilled = True

    def load(self, config) -> Components:
        """Tokenizer, text encoder, VAE, transformer and the flow-matching schedule on the CPU, from a diffusers
        folder or a transformer file with the text encoder's and autoencoder's files (`flux2_klein_files`), each
        model in the dtype the run reads it in (ram.load_dtype)."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from transformers import Qwen3ForCausalLM

        from ..ram import load_dtype

        model_path = resolve_model_path(config.model)
        check_config(config)
        if Path(model_path).is_file():
            from .flux2_klein_files import load_klein_files
            from .qwen3_text import qwen3_tokenizer

            # a file says nothing of its distillation: sampled as the distilled models are, without guidance
            self.distilled = True
            loaded = load_klein_files(model_path, text_encoder=config.text_encoder, vae=config.vae, dtypes={
                "transformer": load_dtype(config, "unet"), "text_encoder": load_dtype(config, "text_encoder"),
                "vae": load_dtype(config, "vae")})
            return Components(tokenizer=KleinTokenizer(qwen3_tokenizer()), text_encoder=loaded["text_encoder"],
                              vae=loaded["vae"], unet=loaded["transformer"], model_path=model_path,
                              noise_scheduler=FlowMatchEulerDiscreteScheduler.from_config(
                                  shipped("flux2-klein-4b", "scheduler")))
        if config.text_encoder:
            raise UserError(f"config key 'text_encoder': {model_path} is a diffusers folder with its own; remove "
                            "text_encoder:")
        root = Path(model_path)
        vae_path = paths.resolve(config.vae) if config.vae else str(root / "vae")
        if not Path(vae_path).exists():
            raise UserError(f"config key 'vae': not found: {vae_path}")
        self.distilled = is_distilled(root)
        transformer = Flux2Transformer2DModel.from_pretrained(root / "transformer",
                                                              torch_dtype=load_dtype(config, "unet"))
        text_encoder = Qwen3ForCausalLM.from_pretrained(root / "text_encoder", dtype=load_dtype(config, "text_encoder"))
        vae = AutoencoderKLFlux2.from_pretrained(vae_path, torch_dtype=load_dtype(config, "vae"))
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        return Components(tokenizer=KleinTokenizer(load_qwen_tokenizer(root / "tokenizer", "FLUX.2 [klein]")),
                          text_encoder=text_encoder, vae=vae, unet=transformer, noise_scheduler=scheduler,
                          model_path=model_path)

    def objective(self, config, scheduler):
        from ..objectives import RectifiedFlow

        return RectifiedFlow(config, scheduler, patch=PATCH)

    def fake_components(self, config, architecture) -> Components:
        """The architecture's models, built under the caller's FakeTensorMode: shapes, no weights."""
        from diffusers import AutoencoderKLFlux2, FlowMatchEulerDiscreteScheduler, Flux2Transformer2DModel
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from transformers import Qwen3Config, Qwen3ForCausalLM

        check_config(config)
        with unset_fake_temporarily():  # the schedule reads its own tables back (.item()), which fakes cannot
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(architecture.scheduler)
        # the prompt's length is the tokenizer's; its ids are drawn below the text encoder's vocabulary size
        tokenizer = SimpleNamespace(model_max_length=MAX_SEQUENCE_LENGTH, pad_token_id=PAD_TOKEN_ID)
        return Components(
            tokenizer=tokenizer,
            text_encoder=Qwen3ForCausalLM(Qwen3Config.from_dict(architecture.text_encoder)),
            vae=AutoencoderKLFlux2.from_config(architecture.vae),
            unet=Flux2Transformer2DModel.from_config(architecture.unet), noise_scheduler=scheduler,
            model_path=architecture.source)

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict:
        # the padding is every <|endoftext|>: a caption that spells one out loses it, which the pipeline's
        # tokenizer mask would keep. The decoder without its language-model head: the same hidden states, no
        # logits over Qwen's 151,936 tokens for every one of the 512 positions.
        output = text_encoder.model(input_ids=input_ids, attention_mask=input_ids != PAD_TOKEN_ID,
                                    output_hidden_states=True, use_cache=False)
        # [B, L, 3 x hidden]: each token's three layers side by side
        hidden = torch.cat([output.hidden_states[layer] for layer in HIDDEN_LAYERS], dim=-1)
        return {"encoder_hidden_states": hidden}

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]:
        return []  # the text encoder never trains (check_config)

    def normalized_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        return normalized_latents(vae, latents)

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        height, width = noisy_latents.shape[-2:]
        hidden = conditioning["encoder_hidden_states"]
        output = unet(hidden_states=pack(noisy_latents), timestep=timesteps.to(noisy_latents.dtype) / 1000,
                      guidance=None, encoder_hidden_states=hidden,
                      txt_ids=text_ids(hidden.shape[1], hidden.device),
                      img_ids=image_ids(height, width, noisy_latents.device), return_dict=False)[0]
        return unpack(output, height, width)

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """Flux2KleinPipeline over the given (trained) transformer, sampling with the model's flow-matching Euler
        schedule."""
        from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

        pipeline = Flux2KleinPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae, text_encoder=text_encoder, tokenizer=components.tokenizer.qwen, transformer=unet,
            is_distilled=self.distilled)
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    @torch.no_grad()
    def render(self, pipeline, positive: dict, negative: dict, **options) -> list:
        """Images from embeddings. The sample's cfg_scale is the pipeline's guidance_scale: classifier-free
        guidance with the negative prompt for the base models above 1, ignored by the distilled ones."""
        return pipeline(prompt_embeds=positive["encoder_hidden_states"],
                        negative_prompt_embeds=negative["encoder_hidden_states"], **options).images
