"""The Qwen-Image family: a 20 B MMDiT (60 double-stream blocks) over 2x2 patches of the 16-channel latents of a
Wan-style autoencoder, conditioned on the last hidden states of Qwen2.5-VL-7B reading the prompt inside a fixed
chat template.

QwenImagePipeline wraps each prompt in `PROMPT_TEMPLATE`, runs the text encoder with the attention mask and keeps
the hidden states after the template's first `DROPPED_TOKENS` tokens (its system turn), each row padded with zeros
to the batch's longest and a mask marking the real ones. The trainer hands token ids around (dataset, caches,
sampler) and strips their trailing padding for the cache keys, so `QwenImageTokenizer` gives the template's ids
from position `FIXED_TOKENS` on: the first 33 never change with the prompt, while the 34th, the newline after
"user", merges with a prompt that starts with a newline. `QwenImageTextEncoder` puts the 33 back, runs the model
and returns one row per id: the kept hidden states, then one zero row, so that a prompt's conditioning is as long
as its ids and the caches cut it where they cut the ids. The mask travels as the conditioning part
`encoder_hidden_states_mask`, [batch, tokens, 1] (per token, like the hidden states, so the caches cut both
alike); classifier-free dropout's zeros mask a dropped caption's text out entirely.

The autoencoder encodes videos ([B, C, frames, H, W]) and its latents are normalised per channel
(latents_mean, latents_std) rather than by one scaling factor; `QwenImageVAE` encodes single frames straight
into the normalised space, so the step, the caches and the estimator see a 4-D distribution whose samples are
the pipeline's (latents − mean) / std.

The transformer sits in the components' `unet` field. `predict` packs the latents into its token sequence as
Flux.1's do (the same 2x2 patches) and gives it each image's (frames, rows, columns) for the rotary positions;
an edited image's latents would join that sequence as a second entry of `img_shapes`.
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
from .flux import PATCH, PIXELS_PER_TOKEN_SIDE, bucket_sides, pack, unpack
from .sd import Components, resolve_model_path
from .single_file import BUILTIN_CONFIGS

ARCH = "qwen-image"
# QwenImagePipeline's prompt_template_encode, prompt_template_encode_start_idx and tokenizer_max_length
PROMPT_TEMPLATE = ("<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
                   "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
                   "<|im_end|>\n<|im_start|>assistant\n")
DROPPED_TOKENS = 34
PROMPT_TOKENS = 1024
# The template's tokens that no prompt changes: through "user", before the newline a prompt may merge with.
FIXED_TOKENS = DROPPED_TOKENS - 1
# The last block's modules that feed only its text stream past the attention, which the model discards (its output
# is the image stream): they get no gradient, so they are frozen and never adapted, and DDP waits for none.
LAST_BLOCK_TEXT_ONLY = ("attn.add_q_proj", "attn.norm_added_q", "attn.to_add_out", "txt_mlp")
TRANSFORMER_CONFIG = "transformer/config.json"
PIPELINE_INDEX = "model_index.json"
# ComfyUI's mark of a transformer that sees an edit's images at timestep zero (the 2511 edit model, diffusers'
# zero_cond_t): an empty tensor of this name beside the weights (comfy/model_detection.py, "2511")
TIMESTEP_ZERO_MARK = "__index_timestep_zero__"
# Qwen-Image renders from 1328 px squares down; much below 512 it renders poorly.
SMALLEST_USEFUL_RESOLUTION = 512


class QwenImageTokenizer:
    """The ids of PROMPT_TEMPLATE around each caption from position FIXED_TOKENS on, truncated as
    QwenImagePipeline truncates the whole template; `fixed_ids` are the ids before them."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.model_max_length = PROMPT_TOKENS + DROPPED_TOKENS - FIXED_TOKENS
        self.pad_token_id = tokenizer.pad_token_id
        self.fixed_ids = tokenizer(PROMPT_TEMPLATE.format("")).input_ids[:FIXED_TOKENS]

    def _ids(self, text: str) -> list[int]:
        ids = self.tokenizer(PROMPT_TEMPLATE.format(text), max_length=PROMPT_TOKENS + DROPPED_TOKENS,
                             truncation=True).input_ids
        return ids[FIXED_TOKENS:]

    def __call__(self, text, padding=None, max_length: Optional[int] = None, truncation: bool = True,
                 return_tensors: Optional[str] = None):
        length = max_length or self.model_max_length
        rows = [self._ids(t)[:length] for t in ([text] if isinstance(text, str) else text)]
        if padding == "max_length":
            rows = [row + [self.pad_token_id] * (length - len(row)) for row in rows]
        if return_tensors == "pt":  # one row per caption, a single one included, as transformers' tokenizers
            return SimpleNamespace(input_ids=torch.tensor(rows))
        return SimpleNamespace(input_ids=rows[0] if isinstance(text, str) else rows)


class QwenImageTextEncoder(torch.nn.Module):
    """Qwen2.5-VL (`text_encoder`, read text-only) behind QwenImageTokenizer's ids."""
    # Qwen2.5-VL-7B stays as Qwen trained it (check_config refuses train_text_encoder)
    never_trained = ("text_encoder",)

    def __init__(self, text_encoder, fixed_ids: list[int], pad_token_id: int):
        super().__init__()
        self.text_encoder = text_encoder
        self.pad_token_id = pad_token_id
        self.register_buffer("fixed_ids", torch.tensor(fixed_ids, dtype=torch.long), persistent=False)

    def parts(self) -> dict[str, torch.nn.Module]:
        return {"text_encoder": self.text_encoder}

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states [B, L, D], mask [B, L, 1]) for ids [B, L]: row j is the hidden state QwenImagePipeline
        keeps at j for ids[j] (0 and masked out past each prompt's end, and at the last row)."""
        batch, length = input_ids.shape
        # each row's prompt ends at its last id that is not padding (a pad id inside the prompt is its own)
        position = torch.arange(length, device=input_ids.device)
        real = torch.where(input_ids != self.pad_token_id, position + 1, 0).amax(dim=1, keepdim=True)
        ids = torch.cat([self.fixed_ids.to(input_ids.device).expand(batch, -1), input_ids], dim=1)
        attention = torch.cat([torch.ones(batch, FIXED_TOKENS, dtype=torch.long, device=input_ids.device),
                               (position < real).long()], dim=1)
        # the language model alone: hidden_states[-1] of the full model, without the vocabulary head
        hidden = self.text_encoder.model(input_ids=ids, attention_mask=attention).last_hidden_state
        kept = (position < real - 1).unsqueeze(-1)  # the 34th token's state and past it: QwenImagePipeline's rows
        hidden = torch.cat([hidden[:, DROPPED_TOKENS:], hidden.new_zeros(batch, 1, hidden.shape[-1])], dim=1)
        return hidden * kept.to(hidden.dtype), kept.to(hidden.dtype)


class QwenImageVAE(torch.nn.Module):
    """AutoencoderKLQwenImage (`model`) for single images, its latents normalised as QwenImagePipeline's are:
    `config` says scaling factor 1 and no shift, since they are applied here, per channel."""

    def __init__(self, model):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.model = model
        c = model.config
        self.config = FrozenDict({**c, "scaling_factor": 1.0, "shift_factor": None, "latent_channels": c.z_dim,
                                  # one entry per 2x downsample plus one, as AutoencoderKL's
                                  "block_out_channels": [c.base_dim * m for m in c.dim_mult]})

    def enable_slicing(self) -> None:
        self.model.enable_slicing()

    def encode(self, pixels: torch.Tensor) -> SimpleNamespace:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        moments = self.model.encode(pixels.unsqueeze(2)).latent_dist
        c = self.model.config
        mean = torch.tensor(c.latents_mean, device=pixels.device, dtype=moments.mean.dtype).view(1, -1, 1, 1)
        std = torch.tensor(c.latents_std, device=pixels.device, dtype=moments.mean.dtype).view(1, -1, 1, 1)
        # a sample mean + σ·ε normalises to (mean − m)/s + (σ/s)·ε: the log-variance moves by −2·log s
        normalised = torch.cat([(moments.mean[:, :, 0] - mean) / std, moments.logvar[:, :, 0] - 2 * std.log()], 1)
        return SimpleNamespace(latent_dist=DiagonalGaussianDistribution(normalised))


def unused_modules(model: torch.nn.Module) -> list[str]:
    """The names of LAST_BLOCK_TEXT_ONLY in a Qwen-Image transformer; none in any other model."""
    from diffusers import QwenImageTransformer2DModel

    if not isinstance(model, QwenImageTransformer2DModel):
        return []
    return [f"transformer_blocks.{len(model.transformer_blocks) - 1}.{name}" for name in LAST_BLOCK_TEXT_ONLY]


def _freeze_unused(transformer) -> None:
    for name in unused_modules(transformer):
        transformer.get_submodule(name).requires_grad_(False)


def is_qwen_image_transformer(folder: Path) -> bool:
    """Whether folder holds a QwenImageTransformer2DModel (a diffusers folder's transformer/, a checkpoint's unet/)."""
    config = folder / "config.json"
    return config.is_file() and json.loads(config.read_text(encoding="utf-8")).get(
        "_class_name") == "QwenImageTransformer2DModel"


def file_prefix(shapes: dict) -> Optional[str]:
    """The prefix of a single file's Qwen-Image transformer keys: none in ComfyUI's diffusion_models/ files (whose
    keys are diffusers'), `model.diffusion_model.` in a whole checkpoint; None when it holds no such
    transformer."""
    for prefix in ("", "model.diffusion_model."):
        if f"{prefix}txt_norm.weight" in shapes and f"{prefix}transformer_blocks.0.img_mod.1.weight" in shapes:
            return prefix
    return None


def is_qwen_image(model: str) -> bool:
    """Whether model is a Qwen-Image diffusers folder or a single file holding its transformer."""
    from .single_file import read_shapes

    path = Path(resolve_model_path(model))
    if path.is_dir():
        return is_qwen_image_transformer(path / "transformer")
    try:
        return file_prefix(read_shapes(path)) is not None
    except UserError:  # not a readable checkpoint: the SD loader names the problem
        return False


def load_transformer_file(path: Path, dtype: torch.dtype):
    """The transformer of a single file, through diffusers' own single-file loader. Its architecture is the one the
    file's metadata records (CONFIGS_KEY, written by `convert`), else Qwen-Image's shipped one, conditioning the
    edit's images at timestep zero where the file bears ComfyUI's mark of it."""
    import tempfile

    from diffusers import QwenImageTransformer2DModel
    from safetensors import safe_open

    from .single_file import read_shapes

    prefix = file_prefix(read_shapes(path))
    with safe_open(str(path), "pt") as handle:
        state = {key[len(prefix):]: handle.get_tensor(key) for key in handle.keys() if key.startswith(prefix)}
    marked = state.pop(TIMESTEP_ZERO_MARK, None) is not None
    config = (recorded_files(path).get(TRANSFORMER_CONFIG) or shipped_config("transformer")) | (
        {"zero_cond_t": True} if marked else {})
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / TRANSFORMER_CONFIG).parent.mkdir()
        (Path(folder) / TRANSFORMER_CONFIG).write_text(json.dumps(config), encoding="utf-8")
        try:
            return QwenImageTransformer2DModel.from_single_file(state, config=folder, subfolder="transformer",
                                                                torch_dtype=dtype)
        except (ValueError, RuntimeError) as error:  # tensors of another size than the architecture's
            raise UserError(f"config key 'model': {path.name} is not a Qwen-Image transformer: {error}") from None


def recorded_files(path: Path) -> dict:
    """The config files a single file's metadata records (CONFIGS_KEY), by their paths in a diffusers folder."""
    from .single_file import recorded_configs

    return (recorded_configs(path) or {}).get("files", {}) if path.suffix == ".safetensors" else {}


def recorded_config(transformer, pipeline_class: Optional[str] = None) -> dict:
    """What `convert` records in a transformer's single file (CONFIGS_KEY) for load_transformer_file: its config,
    and the class of the pipeline it was trained in (model_index.json's), which tells an edit model's file."""
    config = json.loads(transformer.to_json_string())
    config.pop("_name_or_path", None)  # where it was read from: no part of the architecture
    files = {TRANSFORMER_CONFIG: config}
    if pipeline_class:
        files[PIPELINE_INDEX] = {"_class_name": pipeline_class}
    return {"files": files}


def file_state(transformer) -> dict:
    """A transformer's tensors as ComfyUI's diffusion_models/ file holds them: diffusers' keys, with ComfyUI's mark
    of an edit model conditioned at timestep zero (the 2511 edit model's zero_cond_t)."""
    state = transformer.state_dict()
    return {**state, TIMESTEP_ZERO_MARK: torch.tensor([])} if transformer.config.get("zero_cond_t") else state


def check_config(config) -> None:
    """Refuse what Qwen-Image cannot train, naming the key; warn of a resolution it renders poorly at."""
    refusals = (
        ("tokenizer", config.tokenizer, "Qwen-Image's tokenizer is its text encoder's own; remove tokenizer:"),
        ("clip_stop_at_layer", config.clip_stop_at_layer > 1,
         "Qwen-Image reads its text encoder's last hidden states and has no CLIP; set it to 1"),
        ("train_text_encoder", config.train_text_encoder,
         "Qwen-Image's Qwen2.5-VL-7B is never trained; set it to false"),
        ("train_text_encoder_2", config.train_text_encoder_2, "Qwen-Image has one text encoder; remove it"),
        ("text_encoder_2", config.text_encoder_2, "Qwen-Image has one text encoder; remove it"),
        ("network.conv_rank", config.network.adapter and config.network.conv_rank,
         "Qwen-Image's transformer has no convolutions for LoCon to adapt; set it to 0"),
        ("flow.guidance", config.flow.guidance is not None,
         "Qwen-Image has no guidance embedding (it samples with true CFG); remove flow.guidance"),
    )
    for key, refused, why in refusals:
        if refused:
            raise UserError(f"config key '{key}': {why}")
    for key, side in bucket_sides(config):
        if side % PIXELS_PER_TOKEN_SIDE:
            raise UserError(f"config key '{key}': Qwen-Image makes one token of each 16x16 pixels (8x latents in "
                            f"2x2 patches), so image sides must be multiples of 16; {side} is not")
    if config.data.resolution < SMALLEST_USEFUL_RESOLUTION:
        notices.warn(f"config key 'data.resolution': {config.data.resolution} is far below Qwen-Image's native "
                     f"1328 px; train at {SMALLEST_USEFUL_RESOLUTION} or more")


def shipped_config(component: str) -> dict:
    file = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((BUILTIN_CONFIGS / ARCH / component / file).read_text(encoding="utf-8"))


def text_encoder_from_config(config: dict):
    """Qwen2.5-VL of a config.json, random, in fp32: the file's torch_dtype (the dtype its weights were saved in)
    would otherwise build the vocabulary head, and only it, in bf16."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig.from_dict(
        {key: value for key, value in config.items() if key != "torch_dtype"}))


class QwenImage(Family):
    """Qwen/Qwen-Image and models fine-tuned from it: a diffusers folder, or the transformer's single file with the
    text encoder and the autoencoder each as ComfyUI's file or a diffusers folder (`qwen_image_files`)."""
    name = ARCH
    conditioning_parts = ("encoder_hidden_states", "encoder_hidden_states_mask")
    supports_custom_embeddings = False

    def load(self, config) -> Components:
        """Tokenizer, text encoder, VAE, transformer and the flow-matching schedule on the CPU, each model in the
        dtype the run reads it in (ram.load_dtype)."""
        check_config(config)
        models = load_models(config)
        tokenizer = QwenImageTokenizer(models.tokenizer)
        encoder = QwenImageTextEncoder(models.text_encoder, tokenizer.fixed_ids, tokenizer.pad_token_id)
        return Components(tokenizer=tokenizer, text_encoder=encoder, vae=QwenImageVAE(models.vae),
                          unet=models.transformer, noise_scheduler=models.scheduler, model_path=str(models.root))

    def objective(self, config, scheduler):
        from ..objectives import RectifiedFlow

        return RectifiedFlow(config, scheduler, patch=PATCH)

    def fake_components(self, config, architecture) -> Components:
        """The architecture's models, built under the caller's FakeTensorMode: shapes, no weights."""
        from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
        from torch._subclasses.fake_tensor import unset_fake_temporarily

        check_config(config)
        with unset_fake_temporarily():  # the schedule reads its own tables back (.item()), which fakes cannot
            scheduler = FlowMatchEulerDiscreteScheduler.from_config(architecture.scheduler)
            tokenizer = QwenImageTokenizer(qwen2_tokenizer())
        transformer = QwenImageTransformer2DModel.from_config(architecture.unet)
        _freeze_unused(transformer)
        return Components(
            tokenizer=tokenizer,
            text_encoder=QwenImageTextEncoder(text_encoder_from_config(architecture.text_encoder),
                                              tokenizer.fixed_ids, tokenizer.pad_token_id),
            vae=QwenImageVAE(AutoencoderKLQwenImage.from_config(architecture.vae)),
            unet=transformer, noise_scheduler=scheduler, model_path=architecture.source)

    def encode_text(self, text_encoder, input_ids: torch.Tensor, clip_stop_at_layer: int) -> dict:
        hidden, mask = text_encoder(input_ids)
        return {"encoder_hidden_states": hidden, "encoder_hidden_states_mask": mask}

    def unused_text_modules(self, text_encoder, clip_stop_at_layer: int) -> list[torch.nn.Module]:
        return []  # the text encoder never trains (check_config)

    def predict(self, unet, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict,
                time_ids: Optional[torch.Tensor]) -> torch.Tensor:
        batch, _, height, width = noisy_latents.shape
        output = unet(hidden_states=pack(noisy_latents), timestep=timesteps.to(noisy_latents.dtype) / 1000,
                      encoder_hidden_states=conditioning["encoder_hidden_states"],
                      encoder_hidden_states_mask=conditioning["encoder_hidden_states_mask"][..., 0] > 0,
                      img_shapes=[[(1, height // PATCH, width // PATCH)]] * batch, return_dict=False)[0]
        return unpack(output, height, width)

    def pipeline(self, components: Components, unet, text_encoder, device: torch.device):
        """QwenImagePipeline over the given (trained) transformer, sampling with the model's flow-matching Euler
        schedule."""
        from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

        pipeline = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(components.noise_scheduler.config),
            vae=components.vae.model, text_encoder=text_encoder.text_encoder,
            tokenizer=components.tokenizer.tokenizer, transformer=unet)
        pipeline.set_progress_bar_config(disable=True)
        return block_swap.pipeline_to(pipeline, unet, device)

    @torch.no_grad()
    def render(self, pipeline, positive: dict, negative: dict, guidance_scale: float = 4.0, **options) -> list:
        """Images from embeddings. The sample's cfg_scale is QwenImagePipeline's true_cfg_scale, with the
        negative prompt as the unconditional side. Text positions masked in every row are cut first: masked
        tokens change nothing but the time they take."""
        masks = [part["encoder_hidden_states_mask"][..., 0] for part in (positive, negative)]
        length = int(max(mask.sum(dim=1).max() for mask in masks))
        embeds = [part["encoder_hidden_states"][:, :length] for part in (positive, negative)]
        return pipeline(prompt_embeds=embeds[0], prompt_embeds_mask=masks[0][:, :length].long(),
                        negative_prompt_embeds=embeds[1], negative_prompt_embeds_mask=masks[1][:, :length].long(),
                        true_cfg_scale=guidance_scale, max_sequence_length=length, **options).images


def load_models(config) -> SimpleNamespace:
    """The models of a Qwen-Image diffusers folder (or its edit model's), or of a transformer's single file with the
    text encoder and the autoencoder each as ComfyUI's file or a diffusers folder (`qwen_image_files`), on the
    CPU in the dtypes the run reads them in: transformer, text_encoder, vae, tokenizer (Qwen2's), scheduler and
    root (the model's path)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

    from ..ram import load_dtype

    root = Path(resolve_model_path(config.model))
    if root.is_file():
        from .qwen_image_files import load_parts

        parts = load_parts(config.text_encoder, config.vae, {key: load_dtype(config, key)
                                                             for key in ("text_encoder", "vae")})
        models = SimpleNamespace(
            transformer=load_transformer_file(root, load_dtype(config, "unet")), tokenizer=qwen2_tokenizer(),
            scheduler=FlowMatchEulerDiscreteScheduler.from_config(shipped_config("scheduler")), **parts)
    else:
        if config.text_encoder:
            raise UserError(f"config key 'text_encoder': {root} is a diffusers folder with its own; "
                            "remove text_encoder:")
        vae_path = Path(paths.resolve(config.vae) if config.vae else root / "vae")
        if not (vae_path / "config.json").is_file():
            raise UserError(f"config key 'vae': {vae_path} is not a model folder (no config.json)")
        models = SimpleNamespace(
            transformer=QwenImageTransformer2DModel.from_pretrained(root / "transformer",
                                                                    torch_dtype=load_dtype(config, "unet")),
            tokenizer=Qwen2Tokenizer.from_pretrained(root / "tokenizer"),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(root / "scheduler"),
            text_encoder=Qwen2_5_VLForConditionalGeneration.from_pretrained(
                root / "text_encoder", dtype=load_dtype(config, "text_encoder")),
            vae=AutoencoderKLQwenImage.from_pretrained(vae_path, torch_dtype=load_dtype(config, "vae")))
    _freeze_unused(models.transformer)
    models.root = root
    return models


def qwen2_tokenizer():
    """Qwen2.5-VL's tokenizer from Qwen2's installed vocabulary (`qwen2_vocab`) and its real special tokens."""
    import tempfile

    from transformers import Qwen2Tokenizer

    from .tiny_captioners import QWEN_CHAT_TEMPLATE, QWEN_SPECIALS, qwen_tokenizer_files

    with tempfile.TemporaryDirectory() as folder:
        qwen_tokenizer_files(Path(folder), QWEN_SPECIALS[:22], QWEN_CHAT_TEMPLATE)
        return Qwen2Tokenizer.from_pretrained(folder)
