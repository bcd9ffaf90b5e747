"""Offline demo assets: tiny random Stable Diffusion pipelines and a synthetic dataset.

Nothing here downloads anything. The tiny SD pipeline keeps SD1.x's structure (CLIP text encoder,
cross-attention UNet with 4 latent channels, a VAE that downsamples 8x) at a size that trains on a CPU;
the tiny SDXL one adds SDXL's second text encoder (with projection, for the pooled embedding) and the
UNet's text-time conditioning.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

TINY_TEXT_DIM = 32
_SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def _byte_alphabet() -> list[str]:
    # GPT-2/CLIP byte-to-unicode table: every byte maps to a printable character.
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


# Merges for frequent English fragments so that prompts tokenise to fewer, more meaningful tokens.
_MERGE_WORDS = ("sks", "photo", "red", "blue", "green", "yellow", "circle", "square", "triangle", "star",
                "toy", "a", "of", "on", "and", "with", "the", "background", "purple", "orange", "white",
                "black", "small", "large", "object", "shape", "shapes")


def write_tokenizer(directory: Path) -> None:
    """Write a CLIP BPE tokenizer (vocab.json + merges.txt) built from the byte alphabet."""
    directory.mkdir(parents=True, exist_ok=True)
    alphabet = _byte_alphabet()
    vocab_tokens = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    known = set(vocab_tokens)
    for word in _MERGE_WORDS:
        # Build each word left to right: ((s k) s</w>) and so on, the way BPE would have learnt it.
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        while len(symbols) > 1:
            pair = (symbols[0], symbols[1])
            merged = pair[0] + pair[1]
            if merged not in known:
                merges.append(pair)
                vocab_tokens.append(merged)
                known.add(merged)
            symbols = [merged] + symbols[2:]
    vocab_tokens += list(_SPECIAL_TOKENS)
    vocab = {token: index for index, token in enumerate(vocab_tokens)}
    (directory / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (directory / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


ARCHITECTURES = ("sd", "sdxl")


def _tiny_tokenizer(directory: Path, pad_token: str):
    from transformers import CLIPTokenizer

    write_tokenizer(directory)
    return CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"), model_max_length=77,
                         pad_token=pad_token)


def _tiny_text_config(tokenizer, pad_token_id: int, **sizes):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=pad_token_id, **sizes)


def _tiny_vae(scaling_factor: float):
    from diffusers import AutoencoderKL

    # Four blocks give three 2x downsamples: the same 8x image-to-latent geometry as SD's VAE.
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(16, 16, 32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=8, sample_size=64, scaling_factor=scaling_factor)


def _tiny_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, num_train_timesteps=1000, steps_offset=1, prediction_type="epsilon")


def make_tiny_model(directory: str | Path, seed: int = 0, arch: str = "sd") -> Path:
    """Save a tiny random pipeline of the architecture ('sd' or 'sdxl') in diffusers format; same bytes
    for the same seed."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (_make_tiny_sdxl if arch == "sdxl" else _make_tiny_sd)(directory, seed)
    return directory


def _make_tiny_sd(directory: Path, seed: int) -> None:
    import torch
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    tokenizer = _tiny_tokenizer(directory / "tokenizer", "<|endoftext|>")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(
        tokenizer, tokenizer.pad_token_id, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, projection_dim=TINY_TEXT_DIM))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_TEXT_DIM, attention_head_dim=8, norm_num_groups=16)
    pipeline = StableDiffusionPipeline(
        unet=unet, vae=_tiny_vae(0.18215), text_encoder=text_encoder, tokenizer=tokenizer,
        scheduler=_tiny_scheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipeline.save_pretrained(directory, safe_serialization=True)


# SDXL's time ids: original size, crop top-left and target size, two numbers each.
_TIME_IDS = 6


def _make_tiny_sdxl(directory: Path, seed: int) -> None:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    # As in SDXL, both encoders share one vocabulary; the second pads with "!" instead of the end token.
    tokenizer = _tiny_tokenizer(directory / "tokenizer", "<|endoftext|>")
    tokenizer_2 = _tiny_tokenizer(directory / "tokenizer_2", "!")
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_tiny_text_config(
        tokenizer, tokenizer.pad_token_id, hidden_size=TINY_TEXT_DIM, intermediate_size=64, num_hidden_layers=3,
        num_attention_heads=4, projection_dim=TINY_TEXT_DIM))
    text_encoder_2 = CLIPTextModelWithProjection(_tiny_text_config(
        tokenizer_2, tokenizer_2.pad_token_id, hidden_size=2 * TINY_TEXT_DIM, intermediate_size=128,
        num_hidden_layers=3, num_attention_heads=4, projection_dim=2 * TINY_TEXT_DIM, hidden_act="gelu"))
    time_embed_dim = 8
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        # the hidden states of both encoders side by side, as SDXL's 768 + 1280
        cross_attention_dim=3 * TINY_TEXT_DIM, norm_num_groups=16, addition_embed_type="text_time",
        addition_time_embed_dim=time_embed_dim,
        projection_class_embeddings_input_dim=_TIME_IDS * time_embed_dim + 2 * TINY_TEXT_DIM)
    pipeline = StableDiffusionXLPipeline(
        unet=unet, vae=_tiny_vae(0.13025), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer_2, scheduler=_tiny_scheduler())
    pipeline.save_pretrained(directory, safe_serialization=True)


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
