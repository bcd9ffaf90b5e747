"""Offline demo assets: tiny random Stable Diffusion pipelines and a synthetic dataset.

Nothing here downloads anything. Each tiny pipeline is a real architecture's shipped configs
(`configs/pipelines/`) with only widths and depths shrunk, so it keeps every quirk of the real model:
special-token ids, padding tokens, activations, scaling factors, prediction type, `force_upcast`, the
noise schedule. It tokenizes with the real CLIP vocabulary and its real padding token (Flux.1's second
tokenizer with T5's real vocabulary, `t5_vocab`; FLUX.2 [klein]'s with Qwen's, `qwen2_vocab`, and Qwen3's special
tokens at their real ids).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from . import clip_vocab, t5_vocab

REAL_CONFIGS = Path(__file__).resolve().parent / "configs" / "pipelines"
# demo architecture name: the shipped real configs it shrinks
ARCHITECTURES = {"sd": "sd15", "sd21": "sd21", "sdxl": "sdxl", "flux": "flux1-dev", "flux-schnell": "flux1-schnell",
                 "flux2-klein": "flux2-klein-4b"}
TINY_TEXT_DIM = 32


def _text(layers: int, width: int = TINY_TEXT_DIM) -> dict:
    return {"hidden_size": width, "intermediate_size": 2 * width, "num_hidden_layers": layers,
            "num_attention_heads": 4, "projection_dim": width}


# Four blocks give three 2x downsamples: the same 8x image-to-latent geometry as the real VAEs.
_VAE = {"block_out_channels": [16, 16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8, "sample_size": 64}
_SD_UNET = {"sample_size": 8, "layers_per_block": 1, "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "cross_attention_dim": TINY_TEXT_DIM,
            "norm_num_groups": 16}
_TIME_EMBED_DIM = 8
# SDXL's time ids: original size, crop top-left and target size, two numbers each.
_TIME_IDS = 6
# Flux.1: one double-stream and one single-stream block, two heads whose 16 channels split over the rotary
# axes (index, height, width) as the real 128 do (16, 56, 56). The text streams are the tiny encoders':
# T5's hidden states and CLIP's pooled output (its hidden size, which the pooler keeps).
_T5 = {"d_model": TINY_TEXT_DIM, "d_ff": 2 * TINY_TEXT_DIM, "d_kv": 8, "num_heads": 4, "num_layers": 2,
       "num_decoder_layers": 2}
_FLUX = {
    "text_encoder": _text(2), "text_encoder_2": _T5,
    "transformer": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
                    "axes_dims_rope": [4, 6, 6], "joint_attention_dim": TINY_TEXT_DIM,
                    "pooled_projection_dim": TINY_TEXT_DIM},
    # Four blocks (8x geometry) with the real 16 latent channels and the real 32 norm groups (no tensor shows
    # the group count, so a loader rebuilding the VAE from its tensors assumes the real one): 32 wide
    "vae": {"block_out_channels": [32, 32, 32, 32], "layers_per_block": 1, "sample_size": 64}}

# FLUX.2 [klein]: one double-stream and one single-stream block, two heads whose 16 channels split over the four
# rotary axes (time, height, width, text index) as the real 128 do (32 each); the text width is three of the tiny
# Qwen3's hidden states side by side. The Qwen3 has 28 layers: the pipeline reads layers 9, 18 and 27, and the
# 27th must be a block's output, not the final norm's as it would be in a 27-layer model. The autoencoder keeps the
# real 32 latent channels and 32 norm groups.
_KLEIN = {
    "text_encoder": {"hidden_size": TINY_TEXT_DIM, "intermediate_size": 2 * TINY_TEXT_DIM, "num_hidden_layers": 28,
                     "max_window_layers": 28, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8},
    "transformer": {"num_layers": 1, "num_single_layers": 1, "num_attention_heads": 2, "attention_head_dim": 16,
                    "axes_dims_rope": [4, 4, 4, 4], "joint_attention_dim": 3 * TINY_TEXT_DIM},
    "vae": _FLUX["vae"]}

# The size of every component: only these keys differ from the real configs.
SIZES = {
    "sd": {"text_encoder": _text(4), "vae": _VAE, "unet": {**_SD_UNET, "attention_head_dim": 8}},
    "sd21": {"text_encoder": _text(4), "vae": _VAE, "unet": {**_SD_UNET, "attention_head_dim": [2, 4]}},
    "sdxl": {
        "text_encoder": _text(3), "text_encoder_2": _text(3, 2 * TINY_TEXT_DIM), "vae": _VAE,
        "unet": {"sample_size": 8, "layers_per_block": 1, "block_out_channels": [32, 64],
                 "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
                 "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"], "transformer_layers_per_block": [1, 2],
                 "attention_head_dim": [2, 4], "norm_num_groups": 16,
                 # the hidden states of both encoders side by side, as SDXL's 768 + 1280
                 "cross_attention_dim": 3 * TINY_TEXT_DIM, "addition_time_embed_dim": _TIME_EMBED_DIM,
                 "projection_class_embeddings_input_dim": _TIME_IDS * _TIME_EMBED_DIM + 2 * TINY_TEXT_DIM}},
    "flux": _FLUX, "flux-schnell": _FLUX, "flux2-klein": _KLEIN,
}
# The length of FLUX.1's T5 tokenizer (its tokenizer_2/ folder says 512 for dev and schnell alike).
T5_MAX_LENGTH = 512


def real_config(arch: str, component: str) -> dict:
    folder = REAL_CONFIGS / ARCHITECTURES[arch] / component
    name = "scheduler_config.json" if component == "scheduler" else "config.json"
    return json.loads((folder / name).read_text(encoding="utf-8"))


def _text_encoder(config: dict):
    import transformers

    (class_name,) = config["architectures"]
    model_class = getattr(transformers, class_name)
    return model_class(model_class.config_class.from_dict(config))


def make_tiny_model(directory: str | Path, seed: int = 0, arch: str = "sd") -> Path:
    """Save a tiny random pipeline of the architecture (a key of ARCHITECTURES) in diffusers format; same
    bytes for the same seed."""
    import diffusers
    import torch

    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {tuple(ARCHITECTURES)}, got {arch!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    index = json.loads((REAL_CONFIGS / ARCHITECTURES[arch] / "model_index.json").read_text(encoding="utf-8"))
    configs = {name: {**real_config(arch, name), **size} for name, size in SIZES[arch].items()}
    torch.manual_seed(seed)
    parts = {name: _text_encoder(configs[name]) for name in ("text_encoder", "text_encoder_2") if name in configs}
    for name, pad_token in clip_vocab.PAD_TOKENS.get(ARCHITECTURES[arch], {}).items():
        parts[name] = clip_vocab.clip_tokenizer(pad_token)
    if arch == "flux2-klein":
        parts["tokenizer"] = _qwen3_tokenizer()
        parts["transformer"] = diffusers.Flux2Transformer2DModel.from_config(configs["transformer"])
    elif "transformer" in configs:
        parts["tokenizer"] = clip_vocab.clip_tokenizer(clip_vocab.END)  # as FLUX.1's tokenizer/: CLIP ViT-L's
        parts["tokenizer_2"] = t5_vocab.t5_tokenizer(T5_MAX_LENGTH)
        parts["transformer"] = diffusers.FluxTransformer2DModel.from_config(configs["transformer"])
    else:
        parts["unet"] = diffusers.UNet2DConditionModel.from_config(configs["unet"])
    parts["vae"] = getattr(diffusers, configs["vae"]["_class_name"]).from_config(configs["vae"])
    if arch == "flux2-klein":
        _latent_statistics(parts["vae"])
    scheduler = real_config(arch, "scheduler")
    parts["scheduler"] = getattr(diffusers, scheduler["_class_name"]).from_config(scheduler)
    pipeline_class = getattr(diffusers, index["_class_name"])
    if arch == "sdxl":
        pipeline = pipeline_class(**parts, force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"])
    elif arch == "flux2-klein":
        pipeline = pipeline_class(**parts, is_distilled=index["is_distilled"])
    elif "transformer" in parts:
        pipeline = pipeline_class(**parts)
    else:
        pipeline = pipeline_class(**parts, safety_checker=None, feature_extractor=None,
                                  requires_safety_checker=index["requires_safety_checker"])
    pipeline.save_pretrained(directory, safe_serialization=True)
    return directory


def _qwen3_tokenizer():
    """Qwen3-4B's tokenizer (FLUX.2 [klein] 4B's tokenizer/): Qwen's vocabulary, Qwen3's special tokens at their ids and
    its turn format, which the saved pipeline keeps in tokenizer_config.json as the real one does."""
    import tempfile

    from transformers import AutoTokenizer

    from .tiny_captioners import QWEN3_TEXT_CHAT_TEMPLATE, QWEN_SPECIALS, qwen_tokenizer_files

    with tempfile.TemporaryDirectory() as folder:
        qwen_tokenizer_files(Path(folder), QWEN_SPECIALS, QWEN3_TEXT_CHAT_TEMPLATE)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = QWEN3_TEXT_CHAT_TEMPLATE
    return tokenizer


def _latent_statistics(vae) -> None:
    """FLUX.2's autoencoder ships the statistics of its latents (its batch norm's running mean and variance); a
    fresh one has 0 and 1, which would hide a normalisation left out. Draws them near the real ones' scale."""
    vae.bn.running_mean.normal_(0, 0.5)
    vae.bn.running_var.uniform_(0.5, 4.0)


_COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 70), "yellow": (235, 210, 40),
            "purple": (140, 60, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20)}
_SHAPES = ("circle", "square", "triangle")
# (width, height): square, landscape and portrait so that bucketing has something to do.
_INSTANCE_SIZES = ((96, 96), (128, 64), (64, 128), (120, 80), (80, 120), (112, 72), (72, 112), (100, 100),
                   (128, 80), (80, 128))


def _draw_shape(draw, shape: str, box: tuple[int, int, int, int], colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=colour)
    elif shape == "square":
        draw.rectangle(box, fill=colour)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _draw_subject(draw, cx: int, cy: int, radius: int) -> None:
    # The demo subject "sks toy": a red disc with a yellow square eye, recognisable at any size.
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=_COLOURS["red"])
    eye = max(2, radius // 3)
    draw.rectangle((cx - eye, cy - eye, cx + eye, cy + eye), fill=_COLOURS["yellow"])


def make_sample_data(directory: str | Path, seed: int = 0) -> Path:
    """Write instance/ (the subject), class/ (empty) and finetune/ (captioned shapes) under directory."""
    from PIL import Image, ImageDraw

    directory = Path(directory)
    rng = random.Random(seed)
    instance_dir, class_dir, finetune_dir = directory / "instance", directory / "class", directory / "finetune"
    for folder in (instance_dir, class_dir, finetune_dir):
        folder.mkdir(parents=True, exist_ok=True)

    backgrounds = [(200, 220, 240), (230, 230, 210), (210, 240, 210), (240, 215, 225)]
    for index, (width, height) in enumerate(_INSTANCE_SIZES):
        image = Image.new("RGB", (width, height), backgrounds[index % len(backgrounds)])
        draw = ImageDraw.Draw(image)
        radius = min(width, height) // 3
        cx = rng.randint(radius, width - radius)
        cy = rng.randint(radius, height - radius)
        _draw_subject(draw, cx, cy, radius)
        image.save(instance_dir / f"toy_{index:02d}.png")

    colour_names = list(_COLOURS)
    for index in range(32):
        width, height = rng.choice(((96, 96), (128, 80), (80, 128), (112, 64), (64, 112)))
        background = rng.choice(["white", "black"])
        image = Image.new("RGB", (width, height), _COLOURS[background])
        draw = ImageDraw.Draw(image)
        parts = []
        for _ in range(rng.randint(1, 2)):
            shape = rng.choice(_SHAPES)
            colour = rng.choice([c for c in colour_names if c != background])
            size = rng.randint(min(width, height) // 4, min(width, height) // 2)
            x0, y0 = rng.randint(0, width - size), rng.randint(0, height - size)
            _draw_shape(draw, shape, (x0, y0, x0 + size, y0 + size), _COLOURS[colour])
            parts.append(f"a {colour} {shape}")
        stem = f"shapes_{index:03d}"
        image.save(finetune_dir / f"{stem}.png")
        caption = " and ".join(parts) + f" on a {background} background"
        (finetune_dir / f"{stem}.txt").write_text(caption, encoding="utf-8")
    return directory
