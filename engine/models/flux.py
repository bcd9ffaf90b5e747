"""The Flux.1 family (dev and schnell): a rectified-flow transformer over 2x2 patches of 16-channel latents,
conditioned on T5-XXL's hidden states and CLIP ViT-L's pooled output.

The trainer hands one tokenizer's ids around (the dataset, the caches, the sampler), so `FluxTokenizer`
gives each caption CLIP's 77 ids followed by T5's (512 for dev, 256 for schnell), each part padded to its
full length as FluxPipeline pads them: the split between the two is fixed, and the trailing padding the
caches strip is T5's. The two encoders travel as one module (`FluxTextEncoders`), as SDXL's do.

The transformer sits in the components' `unet` field (the trainer's "denoising model"). `predict` packs the
latents into the transformer's token sequence and unpacks its output, so the loss, the masks and prior
preservation see [B, 16, H, W] as for every other family.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import torch

from .. import block_swap, notices, paths
from ..errors import UserError
from . import clip_vocab, t5_vocab
from .base_family import Family
from .sd import Components, load_tokenizer, resolve_model_path
from .single_file import BUILTIN_CONFIGS
# T5 tokens of the prompt: what BFL's reference code and FluxPipeline use for each model.
T5_LENGTH = {"dev": 512, "schnell": 256}
# 8x VAE, then 2x2 patches: image sides are multiples of 16.
PIXELS_PER_TOKEN_SIDE = 16
PATCH = 2
# Flux.1 was trained at 1024 px and up; much below 512 it renders poorly.
SMALLEST_USEFUL_RESOLUTION = 512


def variant(transformer_config) -> str:
    """dev (guidance-distilled: it has a guidance embedding) or schnell (timestep-distilled: none)."""
    return "dev" if transformer_config["guidance_embeds"] else "schnell"


class FluxTokenizer:
    """CLIP's ids then T5's, both padded to their full lengths, for one caption or a list of them."""

    def __init__(self, clip, t5, t5_length: int):
        self.clip, self.t5 = clip, t5
        self.clip_length, self.t5_length = clip.model_max_length, t5_length
        self.model_max_length = self.clip_length + t5_length
        self.pad_token_id = t5.pad_token_id  # the trailing padding is always T5's

    def __call__(self, text, padding=None, max_length: Optional[int] = None, truncation: bool = True,
                 return_tensors: Optional[str] = None):
        # Padding and truncation are always on and the length is fixed: the encoders split the ids at 77, so a
        # caller asking for another length would get ids cut in the wrong place.
        if max_length not in (None, self.model_max_length):
            raise ValueError(f"Flux's prompts are {self.model_max_length} tokens, got max_length={max_length}")
        first = self.clip(text, padding="max_length", max_length=self.clip_length, truncation=True).input_ids
        second = self.t5(text, padding="max_length", max_length=self.t5_length, truncation=True).input_ids
        ids = first + second if isinstance(text, str) else [a + b for a, b in zip(first, second)]
        if return_tensors == "pt":  # one row per caption, a single one included, as transformers' tokenizers
            return SimpleNamespace(input_ids=torch.tensor([ids] if isinstance(text, str) else ids))
        return SimpleNamespace(input_ids=ids)


class FluxTextEncoders(torch.nn.Module):
    """CLIP ViT-L (`text_encoder`: only its pooled output is used) and T5-XXL's encoder (`text_encoder_2`)."""
    # train_text_encoder trains CLIP only: T5-XXL (4.7 B parameters) stays as BFL trained it
    never_trained = ("text_encoder_2",)

    def __init__(self, text_encoder, text_encoder_2):
        super().__init__()
        self.text_encoder = text_encoder
        self.text_encoder_2 = text_encoder_2

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder, "text_encoder_2": self.text_encoder_2}

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(T5's last hidden state, CLIP's pooled output) for FluxTokenizer's ids."""
        split = self.text_encoder.config.max_position_embeddings
        pooled = self.text_encoder(input_ids[:, :split]).pooler_output
        return self.text_encoder_2(input_ids[:, split:]).last_hidden_state, pooled


def is_flux_transformer(folder: Path) -> bool:
    """Whether folder holds a FluxTransformer2DModel (a diffusers folder's transformer/, a checkpoint's unet/)."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get(
        "_class_name") == "FluxTransformer2DModel"


def is_flux_folder(root: Path) -> bool:
    return is_flux_transformer(root / "transformer")


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, H/2·W/2, 4C]: each 2x2 patch one token, row by row, channels then the patch."""
    b, c, h, w = latents.shape
    patches = latents.view(b, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(b, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of pack for latents of height x width."""
    b, _, features = tokens.shape
    channels = features // (PATCH * PATCH)
    patches = tokens.view(b, height // PATCH, width // PATCH, channels, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(b, channels, height, width)


def image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """Each token's rotary position (0, row, column), in pack's order."""
    rows = torch.arange(height // PATCH, device=device).view(-1, 1).expand(-1, width // PATCH)
    columns = torch.arange(width // PATCH, device=device).view(1, -1).expand(height // PATCH, -1)
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).to(dtype)


def bucket_sides(config) -> list[tuple[str, int]]:
    """(config key, side) of each value the training sizes are built from: with all of them multiples of 16,
    so is every bucket (the automatic grid steps from its smallest side by c_div's step)."""
    arb = config.aspect_ratio_bucket
    sides = [("data.resolution", config.data.resolution)]
    if not arb.enabled:
        return sides
    if arb.manual is not None:
        manual = arb.manual
        base = [manual.base_res] if isinstance(manual.base_res, int) else list(manual.base_res)
        prefix = "aspect_ratio_bucket.manual"
        return [(f"{prefix}.base_res", s) for s in base] + [(f"{prefix}.divisor", manual.divisor)] + \
            [(f"{prefix}.dim_range", s) for s in manual.dim_range]
    from ..data.buckets import bucket_grid

    grid = bucket_grid(config)
    return sides + [("aspect_ratio_bucket.c_div", grid.step), ("aspect_ratio_bucket.c_dim", grid.min_side)]


def check_config(config, transformer_config) -> None:
    """Refuse what Flux.1 cannot train, naming the key; warn of a resolution it renders poorly at."""
    if config.tokenizer:
        raise UserError("config key 'tokenizer': Flux.1 has two tokenizers (CLIP's and T5's), both the model's "
                        "own; remove tokenizer:")
    if config.clip_stop_at_layer > 1:
        raise UserError("config key 'clip_stop_at_layer': Flux.1 uses only CLIP's pooled output, which CLIP skip "
                        "does not change; set it to 1")
    if config.train_text_encoder_2:
        raise UserError("config key 'train_text_encoder_2': Flux.1's T5-XXL is never trained (train_text_encoder "
                        "trains CLIP-L); set it to false or remove it")
    if config.network.adapter and config.network.conv_rank:
        raise UserError("config key 'network.conv_rank': Flux.1's transformer has no convolutions for LoCon to "
                        "adapt; set it to 0")
    if config.flow.guidance is not None and not transformer_config["guidance_embeds"]:
        raise UserError("config key 'flow.guidance': this Flux.1 model (schnell) has no guidance embedding; "
                        "remove flow.guidance")
    for key, side in bucket_sides(config):
        if side % PIXELS_PER_TOKEN_SIDE:
            raise UserError(f"config key '{key}': Flux.1 makes one token of each 16x16 pixels (8x latents in "
                            f"2x2 patches), so image sides must be multiples of 16; {side} is not")
    if config.data.resolution < SMALLEST_USEFUL_RESOLUTION:
        notices.warn(f"config key 'data.resolution': {config.data.resolution} is far below Flux.1's native 1024 "
                     f"px; train at {SMALLEST_USEFUL_RESOLUTION} or more")


def _shipped(name: str, component: str) -> dict:
    file = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((BUILTIN_CONFIGS / f"flux1-{name}" / component / file).read_text(encoding="utf-8"))


def _detected_single_file(path: Path) -> bool:
    from .single_file import detect_family, read_shapes

    try:
        return detect_family(read_shapes(path)) == "flux1"
    except UserError:  # not a readable checkpoint: the SD loader names the problem
        return False


def is_flux(model: str) -> bool:
    path = Path(resolve_model_path(model))
    return is_flux_folder(path) if path.is_dir() else _detected_single_file(path)


class Flux1(Family):
    """FLUX.1-dev and FLUX.1-schnell, and models fine-tuned from them."""
    name = "flux1"
    conditioning_parts = ("encoder_hidden_states", "pooled_projections")
    supports_custom_embeddings = False

    def __init__(self):
        # the guidance embedding's input while training (dev; None for schnell), from the config by load() or
        # fake_components(), which see the transformer's config
        self.guidance: Optional[float] = None

    def _set_guidance(self, config, transformer_config) -> None:
        if transformer_config["guidance_embeds"]:
            self.guidance = 1.0 if config.flow.guidance is None else config.flow.guidance

    def load(self, config) -> Components:
        """Tokenizers, both text encoders, VAE, transformer and the flow-matching schedule on the CPU, each model
        in the dtype the run reads it in (ram.load_dtype)."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        from ..ram import load_dtype

        model_path = resolve_model_path(config.model)
        if Path(model_path).is_file():
            from .single_file import load_flux_files

            loaded = load_flux_files(model_path, text_encoder=config.text_encoder,
                                     text_encoder_2=config.text_encoder_2, vae=config.vae, dtypes={
                                         "transformer": load_dtype(config, "unet"),
                                         **{name: load_dtype(config, name) for name in (
                                             "text_encoder", "text_encoder_2", "vae")}})
            transformer, clip, t5, vae = (loaded[k] for k in ("transformer", "text_encoder", "text_encoder_2", "vae"))
            kind = variant(transformer.config)
            clip_tokenizer = clip_vocab.clip_tokenizer(clip_vocab.END)  # FLUX.1's tokenizer/ pads with the end
            t5_tokenizer = t5_vocab.t5_tokenizer(T5_LENGTH[kind])
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(_shipped(kind, "scheduler"))
        else:
            for key in ("text_encoder", "text_encoder_2"):
                if getattr(config, key):
                    raise UserError(f"config key '{key}': separate text-encoder files go with a single-file Flux.1 "
                                    f"model; {model_path} is a diffusers folder with its own; remove {key}:")
            root = Path(model_path)
            transformer = FluxTransformer2DModel.from_pretrained(root / "transformer",
                                                                 torch_dtype=load_dtype(config, "unet"))
            kind = variant(transformer.config)
            vae_path = paths.resolve(config.vae) if config.vae else str(root / "vae")
            if not Path(vae_path).exists():
                raise UserError(f"config key 'vae': not found: {vae_path}")
            clip = CLIPTextModel.from_pretrained(root / "text_encoder", dtype=load_dtype(config, "text_encoder"))
            t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", dtype=load_dtype(config, "text_encoder_2"))
            vae = AutoencoderKL.from_pretrained(vae_path, torch_dtype=load_dtype(config, "vae"))
            clip_tokenizer = load_tokenizer(root / "tokenizer", "model")
            t5_tokenizer = load_t5_tokenizer(root / "tokenizer_2", T5_LENGTH[kind])
            scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler")
        check_config(config, transformer.config)
        self._set_guidance(config, transformer.config)
        return Components(tokenizer=FluxTokenizer(clip_tokenizer, t5_tokenizer, T5_LENGTH[kind]),
                          text_encoder=FluxTextEncoders(clip, t5), vae=vae, unet=transformer,
                          noise_scheduler=scheduler, model_path=model_path)

    def objective(self, config, scheduler):
        from ..objectives import RectifiedFlow

        return RectifiedFlow(config, scheduler, patch=PATCH)

    def fake_components(self, config, architecture) -> Components:
        """The architecture's models, built under the caller's FakeTensorMode: shapes, no weights."""
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
        from torch._subclasses.fake_tensor import unset_fake_temporarily
        from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

        check_config(config, architecture.unet)
        self._set_guidance(config, architecture.unet)
        encoders = FluxTextEncoders(CLIPTextModel(CLIPTextConfig.from_dict(architecture.text_encoder)),
                                    T5EncoderModel(T5Config.from_dict(architecture.text_encoder_2)))
        t5_length = T5_LENGTH[variant(architecture.unet)]
        # the real tokenizer: the estimator takes the prompt's length (CLIP's part and T5's) from it
        tokenizer = FluxTokenizer(clip_vocab.clip_tokenizer(clip_vocab.END), t5_vocab.t5_tokenizer(t5_length),
                                  t5_length)
        with unset_fake_temporarily():  # the schedule reads its own tables back (.item()), which fakes cannot
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(architecture.scheduler)
        return Components(
            tokenizer=tokenizer, text_encoder=encoders, vae=AutoencoderKL.from_config(architecture.vae),
            unet=FluxTransformer2DModel.from_config(architecture.unet), noise_scheduler=scheduler,
            model_path=architecture.source)

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict:
        hidden, pooled = text_encoder(input_ids)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]:
        # The pooled output is the final layer norm's output at the end token, so all of CLIP runs; only its
        # projection head would not, and CLIPTextModel has none. T5 never trains (see check_config).
        return []

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        height, width = noisy_latents.shape[-2:]
        hidden = conditioning["encoder_hidden_states"]
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((noisy_latents.shape[0],), self.guidance, device=noisy_latents.device,
                                  dtype=torch.float32)
        output = unet(hidden_states=pack(noisy_latents), timestep=timesteps.to(noisy_latents.dtype) / 1000,
                      guidance=guidance, pooled_projections=conditioning["pooled_projections"],
                      encoder_hidden_states=hidden,
                      # positions: in the image ids' dtype, whatever the text encoder's output was stored in
                      txt_ids=torch.zeros(hidden.shape[1], 3, device=hidden.device, dtype=noisy_latents.dtype),
                      img_ids=image_ids(height, width, noisy_latents.device, noisy_latents.dtype),
                      return_dict=False)[0]
        return unpack(output, height, width)

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """FluxPipeline over the given (trained) transformer and text encoders, sampling with the model's
        flow-matching Euler schedule."""
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

        tokenizer = components.tokenizer
        pipeline = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae, text_encoder=text_encoder.text_encoder, tokenizer=tokenizer.clip,
            text_encoder_2=text_encoder.text_encoder_2, tokenizer_2=tokenizer.t5, transformer=unet)
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    @torch.no_grad()
    def render(self, pipeline, positive: dict, negative: dict, **options) -> list:
        """Images from embeddings. The sample's cfg_scale is dev's distilled guidance (FluxPipeline's
        guidance_scale; schnell ignores it); the negative prompt is unused, as FluxPipeline does without
        true_cfg_scale."""
        return pipeline(prompt_embeds=positive["encoder_hidden_states"],
                        pooled_prompt_embeds=positive["pooled_projections"],
                        max_sequence_length=positive["encoder_hidden_states"].shape[1], **options).images


def load_t5_tokenizer(folder: Path, length: int):
    from transformers import T5TokenizerFast

    if not (folder / "tokenizer.json").is_file() and not (folder / "spiece.model").is_file():
        raise UserError(f"config key 'model': {folder} holds no T5 tokenizer (tokenizer.json or spiece.model)")
    return T5TokenizerFast.from_pretrained(str(folder), model_max_length=length)
